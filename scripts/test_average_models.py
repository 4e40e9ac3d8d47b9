"""Tests of average_models.py (standard library only; not run by CI):

    python3 -m unittest discover -s scripts -p 'test_*.py'
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "average_models.py")


def model_file(path, steps, tensors):
    """A safetensors file of `tensors` ({name: (dtype, values)}) with a cycletrain-like header."""
    header, data = {"__metadata__": {"steps": str(steps), "format": "cycleserve/1"}}, b""
    for name, (dtype, values) in tensors.items():
        body = struct.pack(f"<{len(values)}{ {'F16': 'e', 'F32': 'f', 'I8': 'b'}[dtype] }", *values)
        header[name] = {"dtype": dtype, "shape": [len(values)], "data_offsets": [len(data), len(data) + len(body)]}
        data += body
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def read(path):
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:], length


class Averaging(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = lambda name: os.path.join(self.dir.name, name)

    def tearDown(self):
        self.dir.cleanup()

    def run_script(self, *paths):
        return subprocess.run([sys.executable, SCRIPT, "--out", self.path("avg.safetensors"), *paths],
                              capture_output=True, text=True)

    def test_each_tensor_is_the_mean_and_the_header_is_the_last_files(self):
        model_file(self.path("a"), 4000, {"G.w": ("F16", [1.0, -2.0, 0.5]), "F.b": ("F32", [10.0])})
        model_file(self.path("b"), 4250, {"G.w": ("F16", [2.0, 2.0, 0.25]), "F.b": ("F32", [20.0])})
        model_file(self.path("c"), 4500, {"G.w": ("F16", [3.0, 3.0, 0.0]), "F.b": ("F32", [33.0])})
        done = self.run_script(self.path("a"), self.path("b"), self.path("c"))
        self.assertEqual(done.returncode, 0, done.stderr)
        header, data, length = read(self.path("avg.safetensors"))
        self.assertEqual(length % 8, 0)
        self.assertEqual(header["__metadata__"], {"steps": "4500", "format": "cycleserve/1",
                                                  "averaged_steps": "4000,4250,4500"})
        (start, end) = header["G.w"]["data_offsets"]
        self.assertEqual(struct.unpack("<3e", data[start:end]), (2.0, 1.0, 0.25))
        (start, end) = header["F.b"]["data_offsets"]
        self.assertEqual(struct.unpack("<f", data[start:end]), (21.0,))

    def test_files_of_different_tensors_or_int8_storage_are_refused(self):
        model_file(self.path("a"), 1, {"G.w": ("F16", [1.0, 2.0])})
        model_file(self.path("b"), 2, {"G.w": ("F16", [1.0, 2.0, 3.0])})
        refused = self.run_script(self.path("a"), self.path("b"))
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("does not hold the tensors of", refused.stderr)
        model_file(self.path("c"), 1, {"G.w": ("I8", [1, 2])})
        model_file(self.path("d"), 2, {"G.w": ("I8", [3, 4])})
        refused = self.run_script(self.path("c"), self.path("d"))
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn("only F16 and F32 files can be averaged", refused.stderr)
        self.assertFalse(os.path.exists(self.path("avg.safetensors")))


if __name__ == "__main__":
    unittest.main()
