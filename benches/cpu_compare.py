#!/usr/bin/env python3
"""CPU inference: cycleserve vs PyTorch eager vs ONNX Runtime, same weights, same machine.

    python3 benches/cpu_compare.py [--threads 2] [--rounds 2]

Creates its own venv (target/bench-venv: torch, onnxruntime, onnx), writes random
published-size generators (ngf 64, 9 blocks, N(0, 0.02) weights) of both families as .pth,
imports them with `cycleserve import`, exports ONNX from PyTorch, and then measures, interleaved
round by round, ms/image of the three runtimes for each family at 256² and 512², batch 1 and 4
(best of 3 calls per round, best round kept). Then peak resident memory of one 1024×1024 image
in each runtime, each in a fresh process. Prints Markdown tables with the ratios to ONNX Runtime.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "target", "bench-venv")
WORK = os.path.join(ROOT, "target", "bench-cpu")
PY = os.path.join(VENV, "bin", "python")


def ensure_venv():
    if os.path.exists(os.path.join(VENV, ".ready")):
        return
    subprocess.check_call([sys.executable, "-m", "venv", VENV])
    pip = [PY, "-m", "pip", "install", "--quiet"]
    # The CPU-only wheel is a tenth of the size; fall back to PyPI's default where its index is unreachable.
    if subprocess.call(pip + ["torch", "--index-url", "https://download.pytorch.org/whl/cpu"]) != 0:
        subprocess.check_call(pip + ["torch"])
    subprocess.check_call(pip + ["onnxruntime", "onnx", "onnxscript", "numpy", "safetensors", "pillow"])
    open(os.path.join(VENV, ".ready"), "w").close()


def cycleserve_bin():
    subprocess.check_call(["cargo", "build", "--release", "--quiet", "--bin", "cycleserve", "--bench", "bench"], cwd=ROOT)
    out = subprocess.check_output(["cargo", "bench", "--no-run", "--bench", "bench", "--message-format", "json"],
                                  cwd=ROOT, stderr=subprocess.DEVNULL, text=True)
    bench = [json.loads(l)["executable"] for l in out.splitlines()
             if '"executable"' in l and json.loads(l).get("target", {}).get("name") == "bench"][0]
    return os.path.join(ROOT, "target", "release", "cycleserve"), bench


# --- run inside the bench venv -------------------------------------------------------------
WORKER = r'''
import json, sys, time, numpy as np, torch, onnxruntime as ort
sys.path.insert(0, sys.argv[1])
from pytorch_reference import generator
cmd = json.loads(sys.argv[2])
torch.set_num_threads(cmd["threads"])
torch.set_grad_enabled(False)

def net(family):
    torch.manual_seed(0)
    g = generator(family, 64, 9, False).eval()
    for m in g.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, 0, 0.02); torch.nn.init.zeros_(m.bias)
    return g

if cmd["op"] == "prepare":
    for family in ("upsample", "transpose"):
        g = net(family)
        torch.save(g.state_dict(), f"{cmd['work']}/{family}.pth")
        torch.onnx.export(g, torch.zeros(1, 3, 256, 256), f"{cmd['work']}/{family}.onnx", input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
elif cmd["op"] in ("torch", "ort"):
    x = np.random.default_rng(0).uniform(-1, 1, (cmd["batch"], 3, cmd["size"], cmd["size"])).astype(np.float32)
    if cmd["op"] == "torch":
        g = net(cmd["family"]); t = torch.from_numpy(x); run = lambda: g(t)
    else:
        so = ort.SessionOptions(); so.intra_op_num_threads = cmd["threads"]; so.inter_op_num_threads = 1
        s = ort.InferenceSession(f"{cmd['work']}/{cmd['family']}.onnx", so, providers=["CPUExecutionProvider"])
        run = lambda: s.run(None, {"x": x})
    run(); best = float("inf")
    for _ in range(cmd["iters"]):
        t0 = time.perf_counter(); run(); best = min(best, time.perf_counter() - t0)
    print(json.dumps({"ms_per_image": best * 1e3 / cmd["batch"]}))
'''


def worker(cmd):
    out = subprocess.check_output([PY, "-c", WORKER, os.path.join(ROOT, "scripts"), json.dumps(cmd)], text=True)
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def peak_rss_kb(argv, env=None):
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return int(out.stderr.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ensure_venv()
    os.makedirs(WORK, exist_ok=True)
    server, bench = cycleserve_bin()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    worker({"op": "prepare", "work": WORK, "threads": args.threads})
    for family in ("upsample", "transpose"):
        subprocess.check_call([server, "import", "--x2y", f"{WORK}/{family}.pth", "--domains", "x,y",
                               "--out", f"{WORK}/{family}.safetensors"], stdout=subprocess.DEVNULL, env=env)

    configs = [(f, s, b) for f in ("upsample", "transpose") for s in (256, 512) for b in (1, 4)]
    best = {}
    for round_ in range(args.rounds):
        for family, size, batch in configs:
            ours = subprocess.check_output([bench, "forward", "--model", f"{WORK}/{family}.safetensors", "--size",
                                            str(size), "--batch", str(batch), "--iters", "3"], text=True, env=env, cwd=ROOT)
            results = {"cycleserve": json.loads(ours.strip().splitlines()[-1])["ms_per_image"]}
            for rt in ("torch", "ort"):
                results[rt] = worker({"op": rt, "work": WORK, "threads": args.threads, "family": family,
                                      "size": size, "batch": batch, "iters": 3})["ms_per_image"]
            for rt, ms in results.items():
                key = (family, size, batch, rt)
                best[key] = min(best.get(key, float("inf")), ms)
            print(f"round {round_ + 1}: {family} {size}² batch {batch}: " +
                  ", ".join(f"{rt} {ms:.0f} ms" for rt, ms in results.items()), file=sys.stderr)

    print(f"\nCPU inference, ms/image (best of {args.rounds} interleaved rounds × 3 calls), {args.threads} threads\n")
    print("| family | size | batch | cycleserve | PyTorch | ONNX Runtime | cycleserve / ORT | cycleserve / PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for family, size, batch in configs:
        c, t, o = (best[(family, size, batch, rt)] for rt in ("cycleserve", "torch", "ort"))
        print(f"| {family} | {size}² | {batch} | {c:.0f} | {t:.0f} | {o:.0f} | {c / o:.2f} | {c / t:.2f} |")

    image = os.path.join(WORK, "big.png")
    subprocess.check_call([PY, "-c", "import numpy as np, PIL.Image as I; I.fromarray(np.random.default_rng(0)"
                           f".integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save('{image}')"])
    print("\nPeak resident memory, one 1024×1024 image, upsample family (fresh process each)\n")
    print("| runtime | peak RSS |")
    print("|---|---|")
    ours = peak_rss_kb([server, "translate", "--device", "cpu", "--model", f"{WORK}/upsample.safetensors", image,
                        os.path.join(WORK, "big_out.png")], env)
    rows = [("cycleserve translate (whole CLI: decode, network, encode)", ours)]
    for rt in ("torch", "ort"):
        cmd = json.dumps({"op": rt, "work": WORK, "threads": args.threads, "family": "upsample", "size": 1024,
                          "batch": 1, "iters": 1})
        rows.append((f"{'PyTorch eager' if rt == 'torch' else 'ONNX Runtime'} (network only)",
                     peak_rss_kb([PY, "-c", WORKER, os.path.join(ROOT, "scripts"), cmd], env)))
    for name, kb in rows:
        print(f"| {name} | {kb / 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
