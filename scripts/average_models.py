#!/usr/bin/env python3
"""Averages the weights of model files exported from one cycletrain run (same architecture,
tensors and storage), the way the generator's moving average is used to steady a GAN's output
(Yazıcı et al., "The Unusual Effectiveness of Averaging in GAN Training", ICLR 2019):

    average_models.py --out models/photo2painting.safetensors runs/step-4250.safetensors ...

Every tensor becomes the mean of its values across the files, computed in float64 and stored in
the first file's dtype (f16 or f32; int8 storage is refused, since its scales differ per file).
The header is the last file's (its steps, training time, recipe), with `averaged_steps` added:
the `steps` of every input, in order. Standard library only; tests: test_average_models.py.
"""
import argparse
import json
import struct
import sys

FORMATS = {"F16": "e", "F32": "f"}


def read(path):
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    return header, blob[8 + length:]


def tensors(header):
    return {name: spec for name, spec in header.items() if name != "__metadata__"}


def average(paths):
    """The averaged file's header and data, from the files at `paths` (at least two)."""
    files = [read(p) for p in paths]
    first = tensors(files[0][0])
    for path, (header, _) in zip(paths, files):
        if tensors(header) != first:
            raise SystemExit(f"error: {path} does not hold the tensors of {paths[0]} (names, shapes, dtypes)")
    data = bytearray(files[0][1])
    for name, spec in first.items():
        code = FORMATS.get(spec["dtype"])
        if code is None:
            raise SystemExit(f"error: {name} is stored as {spec['dtype']}; only F16 and F32 files can be averaged")
        start, end = spec["data_offsets"]
        count = (end - start) // struct.calcsize(code)
        layout = f"<{count}{code}"
        columns = zip(*(struct.unpack(layout, body[start:end]) for _, body in files))
        data[start:end] = struct.pack(layout, *(sum(values) / len(files) for values in columns))
    header = dict(files[0][0])
    metadata = dict(files[-1][0].get("__metadata__", {}))
    metadata["averaged_steps"] = ",".join(h.get("__metadata__", {}).get("steps", "?") for h, _ in files)
    header["__metadata__"] = metadata
    return header, bytes(data)


def write(path, header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give at least two model files")
    write(args.out, *average(args.models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
