#!/usr/bin/env python3
"""CPU training: cycletrain vs PyTorch (f32 eager, bf16 autocast), same recipe, same weights,
same images, same machine, same run.

    python3 benches/train_compare.py [--threads 2] [--rounds 2] [--steps 5]

Uses the venv of `benches/cpu_compare.py` (target/bench-venv, created with its pinned versions
if missing). The recipe is cycletrain's, step for step (`src/train/trainer.rs`, `networks.rs`):
CycleGAN with upsample-family generators G, F and PatchGAN discriminators D_X, D_Y (ndf 64),
batch 1; G and F updated together on LSGAN + cycle L1 ×10 + identity L1 ×0.5·10; image pools
of 50; D_X and D_Y updated together, each on (MSE(D(real), 1) + MSE(D(fake), 0)) / 2; two Adams
(lr 2e-4, betas 0.5, 0.999). Neither side freezes the discriminators during the generator
update (PyTorch-GAN's CycleGAN does not either).

cycletrain runs the step's six generator applications as three passes over stacked inputs and
each discriminator's real and fake images as one pass (`Networks::generator_losses`): the same
function, since every layer treats the samples of a batch apart. So PyTorch f32 runs twice, as
the recipe is written and batched the same way, and the ratio is taken to the faster of the two.

1. Writes one set of initial weights per architecture (conv weights N(0, 0.02), biases 0, as
   `Networks::init_normal`), named as cycletrain names them, and one pair of images per crop.
2. Agreement before timing. First the PyTorch recipe, run in f64, must replay the golden trace
   of `tests/train_golden.rs` (3 steps at 32², computed by PyTorch in double precision) to 1e-9.
   Then two steps from the shared weights and images in PyTorch f32 and in cycletrain: the 9
   losses of the first step (forward passes) must agree to a relative 1e-4, those of the second
   (gradients and Adam too) to 1e-3, or the script stops; so must the batched PyTorch f32.
   PyTorch bf16 autocast's deviation is shown, not checked.
3. Timing, runtimes interleaved round by round, each run a fresh process: s/iteration, the
   median over every timed step of every round (each run: 1 warm-up step, then --steps).
4. Peak resident memory (VmHWM) of a training process at 256² (published size), read by each
   process itself after a warm-up and one step.

Prints Markdown tables (progress goes to stderr).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_compare import PY, ROOT, ensure_venv  # noqa: E402  (one venv, one set of pins)

WORK = os.path.join(ROOT, "target", "bench-train")
RUNTIMES = ("cycletrain", "torch", "torch_batched", "torch_autocast")
LABELS = {"cycletrain": "cycletrain f32", "torch": "PyTorch f32", "torch_batched": "PyTorch f32, batched passes",
          "torch_autocast": "PyTorch bf16 autocast"}
LOSSES = ("G_total", "gan_G", "gan_F", "cycle_x", "cycle_y", "identity_x", "identity_y", "D_X", "D_Y")
# Relative bounds on cycletrain's losses against PyTorch f32. The first step's losses come from
# the shared initial weights alone; the second's also from the updates, where Adam turns float
# round-off in near-zero gradients into steps of up to lr, differently in each library.
TOLERANCE = (1e-4, 1e-3)
NDF = 64


def bench_bin():
    out = subprocess.check_output(["cargo", "bench", "--no-run", "--bench", "bench", "--message-format", "json"],
                                  cwd=ROOT, text=True)
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("executable") and msg.get("target", {}).get("name") == "bench":
            return msg["executable"]
    sys.exit("cargo did not report the bench executable")


# --- run inside the bench venv ------------------------------------------------------------------
WORKER = r'''
import json, random, statistics, sys, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[1])
from pytorch_reference import generator
cmd = json.loads(sys.argv[2])
torch.set_num_threads(cmd["threads"])


class Discriminator(nn.Module):
    """PyTorch-GAN's CycleGAN PatchGAN; Sequential indices 0, 2, 5, 8, 12 are the convolutions."""
    def __init__(self, ndf):
        super().__init__()
        def block(cin, cout, norm):
            return [nn.Conv2d(cin, cout, 4, stride=2, padding=1)] + ([nn.InstanceNorm2d(cout)] if norm else []) + \
                [nn.LeakyReLU(0.2, inplace=True)]
        self.model = nn.Sequential(*block(3, ndf, False), *block(ndf, 2 * ndf, True),
                                   *block(2 * ndf, 4 * ndf, True), *block(4 * ndf, 8 * ndf, True),
                                   nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(8 * ndf, 1, 4, padding=1))

    def forward(self, x):
        return self.model(x)


def networks():
    nets = {"G": generator("upsample", cmd["ngf"], cmd["blocks"], False),
            "F": generator("upsample", cmd["ngf"], cmd["blocks"], False),
            "D_X": Discriminator(cmd["ndf"]), "D_Y": Discriminator(cmd["ndf"])}
    return nets


class ImagePool:
    def __init__(self, capacity):
        self.capacity, self.images = capacity, []

    def query(self, batch):
        out = []
        for image in batch.detach():
            if len(self.images) < self.capacity:
                self.images.append(image); out.append(image)
            elif random.random() > 0.5:
                slot = random.randrange(self.capacity)
                out.append(self.images[slot]); self.images[slot] = image
            else:
                out.append(image)
        return torch.stack(out)


def peak_rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


if cmd["op"] == "init":
    torch.manual_seed(cmd["seed"])
    state = {}
    for name, net in networks().items():
        for key, value in net.state_dict().items():
            value = torch.empty_like(value).normal_(0, 0.02) if value.dim() == 4 else torch.zeros_like(value)
            state[f"{name}.{key}"] = value.contiguous()
    save_file(state, cmd["weights"])
    sys.exit(0)

if cmd["op"] == "golden":
    trace = load_file(cmd["trace"])
    save_file({k[len("init."):]: v.contiguous() for k, v in trace.items() if k.startswith("init.")}, cmd["weights"])
    for path, key in zip(cmd["inputs"], ("real_x", "real_y")):
        np.save(path, trace[key].numpy())
    sys.exit(0)

if cmd["op"] == "images":
    rng = np.random.default_rng(cmd["seed"])
    for path in cmd["inputs"]:
        np.save(path, rng.uniform(-1, 1, (1, 3, cmd["size"], cmd["size"])).astype(np.float32))
    sys.exit(0)

# op "train": cycletrain's step, from the given weights and images.
random.seed(0)
nets = networks()
weights = load_file(cmd["weights"])
for name, net in nets.items():
    net.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}, strict=True)
    net.train()
G, Fn, D_X, D_Y = nets["G"], nets["F"], nets["D_X"], nets["D_Y"]
x, y = (torch.from_numpy(np.load(p)) for p in cmd["inputs"])
autocast = cmd["precision"] == "autocast"
# f64 only replays the golden trace, which PyTorch computed in double precision.
loss_dtype = torch.float64 if cmd["precision"] == "f64" else torch.float32
if cmd["precision"] == "f64":
    for net in nets.values():
        net.double()
    x, y = x.double(), y.double()
if autocast:
    for net in nets.values():
        net.to(memory_format=torch.channels_last)
    x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
adam = dict(lr=2e-4, betas=(0.5, 0.999), eps=1e-8)
opt_g = torch.optim.Adam(list(G.parameters()) + list(Fn.parameters()), **adam)
opt_d = torch.optim.Adam(list(D_X.parameters()) + list(D_Y.parameters()), **adam)
pool_x, pool_y = ImagePool(50), ImagePool(50)
cycle, identity = 10.0, 0.5


def context():
    return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)


def lsgan(scores, target):
    return F.mse_loss(scores.to(loss_dtype), torch.full_like(scores, target, dtype=loss_dtype))


def l1(a, b):
    return F.l1_loss(a.to(loss_dtype), b)


def generators():
    """The six generator applications: as the recipe writes them, or (batched) as cycletrain runs
    them, in three passes over stacked inputs (`Networks::generator_losses`)."""
    if not cmd["batched"]:
        fake_y, fake_x = G(x), Fn(y)
        return fake_x, fake_y, Fn(fake_y), G(fake_x), Fn(x), G(y)
    n = x.shape[0]
    fake_x, idt_x = Fn(torch.cat([y, x])).split(n)
    fake_y, rec_y, idt_y = G(torch.cat([x, fake_x, y])).split(n)
    return fake_x, fake_y, Fn(fake_y), rec_y, idt_x, idt_y


def discriminator_loss(D, real, fake):
    if cmd["batched"]:
        real_scores, fake_scores = D(torch.cat([real, fake])).split(real.shape[0])
    else:
        real_scores, fake_scores = D(real), D(fake)
    return (lsgan(real_scores, 1.0) + lsgan(fake_scores, 0.0)) * 0.5


def step():
    with context():
        fake_x, fake_y, rec_x, rec_y, idt_x, idt_y = generators()
        gan_g, gan_f = lsgan(D_Y(fake_y), 1.0), lsgan(D_X(fake_x), 1.0)
        cycle_x, cycle_y = l1(rec_x, x) * cycle, l1(rec_y, y) * cycle
        identity_x = l1(idt_x, x) * (cycle * identity)
        identity_y = l1(idt_y, y) * (cycle * identity)
        total = (gan_g + gan_f) + (cycle_x + cycle_y) + (identity_x + identity_y)
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()
    pooled_x, pooled_y = pool_x.query(fake_x), pool_y.query(fake_y)
    with context():
        d_x, d_y = discriminator_loss(D_X, x, pooled_x), discriminator_loss(D_Y, y, pooled_y)
    opt_d.zero_grad(set_to_none=True)
    (d_x + d_y).backward()
    opt_d.step()
    values = (total, gan_g, gan_f, cycle_x, cycle_y, identity_x, identity_y, d_x, d_y)
    return dict(zip(cmd["loss_names"], (v.item() for v in values)))


seconds, losses = [], []
for _ in range(cmd["steps"] + 1):
    t0 = time.perf_counter()
    losses.append(step())
    seconds.append(time.perf_counter() - t0)
print(json.dumps({"s_per_iteration": statistics.median(seconds[1:]), "step_seconds": seconds, "losses": losses,
                  "peak_rss_kib": peak_rss_kib()}))
'''


def worker(cmd, env):
    cmd = dict(cmd, loss_names=LOSSES)
    out = subprocess.check_output([PY, "-c", WORKER, os.path.join(ROOT, "scripts"), json.dumps(cmd)], text=True,
                                  env=env)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


class Setup:
    """Weights per architecture and images per crop, written once and shared by every runtime."""

    def __init__(self, bench, threads, env, archs, sizes):
        self.bench, self.threads, self.env = bench, threads, env
        self.weights_of = {arch: self.weights(*arch) for arch in archs}
        self.images_of = {size: self.images(size) for size in sizes}

    def weights(self, ngf, blocks):
        path = os.path.join(WORK, f"init_ngf{ngf}_blocks{blocks}.safetensors")
        worker({"op": "init", "seed": 0, "weights": path, "ngf": ngf, "blocks": blocks, "ndf": NDF,
                "threads": self.threads}, self.env)
        return path

    def images(self, size):
        paths = [os.path.join(WORK, f"real_{d}_{size}.npy") for d in ("x", "y")]
        worker({"op": "images", "seed": 1, "size": size, "inputs": paths, "threads": self.threads}, self.env)
        return paths

    def run(self, runtime, arch, size, steps):
        """One fresh process: a warm-up step, then `steps` timed ones."""
        ngf, blocks = arch
        weights, inputs = self.weights_of[arch], self.images_of[size]
        if runtime == "cycletrain":
            out = subprocess.check_output(
                [self.bench, "train", "--ngf", str(ngf), "--blocks", str(blocks), "--steps", str(steps),
                 "--weights", weights, "--inputs", *inputs, "--json"], text=True, env=self.env, cwd=ROOT)
            return json.loads(out.strip().splitlines()[-1])
        precision = {"torch": "f32", "torch_batched": "f32", "torch_autocast": "autocast"}[runtime]
        return worker({"op": "train", "precision": precision, "batched": runtime == "torch_batched",
                       "weights": weights, "inputs": inputs, "ngf": ngf, "blocks": blocks, "ndf": NDF,
                       "steps": steps, "threads": self.threads}, self.env)


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def check_recipe(threads, env):
    """The PyTorch recipe, run in f64, must replay the golden trace `tests/train_golden.rs`
    checks cycletrain against (the trace was computed in double precision)."""
    golden = os.path.join(ROOT, "tests", "fixtures", "golden")
    with open(os.path.join(golden, "manifest.json")) as f:
        trace = json.load(f)["train_step"]
    weights = os.path.join(WORK, "golden_init.safetensors")
    inputs = [os.path.join(WORK, f"golden_real_{d}.npy") for d in ("x", "y")]
    worker({"op": "golden", "trace": os.path.join(golden, "train_step.safetensors"), "weights": weights,
            "inputs": inputs, "threads": threads}, env)
    run = worker({"op": "train", "precision": "f64", "batched": False, "weights": weights, "inputs": inputs,
                  "ngf": trace["ngf"],
                  "blocks": trace["n_blocks"], "ndf": trace["ndf"], "steps": len(trace["losses"]) - 1,
                  "threads": threads}, env)
    worst = max(relative(ours[n], ref[n]) for ours, ref in zip(run["losses"], trace["losses"]) for n in LOSSES)
    if not worst <= 1e-9:
        sys.exit(f"the PyTorch recipe does not replay the golden training trace: relative difference {worst:.1e}")
    print(f"PyTorch recipe (f64) against the golden training trace, {len(trace['losses'])} steps: largest relative "
          f"difference over the losses {worst:.1e}")


def check_agreement(setup, arch, size):
    """Two steps in each runtime from the same start; stops unless cycletrain matches PyTorch f32."""
    runs = {rt: setup.run(rt, arch, size, steps=1)["losses"] for rt in RUNTIMES}
    reference = runs["torch"]
    print(f"\nLosses of the first two steps against PyTorch f32: upsample ngf {arch[0]}, {arch[1]} blocks, "
          f"ndf {NDF}, {size}², same initial weights and images (largest relative difference over the 9 losses)\n")
    print("| runtime | step 1 | step 2 | worst loss |")
    print("|---|---|---|---|")
    failures = []
    for rt in ("cycletrain", "torch_batched", "torch_autocast"):
        worst = []
        for step, (ours, theirs) in enumerate(zip(runs[rt], reference)):
            name = max(LOSSES, key=lambda n: relative(ours[n], theirs[n]))
            worst.append((relative(ours[name], theirs[name]), name))
            if rt != "torch_autocast":
                failures += [f"step {step + 1} {n}: {LABELS[rt]} {ours[n]!r}, PyTorch f32 {theirs[n]!r}"
                             for n in LOSSES if not relative(ours[n], theirs[n]) <= TOLERANCE[step]]
        print(f"| {LABELS[rt]} | {worst[0][0]:.1e} | {worst[1][0]:.1e} | {max(worst)[1]} |")
    print("\nFirst-step losses (PyTorch f32): " + ", ".join(f"{n} {reference[0][n]:.6g}" for n in LOSSES))
    if failures:
        sys.exit(f"losses disagree with PyTorch f32 (bounds: step 1 {TOLERANCE[0]:g}, step 2 "
                 f"{TOLERANCE[1]:g} relative):\n  " +
                 "\n  ".join(failures))


def arch_arg(text):
    ngf, blocks = text.split("x")
    return int(ngf), int(blocks)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run, after one warm-up step")
    ap.add_argument("--archs", type=lambda s: [arch_arg(a) for a in s.split(",")], default=[(64, 9), (32, 6)],
                    help="generators as NGFxBLOCKS, comma-separated (default 64x9,32x6)")
    ap.add_argument("--size", type=int, default=128, help="crop of the timed runs")
    ap.add_argument("--memory-size", type=int, default=256, help="crop of the peak-memory runs (0: skip them)")
    args = ap.parse_args()
    ensure_venv()
    os.makedirs(WORK, exist_ok=True)
    bench = bench_bin()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    sizes = {args.size} | ({args.memory_size} if args.memory_size else set())
    setup = Setup(bench, args.threads, env, args.archs, sizes)

    print(f"Load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")
    check_recipe(args.threads, env)
    check_agreement(setup, args.archs[0], args.size)

    steps = {}
    for round_ in range(args.rounds):
        for arch in args.archs:
            line = []
            for rt in RUNTIMES:
                run = setup.run(rt, arch, args.size, args.steps)
                steps.setdefault((arch, rt), []).extend(run["step_seconds"][1:])
                line.append(f"{rt} {run['s_per_iteration']:.2f} s")
            print(f"round {round_ + 1}: ngf {arch[0]}, {arch[1]} blocks: " + ", ".join(line), file=sys.stderr)

    print(f"\nTraining step, s/iteration (median of {args.rounds} interleaved rounds × {args.steps} steps, each "
          f"run after 1 warm-up step), {args.size}², batch 1, ndf {NDF}, {args.threads} threads\n")
    print("| generator | " + " | ".join(LABELS[rt] for rt in RUNTIMES) +
          " | cycletrain / PyTorch f32 (best of the two) | cycletrain / PyTorch bf16 |")
    print("|---|" + "---|" * (len(RUNTIMES) + 2))
    for arch in args.archs:
        s = {rt: statistics.median(steps[(arch, rt)]) for rt in RUNTIMES}
        best_f32 = min(s["torch"], s["torch_batched"])
        print(f"| upsample, ngf {arch[0]}, {arch[1]} blocks | " + " | ".join(f"{s[rt]:.2f}" for rt in RUNTIMES) +
              f" | {s['cycletrain'] / best_f32:.2f} | {s['cycletrain'] / s['torch_autocast']:.2f} |")

    if args.memory_size:
        arch = args.archs[0]
        print(f"\nPeak resident memory (VmHWM) of a training process, upsample ngf {arch[0]}, {arch[1]} blocks, "
              f"{args.memory_size}², after a warm-up step and one more (fresh process each)\n")
        print("| runtime | peak RSS |")
        print("|---|---|")
        for rt in ("cycletrain", "torch"):
            run = setup.run(rt, arch, args.memory_size, steps=1)
            print(f"| {LABELS[rt]} | {run['peak_rss_kib'] / 1024:.0f} MiB |")


    print(f"\nLoad average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
