#!/usr/bin/env python3
"""CPU inference: cycleserve vs PyTorch (f32, bf16 autocast, pure bf16) vs ONNX Runtime, same
weights, same machine, same run.

    python3 benches/cpu_compare.py [--threads 2] [--rounds 2] [--model FILE]

Creates its own venv (target/bench-venv, versions pinned below), writes random published-size
generators (ngf 64, 9 blocks, N(0, 0.02) weights) of both families as .pth, imports them with
`cycleserve import`, and exports ONNX from PyTorch. With `--model`, it measures that cycleserve
model file's x2y generator (stored under `G.`) instead, its weights widened to f32 for PyTorch and
ONNX Runtime as cycleserve widens them on load. Before any timing it runs every runtime on one
input and checks the outputs agree: the f32 runtimes to 1e-3 of PyTorch f32, the bf16 ones within
16 output levels (it prints the level agreement of each). Then it measures, interleaved round by
round, ms/image of each runtime for each family at 256² and 512², batch 1 and 4 (best of 3 calls
per round, best round kept). Last, the peak resident memory of one 1024×1024 image in each
runtime, each in a fresh process that imports only its own library. Prints Markdown tables.

PyTorch's bf16 runs channels-last, as oneDNN prefers: `autocast` keeps f32 weights and casts per
op; `pure bf16` converts the module and input once.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "target", "bench-venv")
WORK = os.path.join(ROOT, "target", "bench-cpu")
PY = os.path.join(VENV, "bin", "python")
# What the numbers in BENCHMARKS.md were measured with.
PINNED = ["onnxruntime==1.32.0", "onnx==1.23.2", "onnxscript==0.7.2", "numpy==2.4.6", "safetensors==0.8.0",
          "pillow==13.0.0"]
TORCH = "torch==2.15.0"
# cycleserve bf16 joins where the CPU has AMX (`amx_available`).
RUNTIMES = ["cycleserve", "torch", "torch_autocast", "torch_bf16", "ort"]
LABELS = {"cycleserve": "cycleserve f32", "cycleserve_bf16": "cycleserve bf16 (AMX)", "torch": "PyTorch f32",
          "torch_autocast": "PyTorch bf16 autocast", "torch_bf16": "PyTorch pure bf16", "ort": "ONNX Runtime f32"}


def ensure_venv():
    if os.path.exists(os.path.join(VENV, ".ready")):
        return
    subprocess.check_call([sys.executable, "-m", "venv", VENV])
    pip = [PY, "-m", "pip", "install", "--quiet"]
    # The CPU-only wheel is a tenth of the size; fall back to PyPI's default where its index is unreachable.
    if subprocess.call(pip + [TORCH, "--index-url", "https://download.pytorch.org/whl/cpu"]) != 0:
        subprocess.check_call(pip + [TORCH])
    subprocess.check_call(pip + PINNED)
    open(os.path.join(VENV, ".ready"), "w").close()


def cycleserve_bin():
    subprocess.check_call(["cargo", "build", "--release", "--quiet", "--bin", "cycleserve", "--bench", "bench"], cwd=ROOT)
    out = subprocess.check_output(["cargo", "bench", "--no-run", "--bench", "bench", "--message-format", "json"],
                                  cwd=ROOT, stderr=subprocess.DEVNULL, text=True)
    bench = [json.loads(l)["executable"] for l in out.splitlines()
             if '"executable"' in l and json.loads(l).get("target", {}).get("name") == "bench"][0]
    return os.path.join(ROOT, "target", "release", "cycleserve"), bench


# --- run inside the bench venv: each op imports only the library it measures ------------------
WORKER = r'''
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
cmd = json.loads(sys.argv[2])
op = cmd["op"]

def given_input():
    if cmd.get("input"):
        return np.load(cmd["input"])
    return np.random.default_rng(0).uniform(-1, 1, (cmd["batch"], 3, cmd["size"], cmd["size"])).astype(np.float32)

if op == "compare":
    ref = np.load(cmd["reference"])
    for name, path in cmd["outputs"].items():
        out = np.load(path)
        levels = np.abs(np.round((out + 1) * 127.5) - np.round((ref + 1) * 127.5))
        print(json.dumps({"runtime": name, "max_abs": float(np.abs(out - ref).max()),
                          "within_one_level": float((levels <= 1).mean()), "max_levels": int(levels.max())}))
    sys.exit(0)

if op.startswith("torch") or op == "prepare":
    import torch
    from pytorch_reference import generator
    torch.set_num_threads(cmd["threads"])
    torch.set_grad_enabled(False)

    def net(family):
        source = cmd["nets"][family]["weights"]
        if source:
            from safetensors.torch import load_file
            g = generator(family, source["ngf"], source["n_blocks"], source["norm_affine"]).eval()
            stored = load_file(source["path"])
            # int8 kernels carry a per-output-channel scale beside them (w = scale · q).
            weights = {k[2:]: t.float() * stored.get(k + "_scale", torch.ones(())) for k, t in stored.items()
                       if k.startswith("G.") and not k.endswith("_scale")}
            g.load_state_dict(weights)
            return g
        torch.manual_seed(0)
        g = generator(family, 64, 9, False).eval()
        for m in g.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.normal_(m.weight, 0, 0.02); torch.nn.init.zeros_(m.bias)
        return g

if op == "prepare":
    for family in cmd["nets"]:
        g = net(family)
        torch.save(g.state_dict(), f"{cmd['work']}/{family}.pth")
        torch.onnx.export(g, torch.zeros(1, 3, 256, 256), f"{cmd['work']}/{family}.onnx", input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    sys.exit(0)

x = given_input()
if op == "torch":
    g = net(cmd["family"]); t = torch.from_numpy(x); run = lambda: g(t)
elif op == "torch_autocast":
    g = net(cmd["family"]).to(memory_format=torch.channels_last)
    t = torch.from_numpy(x).to(memory_format=torch.channels_last)
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return g(t)
elif op == "torch_bf16":
    g = net(cmd["family"]).to(torch.bfloat16).to(memory_format=torch.channels_last)
    t = torch.from_numpy(x).to(torch.bfloat16).to(memory_format=torch.channels_last)
    run = lambda: g(t)
else:
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = cmd["threads"]; so.inter_op_num_threads = 1
    s = ort.InferenceSession(f"{cmd['work']}/{cmd['family']}.onnx", so, providers=["CPUExecutionProvider"])
    run = lambda: s.run(None, {"x": x})[0]
out = run(); best = float("inf")
for _ in range(cmd["iters"]):
    t0 = time.perf_counter(); run(); best = min(best, time.perf_counter() - t0)
if cmd.get("output"):
    out = out.float().numpy() if hasattr(out, "float") else out
    np.save(cmd["output"], np.ascontiguousarray(out, dtype=np.float32))
print(json.dumps({"ms_per_image": best * 1e3 / x.shape[0]}))
'''


def worker(cmd, env=None):
    out = subprocess.check_output([PY, "-c", WORKER, os.path.join(ROOT, "scripts"), json.dumps(cmd)], text=True,
                                  env=env)
    return [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]


def amx_available(bench, model_file, env):
    """Whether cycleserve's bf16 executor runs here (it needs AMX)."""
    argv = [bench, "forward", "--precision", "bf16", "--model", model_file, "--size", "8", "--iters", "1"]
    return subprocess.run(argv, capture_output=True, env=env, cwd=ROOT).returncode == 0


def ours(bench, model_file, size, batch, env, iters=3, files=None, precision="f32"):
    argv = [bench, "forward", "--precision", precision, "--model", model_file, "--size", str(size), "--batch",
            str(batch), "--iters", str(iters)]
    if files:
        argv += ["--input", files[0], "--output", files[1]]
    out = subprocess.check_output(argv, text=True, env=env, cwd=ROOT)
    return json.loads(out.strip().splitlines()[-1])["ms_per_image"]


def measure(bench, runtime, nets, family, size, batch, threads, env, iters=3, files=None):
    if runtime.startswith("cycleserve"):
        precision = "bf16" if runtime == "cycleserve_bf16" else "f32"
        return ours(bench, nets[family]["file"], size, batch, env, iters, files, precision)
    cmd = {"op": runtime, "work": WORK, "threads": threads, "nets": nets, "family": family, "size": size,
           "batch": batch, "iters": iters}
    if files:
        cmd.update(input=files[0], output=files[1])
    return worker(cmd, env)[-1]["ms_per_image"]


def check_agreement(bench, nets, threads, env):
    """Every runtime on one 256² input; fails unless the outputs agree."""
    print("\nOutputs against PyTorch f32 on one 256² input\n")
    print("| family | runtime | max abs | within ±1 level | max levels |")
    print("|---|---|---|---|---|")
    for family in nets:
        x = f"{WORK}/agree_in.npy"
        subprocess.check_call([PY, "-c", "import numpy as np; np.save('%s', np.random.default_rng(1).uniform("
                               "-1, 1, (1, 3, 256, 256)).astype(np.float32))" % x])
        outputs = {rt: f"{WORK}/agree_{family}_{rt}.npy" for rt in RUNTIMES}
        for rt, path in outputs.items():
            measure(bench, rt, nets, family, 256, 1, threads, env, iters=1, files=(x, path))
        reference = outputs.pop("torch")
        for row in worker({"op": "compare", "reference": reference, "outputs": outputs}):
            rt = row["runtime"]
            print(f"| {family} | {LABELS[rt]} | {row['max_abs']:.1e} | {100 * row['within_one_level']:.2f} % | "
                  f"{row['max_levels']} |")
            bound_ok = row["max_levels"] <= 16 if rt.endswith(("autocast", "bf16")) else row["max_abs"] < 1e-3
            if not bound_ok:
                sys.exit(f"{LABELS[rt]} disagrees with PyTorch f32 on {family}: {row}")


def peak_rss_kb(argv, env=None):
    out = subprocess.run(["/usr/bin/time", "-f", "%M"] + argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return int(out.stderr.strip().splitlines()[-1])


def model_header(path):
    """The metadata of a cycleserve model file (safetensors: a u64 length, then a JSON header)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))["__metadata__"]


def nets_to_measure(model):
    """Per family: the cycleserve file, and the weights the other runtimes load (None: random)."""
    if model is None:
        return {family: {"file": f"{WORK}/{family}.safetensors", "weights": None}
                for family in ("upsample", "transpose")}
    meta = model_header(model)
    weights = {"path": os.path.abspath(model), "ngf": int(meta["ngf"]), "n_blocks": int(meta["n_blocks"]),
               "norm_affine": meta["norm_affine"] == "true"}
    return {meta["family"]: {"file": model, "weights": weights}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", help="a cycleserve model file to measure instead of random published-size weights")
    args = ap.parse_args()
    ensure_venv()
    os.makedirs(WORK, exist_ok=True)
    server, bench = cycleserve_bin()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    nets = nets_to_measure(args.model)
    worker({"op": "prepare", "work": WORK, "threads": args.threads, "nets": nets}, env)
    if args.model is None:
        for family in nets:
            subprocess.check_call([server, "import", "--x2y", f"{WORK}/{family}.pth", "--domains", "x,y",
                                   "--out", nets[family]["file"]], stdout=subprocess.DEVNULL, env=env)
    if amx_available(bench, next(iter(nets.values()))["file"], env):
        RUNTIMES.insert(1, "cycleserve_bf16")
    check_agreement(bench, nets, args.threads, env)

    configs = [(f, s, b) for f in nets for s in (256, 512) for b in (1, 4)]
    best = {}
    for round_ in range(args.rounds):
        for family, size, batch in configs:
            results = {rt: measure(bench, rt, nets, family, size, batch, args.threads, env) for rt in RUNTIMES}
            for rt, ms in results.items():
                key = (family, size, batch, rt)
                best[key] = min(best.get(key, float("inf")), ms)
            print(f"round {round_ + 1}: {family} {size}² batch {batch}: " +
                  ", ".join(f"{rt} {ms:.0f} ms" for rt, ms in results.items()), file=sys.stderr)

    print(f"\nCPU inference, ms/image (best of {args.rounds} interleaved rounds × 3 calls), {args.threads} threads\n")
    print("| family | size | batch | " + " | ".join(LABELS[rt] for rt in RUNTIMES) +
          " | fastest cycleserve / fastest PyTorch | fastest cycleserve / ORT |")
    print("|---|---|---|" + "---|" * (len(RUNTIMES) + 2))
    for family, size, batch in configs:
        ms = {rt: best[(family, size, batch, rt)] for rt in RUNTIMES}
        fastest_torch = min(ms["torch"], ms["torch_autocast"], ms["torch_bf16"])
        fastest_ours = min(ms[rt] for rt in RUNTIMES if rt.startswith("cycleserve"))
        print(f"| {family} | {size}² | {batch} | " + " | ".join(f"{ms[rt]:.0f}" for rt in RUNTIMES) +
              f" | {fastest_ours / fastest_torch:.2f} | {fastest_ours / ms['ort']:.2f} |")

    image = os.path.join(WORK, "big.png")
    subprocess.check_call([PY, "-c", "import numpy as np, PIL.Image as I; I.fromarray(np.random.default_rng(0)"
                           f".integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save('{image}')"])
    family = next(iter(nets))
    print(f"\nPeak resident memory, one 1024×1024 image, {family} family (fresh process each, own library only)\n")
    print("| runtime | peak RSS |")
    print("|---|---|")
    rows = [(f"cycleserve translate, {precision} (whole CLI: decode, network, encode)",
             peak_rss_kb([server, "translate", "--device", "cpu", "--precision", precision, "--model",
                          nets[family]["file"], image, os.path.join(WORK, "big_out.png")], env))
            for precision in (["f32", "bf16"] if "cycleserve_bf16" in RUNTIMES else ["f32"])]
    for rt in [rt for rt in RUNTIMES if not rt.startswith("cycleserve")]:
        cmd = json.dumps({"op": rt, "work": WORK, "threads": args.threads, "nets": nets, "family": family,
                          "size": 1024, "batch": 1, "iters": 1})
        rows.append((f"{LABELS[rt]} (network only)", peak_rss_kb([PY, "-c", WORKER, os.path.join(ROOT, "scripts"), cmd],
                                                                 env)))
    for name, kb in rows:
        print(f"| {name} | {kb / 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
