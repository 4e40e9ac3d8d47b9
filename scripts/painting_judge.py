#!/usr/bin/env python3
"""A held-out judge of "is this a painting": logistic regression on colour and texture statistics.

Fitted on the training split only (trainA = photos, label 0; trainB = paintings, label 1), so the
held-out images and every translated output are new to it. models/README.md reports its scores.

Needs numpy and Pillow only:  python3 -m venv venv && venv/bin/pip install numpy pillow

    painting_judge.py fit --photos data/flowers/trainA --paintings data/flowers/trainB \
        --out models/judge/judge.json
    painting_judge.py score [--judge J] [--model NAME --model-file F --direction D --input SET] FOLDER...
        # one JSON line per folder: n, fraction called painting (p >= 0.5), mean probability
    painting_judge.py robustness [--judge J] FOLDER...
        # the same folders re-encoded (PNG, JPEG q95/q75), resized down and up, and shifted:
        # how many verdicts each change flips

Every image is judged at 256×256 RGB (the size of all the data and of the translated outputs;
other sizes are resized first). Features and fitting are deterministic; the cross-validation
folds come from a fixed seed.
"""
import argparse
import hashlib
import io
import json
import os
import sys

import numpy as np
from PIL import Image

SIDE = 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LAMBDAS = [10.0**e for e in (-4, -3.5, -3, -2.5, -2, -1.5, -1, -0.5, 0)]
FOLDS = 5
SEED = 19


# ---- features ----------------------------------------------------------------------------------


def load_rgb(path):
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (SIDE, SIDE):
            im = im.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        return np.asarray(im)


def to_lab(rgb):
    """sRGB in [0, 1] to CIE Lab (D65)."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = lin @ np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
        dtype=np.float32,
    ).T
    xyz /= np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return 116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])


def hue_saturation_value(rgb):
    hi, lo = rgb.max(2), rgb.min(2)
    chroma = hi - lo
    sat = chroma / np.maximum(hi, 1e-6)
    safe = np.maximum(chroma, 1e-6)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return hue / 6, sat, hi, chroma


def halve(img):
    """2×2 box average: the next coarser scale."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    img = img[:h, :w]
    return 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])


def gradient_magnitude(lum):
    gy = np.zeros_like(lum)
    gx = np.zeros_like(lum)
    gy[1:-1] = 0.5 * (lum[2:] - lum[:-2])
    gx[:, 1:-1] = 0.5 * (lum[:, 2:] - lum[:, :-2])
    return np.hypot(gx, gy)[1:-1, 1:-1]


def block_std(lum, block):
    h, w = lum.shape[0] // block * block, lum.shape[1] // block * block
    blocks = lum[:h, :w].reshape(h // block, block, w // block, block)
    return blocks.std(axis=(1, 3))


def fractions(values, edges):
    """Histogram as fractions of all values, with the outer bins open-ended."""
    counts = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
    return counts / max(values.size, 1)


def skew(values):
    centred = values - values.mean()
    sd = centred.std()
    return float((centred**3).mean() / sd**3) if sd > 1e-6 else 0.0


def features(rgb8):
    """Named statistics of one 256² RGB image: colour, paper background, edges, texture, layout."""
    rgb = rgb8.astype(np.float32) / 255
    hue, sat, val, chroma = hue_saturation_value(rgb)
    lightness, a, b = to_lab(rgb)
    lum = lightness / 100
    out = {}

    # Colour: Lab moments, lightness / saturation / value histograms, chroma-weighted hue histogram.
    out.update({"L_mean": lum.mean(), "L_std": lum.std(), "L_skew": skew(lum)})
    out.update({"a_mean": a.mean() / 50, "a_std": a.std() / 50, "b_mean": b.mean() / 50, "b_std": b.std() / 50})
    ab = np.hypot(a, b) / 50
    out.update({"labchroma_mean": ab.mean(), "labchroma_std": ab.std()})
    for name, channel in (("L", lum), ("S", sat), ("V", val)):
        for i, frac in enumerate(fractions(channel, np.linspace(0, 1, 9))):
            out[f"{name}_hist{i}"] = frac
    weights = chroma.ravel()
    hue_hist = np.bincount(np.minimum((hue.ravel() * 12).astype(int), 11), weights=weights, minlength=12)
    hue_hist /= max(weights.sum(), 1e-6)
    out.update({f"hue_hist{i}": h for i, h in enumerate(hue_hist)})
    out.update({"S_mean": sat.mean(), "S_std": sat.std(), "S_p90": np.percentile(sat, 90)})
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    out["colourfulness"] = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    quantised = (rgb8 >> 5).astype(np.int32)
    codes = (quantised[..., 0] << 6) | (quantised[..., 1] << 3) | quantised[..., 2]
    used = np.bincount(codes.ravel(), minlength=512) / codes.size
    used = used[used > 0]
    out["palette_entropy"] = float(-(used * np.log2(used)).sum()) / 9

    # Paper: pale unsaturated background, near-white, dark ink, greys.
    out["paper"] = np.mean((sat < 0.2) & (val > 0.7))
    out["near_white"] = np.mean((sat < 0.08) & (val > 0.92))
    out["dark"] = np.mean(val < 0.2)
    out["grey"] = np.mean(sat < 0.1)
    out["warm_paper"] = np.mean((sat > 0.05) & (sat < 0.35) & (val > 0.6) & (hue > 0.03) & (hue < 0.2))

    # Edges and texture at 128², 64² and 32² (2×2 box averages): gradient-magnitude histograms,
    # edge density, and the spread of 8×8-block standard deviations; brush strokes and ink lines
    # against a photo's smooth shading and busy foliage. The 256² scale is left out on purpose:
    # there JPEG blocks, sensor noise and a generator's softness dominate, and a judge reading
    # them would score sharpness, not style (a painting resized to 128² and back stays a painting).
    edges = np.array([0, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 1.0])
    std_edges = np.array([0, 0.01, 0.02, 0.04, 0.08, 0.16, 1.0])
    level = halve(lum)
    grad_128 = gradient_magnitude(level)
    for scale in (2, 4, 8):
        grad = gradient_magnitude(level)
        for i, frac in enumerate(fractions(grad, edges)):
            out[f"grad{scale}_hist{i}"] = frac
        out[f"grad{scale}_mean"] = grad.mean()
        out[f"grad{scale}_p95"] = np.percentile(grad, 95)
        stds = block_std(level, 8)
        for i, frac in enumerate(fractions(stds, std_edges)):
            out[f"blockstd{scale}_hist{i}"] = frac
        out[f"blockstd{scale}_logmean"] = np.log(stds + 1e-3).mean()
        level = halve(level)

    # Where the edges are (at 128²): ink lines are dark and grey, a photo's edges are coloured.
    strong = grad_128 > np.percentile(grad_128, 90)
    inner = (slice(1, -1), slice(1, -1))
    out["edge_V"] = halve(val)[inner][strong].mean()
    out["edge_S"] = halve(sat)[inner][strong].mean()

    # Layout: a painting's border is mostly paper; a photo's is background scene.
    border = np.ones(lum.shape, bool)
    m = SIDE // 8
    border[m:-m, m:-m] = False
    out["border_V"] = val[border].mean()
    out["border_S"] = sat[border].mean()
    out["centre_minus_border_S"] = sat[~border].mean() - sat[border].mean()
    out["border_grad"] = grad_128[border[::2, ::2][inner]].mean()
    return {k: float(v) for k, v in out.items()}


def image_paths(folder):
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        sys.exit(f"error: no image files in {folder}")
    return [os.path.join(folder, n) for n in names]


def feature_matrix(images):
    """Rows of features for (name, rgb8) pairs, and the feature names."""
    rows, names = [], None
    for _, rgb8 in images:
        f = features(rgb8)
        names = names or list(f)
        rows.append([f[n] for n in names])
    return np.array(rows, dtype=np.float64), names


def read_folder(folder):
    out = []
    for path in image_paths(folder):
        try:
            out.append((path, load_rgb(path)))
        except OSError as e:
            sys.exit(f"error: cannot read {path}: {e}")
    return out


# ---- logistic regression -----------------------------------------------------------------------


def fit_logistic(x, y, lam, iterations=50):
    """L2-penalised logistic regression by Newton's method: minimises
    mean log-loss + lam/2 · |w|² (the bias is not penalised). x is standardised, n × d."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    penalty = np.full(d + 1, lam)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = sigmoid(xb @ theta)
        grad = xb.T @ (p - y) / n + penalty * theta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / n + np.diag(penalty) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta[:-1], theta[-1]


def sigmoid(z):
    return 1 / (1 + np.exp(-np.clip(z, -40, 40)))


def log_loss(p, y):
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def standardiser(x):
    mean = x.mean(0)
    std = x.std(0)
    return mean, np.where(std > 1e-12, std, 1.0)


def stratified_folds(y, k, seed):
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        fold[rng.permutation(idx)] = np.arange(len(idx)) % k
    return fold


def cross_validate(x, y):
    """Mean held-out log-loss and accuracy per lambda over stratified folds of the training data;
    each fold standardises with its own training part's statistics."""
    fold = stratified_folds(y, FOLDS, SEED)
    results = []
    for lam in LAMBDAS:
        losses, correct = [], 0
        for k in range(FOLDS):
            tr, va = fold != k, fold == k
            mean, std = standardiser(x[tr])
            w, b = fit_logistic((x[tr] - mean) / std, y[tr], lam)
            p = sigmoid((x[va] - mean) / std @ w + b)
            losses.append(log_loss(p, y[va]) * va.sum())
            correct += int(((p >= 0.5) == (y[va] == 1)).sum())
        results.append({"lambda": lam, "log_loss": sum(losses) / len(y), "accuracy": correct / len(y)})
    return results


# ---- the judge file ----------------------------------------------------------------------------


class Judge:
    def __init__(self, spec):
        self.names = spec["features"]
        self.mean = np.array(spec["mean"])
        self.std = np.array(spec["std"])
        self.w = np.array(spec["weights"])
        self.b = spec["bias"]

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls(json.load(f))

    def probabilities(self, images):
        x, names = feature_matrix(images)
        if names != self.names:
            sys.exit("error: the judge file was fitted on other features than this script computes; refit it")
        return sigmoid((x - self.mean) / self.std @ self.w + self.b)


def fit(args):
    photos, paintings = read_folder(args.photos), read_folder(args.paintings)
    x, names = feature_matrix(photos + paintings)
    y = np.r_[np.zeros(len(photos)), np.ones(len(paintings))]
    cv = cross_validate(x, y)
    best = min(cv, key=lambda r: r["log_loss"])
    mean, std = standardiser(x)
    w, b = fit_logistic((x - mean) / std, y, best["lambda"])
    train_p = sigmoid((x - mean) / std @ w + b)
    spec = {
        "what": "photo (0) vs painting (1): L2 logistic regression on standardised colour/texture "
        "statistics, by scripts/painting_judge.py",
        "fitted_on": {"photos": os.path.basename(os.path.normpath(args.photos)), "photo_count": len(photos),
                      "paintings": os.path.basename(os.path.normpath(args.paintings)),
                      "painting_count": len(paintings)},
        "cross_validation": {"folds": FOLDS, "seed": SEED, "chosen_by": "lowest mean held-out log-loss",
                             "results": [{k: round(v, 5) for k, v in r.items()} for r in cv]},
        "lambda": best["lambda"],
        "training_accuracy": round(float(((train_p >= 0.5) == (y == 1)).mean()), 5),
        "features": names,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "weights": w.tolist(),
        "bias": float(b),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(spec, f, indent=1)
        f.write("\n")
    for r in cv:
        print(f"lambda {r['lambda']:.0e}: CV log-loss {r['log_loss']:.4f}, accuracy {r['accuracy']:.4f}", file=sys.stderr)
    print(f"chose lambda {best['lambda']:.0e}; training accuracy {spec['training_accuracy']:.4f}", file=sys.stderr)


def verdict(p):
    return {"n": len(p), "called_painting": round(float((p >= 0.5).mean()), 4),
            "mean_probability": round(float(p.mean()), 4)}


def sha256_prefix(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def score(args):
    judge = Judge.load(args.judge)
    for folder in args.folders:
        row = {}
        if args.model:
            row["model"] = args.model
        if args.model_file:
            row["model_sha256"] = sha256_prefix(args.model_file)
        if args.direction:
            row["direction"] = args.direction
        row["input"] = args.input or os.path.basename(os.path.normpath(folder))
        row.update(verdict(judge.probabilities(read_folder(folder))))
        print(json.dumps(row), flush=True)


def reencode(rgb8, fmt, **options):
    buf = io.BytesIO()
    Image.fromarray(rgb8).save(buf, fmt, **options)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def resized(rgb8, side):
    small = Image.fromarray(rgb8).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(small.resize((SIDE, SIDE), Image.Resampling.BICUBIC))


def shifted(rgb8, by):
    """Moves the 8×8 JPEG block grid: crops `by` pixels off the top and left, mirrors them back."""
    return np.pad(rgb8[by:, by:], ((0, by), (0, by), (0, 0)), mode="reflect")


CHANGES = {
    "png": lambda im: reencode(im, "PNG"),
    "jpeg_q95": lambda im: reencode(im, "JPEG", quality=95),
    "jpeg_q75": lambda im: reencode(im, "JPEG", quality=75),
    "resize_128_and_back": lambda im: resized(im, 128),
    "resize_192_and_back": lambda im: resized(im, 192),
    "shift_4px": lambda im: shifted(im, 4),
}


def robustness(args):
    judge = Judge.load(args.judge)
    for folder in args.folders:
        images = read_folder(folder)
        base = judge.probabilities(images)
        name = os.path.basename(os.path.normpath(folder))
        print(json.dumps({"input": name, "change": "none", **verdict(base)}), flush=True)
        for change, apply in CHANGES.items():
            p = judge.probabilities([(path, apply(rgb8)) for path, rgb8 in images])
            flipped = float(((p >= 0.5) != (base >= 0.5)).mean())
            print(json.dumps({"input": name, "change": change, **verdict(p), "verdicts_flipped": round(flipped, 4),
                              "max_probability_change": round(float(np.abs(p - base).max()), 4)}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="fit the judge on training photos and paintings")
    p.add_argument("--photos", required=True, help="folder of training photos (label 0)")
    p.add_argument("--paintings", required=True, help="folder of training paintings (label 1)")
    p.add_argument("--out", default="models/judge/judge.json")
    p = sub.add_parser("score", help="fraction of each folder's images called painting")
    p.add_argument("--judge", default="models/judge/judge.json")
    p.add_argument("--model", help="name of the model whose outputs these are (recorded in the line)")
    p.add_argument("--model-file", help="that model's file: the line records its sha256 (first 16 hex)")
    p.add_argument("--direction", help="photo2painting or painting2photo (recorded in the line)")
    p.add_argument("--input", help="name of the image set translated into these folders (recorded in the line; "
                   "default: each folder's own name)")
    p.add_argument("folders", nargs="+")
    p = sub.add_parser("robustness", help="how re-encoding and resizing change the verdicts")
    p.add_argument("--judge", default="models/judge/judge.json")
    p.add_argument("folders", nargs="+")
    args = parser.parse_args()
    {"fit": fit, "score": score, "robustness": robustness}[args.command](args)


if __name__ == "__main__":
    main()
