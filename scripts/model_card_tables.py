#!/usr/bin/env python3
"""Generates the tables of models/README.md from the small files committed next to it.

    model_card_tables.py                          # print every generated section
    model_card_tables.py --write models/README.md # replace the sections in the card
    model_card_tables.py --check models/README.md # exit 1 if the card differs from the files

Sections sit between `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->`:
- `judge`: the painting judge (models/judge/: judge.json, scores.jsonl, robustness.jsonl, from
  scripts/painting_judge.py and scripts/judge_model.sh) and issue 19's reference figures;
- `selection`, where models/judge/selection.jsonl exists (scripts/select_checkpoint.sh): a run's
  candidate checkpoints and the one chosen by the judge on training images;
- `run RUN` for each models/runs/RUN/ holding a cycletrain run's eval.jsonl and losses.jsonl
  (or losses.jsonl.gz): held-out cycle/identity errors and a training summary.
--write and --check need the card to have the markers of every section; where they go is up to
the card. Standard library only; tests: python3 -m unittest discover -s scripts -p 'test_*.py'
"""
import argparse
import difflib
import gzip
import json
import os
import re
import sys

# Issue 19's figures, from an independent classifier the issue does not describe: fraction of the
# held-out photos translated to paintings called painting, and of the held-out paintings
# translated to photos still called painting.
ISSUE_REFERENCE = [
    ("identity (untranslated)", 0.07, 0.93),
    ("the default model when issue 19 was filed (ngf 32, 3,108 steps)", 0.76, 0.62),
    ("the GPU recipe (PyTorch, ngf 64, 9 blocks)", 0.97, 0.615),
]
# Each direction's own held-out set, and the other domain's set (the identity-mapping control).
OWN_INPUT = {"photo2painting": "testA", "painting2photo": "testB"}
OTHER_INPUT = {"photo2painting": "testB", "painting2photo": "testA"}
WINDOW = 250
# (header, losses.jsonl key, decimals)
LOSS_COLUMNS = [
    ("G total", "G_total", 2), ("gan_G", "gan_G", 3), ("gan_F", "gan_F", 3), ("cycle_x", "cycle_x", 2),
    ("cycle_y", "cycle_y", 2), ("identity_x", "identity_x", 2), ("identity_y", "identity_y", 2),
    ("D_X", "D_X", 3), ("D_Y", "D_Y", 3),
]
ROBUSTNESS_NAMES = {
    "png": "re-encoded as PNG (lossless)",
    "jpeg_q95": "re-encoded as JPEG, quality 95",
    "jpeg_q75": "re-encoded as JPEG, quality 75",
    "resize_128_and_back": "resized to 128² and back to 256²",
    "resize_192_and_back": "resized to 192² and back to 256²",
    "shift_4px": "shifted 4 px (moves the JPEG block grid)",
}


def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def steps(n):
    return f"{n:,}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def called(row):
    """'0.39 (24/61)': the fraction called painting and the count behind it."""
    count = round(row["called_painting"] * row["n"])
    return f"{row['called_painting']:.2f} ({count}/{row['n']})"


# ---- the judge ---------------------------------------------------------------------------------


def judge_section(judge_dir):
    with open(os.path.join(judge_dir, "judge.json")) as f:
        judge = json.load(f)
    scores = read_jsonl(os.path.join(judge_dir, "scores.jsonl"))
    robustness = read_jsonl(os.path.join(judge_dir, "robustness.jsonl"))
    models = list(dict.fromkeys(r["model"] for r in scores))
    if "identity" in models:
        models.remove("identity")
        models.insert(0, "identity")

    def find(model, direction, inputs):
        for r in scores:
            if r["model"] == model and r["direction"] == direction and r["input"] == inputs[direction]:
                return r
        return None

    cv = judge["cross_validation"]
    chosen = next(r for r in cv["results"] if r["lambda"] == round(judge["lambda"], 5))
    fitted = judge["fitted_on"]
    out = [
        f"The judge: L2-penalised logistic regression on {len(judge['features'])} standardised colour "
        f"and texture statistics, fitted on the training split only ({steps(fitted['photo_count'])} "
        f"photos of `{fitted['photos']}` against {steps(fitted['painting_count'])} paintings of "
        f"`{fitted['paintings']}`); penalty λ = {judge['lambda']:g} chosen by {cv['folds']}-fold "
        f"cross-validation on that split ({cv['chosen_by']}; cross-validated accuracy "
        f"{chosen['accuracy']:.3f}). An image is called a painting when the judge's probability is "
        "at least 0.5.",
        "",
        "Held-out images called painting (fraction, count) and the judge's mean probability of "
        "painting. Photo → painting should be called painting (higher is better); painting → photo "
        "should not (lower is better). Identity is the untranslated held-out images: the judge's own "
        "accuracy.",
        "",
    ]
    rows = []
    for model in models:
        cells = []
        for direction in ("photo2painting", "painting2photo"):
            r = find(model, direction, OWN_INPUT)
            cells += [called(r), f"{r['mean_probability']:.2f}"] if r else ["–", "–"]
        label = "identity (untranslated)" if model == "identity" else model
        sha = next((r["model_sha256"] for r in scores if r["model"] == model and "model_sha256" in r), None)
        rows.append([label + (f" (`{sha}`)" if sha else "")] + cells)
    for label, x2y, y2x in ISSUE_REFERENCE:
        rows.append([f"*issue 19, another classifier:* {label}", f"*{x2y}*", "", f"*{y2x}*", ""])
    out.append(table(["model (sha256 of the file, first 16 hex)", "photo → painting: called painting",
                      "mean p", "painting → photo: called painting", "mean p"], rows))

    controls = []
    for model in models:
        g, f = find(model, "photo2painting", OTHER_INPUT), find(model, "painting2photo", OTHER_INPUT)
        if g and f:
            controls.append([model, called(g), f"{g['mean_probability']:.2f}", called(f),
                             f"{f['mean_probability']:.2f}"])
    if controls:
        out += [
            "",
            "Control, each generator on its own domain's held-out images (the identity mapping): "
            "paintings through photo → painting should stay paintings, photos through painting → "
            "photo should stay photos. Scores near the identity row mean the judge does not call an "
            "image a photo or a painting merely because a network made it.",
            "",
            table(["model", "painting → painting: called painting", "mean p",
                   "photo → photo: called painting", "mean p"], controls),
        ]

    by_change = {}
    for r in robustness:
        by_change.setdefault(r["change"], {})[r["input"]] = r
    base = by_change.pop("none", {})
    rows = []
    for change, per_input in by_change.items():
        a, b = per_input.get("testA"), per_input.get("testB")
        if not (a and b):
            continue
        rows.append([ROBUSTNESS_NAMES.get(change, change), called(a), f"{a['verdicts_flipped']:.3f}", called(b),
                     f"{b['verdicts_flipped']:.3f}",
                     f"{max(a['max_probability_change'], b['max_probability_change']):.2f}"])
    if rows:
        a, b = base.get("testA"), base.get("testB")
        rows.insert(0, ["as stored (256² JPEG)", called(a), "", called(b), "", ""])
        out += [
            "",
            "Robustness: the held-out images (256² JPEG) changed as translated outputs differ from "
            "them (PNG, a network's softness) and judged again.",
            "",
            table(["held-out images", "photos called painting", "verdicts flipped",
                   "paintings called painting", "verdicts flipped", "largest change of p"], rows),
        ]
    return "\n".join(out)


def selection_section(judge_dir):
    """The candidates of scripts/select_checkpoint.sh and the one chosen: the most training photos
    translated to paintings called painting (then the higher mean probability, then the later
    candidate). The held-out columns are shown, not used."""
    rows = read_jsonl(os.path.join(judge_dir, "selection.jsonl"))
    names = list(dict.fromkeys(r["model"] for r in rows))

    def find(name, direction, prefix):
        return next((r for r in rows if r["model"] == name and r["direction"] == direction
                     and r["input"].startswith(prefix)), None)

    def rank(item):
        index, name = item
        r = find(name, "photo2painting", "train")
        if r is None:
            raise SystemExit(f"error: selection.jsonl has no training-photo verdicts for '{name}'")
        return (r["called_painting"], r["mean_probability"], index)

    chosen = max(enumerate(names), key=rank)[1]
    out = [
        "Candidates, judged on every 10th training image in name order (the photos through "
        "photo → painting, the paintings through painting → photo), which chose the model, and on "
        "the held-out images, which did not:",
        "",
    ]
    body = []
    for name in names:
        cells = [name]
        for direction, prefix in (("photo2painting", "train"), ("painting2photo", "train"),
                                  ("photo2painting", "test"), ("painting2photo", "test")):
            r = find(name, direction, prefix)
            cells += [called(r), f"{r['mean_probability']:.2f}"] if r else ["–", "–"]
        if name == chosen:
            cells = [f"**{c}**" for c in cells]
            cells[0] = f"**{name} (chosen)**"
        body.append(cells)
    out.append(table(["candidate", "training photos → painting: called painting", "mean p",
                      "training paintings → photo: called painting", "mean p",
                      "held-out photo → painting", "mean p", "held-out painting → photo", "mean p"], body))
    return "\n".join(out)


# ---- a training run ----------------------------------------------------------------------------


def lr_text(lr):
    """'2e-4', '1.5e-4', '6.7e-5': two significant digits, as a decaying schedule needs."""
    return "–" if lr is None else f"{lr:.1e}".replace(".0e", "e").replace("e-0", "e-")


def run_section(run_dir):
    losses_path = next((os.path.join(run_dir, n) for n in ("losses.jsonl", "losses.jsonl.gz")
                        if os.path.exists(os.path.join(run_dir, n))), None)
    losses = read_jsonl(losses_path) if losses_path else []
    lr_at = {r["step"]: r["lr"] for r in losses}
    evals = {}
    eval_path = os.path.join(run_dir, "eval.jsonl")
    if os.path.exists(eval_path):
        for r in read_jsonl(eval_path):
            evals[r["step"]] = r  # a resumed run may evaluate a step again: the last one counts
    out = []
    if losses:
        last = losses[-1]
        out += [
            f"{steps(last['step'])} steps (the last in epoch {last['epoch'] + 1}), "
            f"{last['seconds'] / 3600:.1f} h of training (`losses.jsonl`). Losses, means over "
            f"{WINDOW} steps (cycle and identity terms include their weights):",
            "",
        ]
        starts = sorted({1} | set(range(1001, last["step"] - WINDOW + 1, 1000)))
        windows = [(s, s + WINDOW - 1) for s in starts if s + WINDOW - 1 <= last["step"]]
        final = (max(1, last["step"] - WINDOW + 1), last["step"])
        if final not in windows:
            windows.append(final)
        rows = []
        for lo, hi in windows:
            part = [r for r in losses if lo <= r["step"] <= hi]
            cells = [f"{steps(lo)}–{steps(hi)}"] + [f"{sum(r[key] for r in part) / len(part):.{decimals}f}"
                                                    for _, key, decimals in LOSS_COLUMNS]
            if (lo, hi) == final:
                cells = [f"**{c}**" for c in cells]
                cells[0] = f"**{steps(lo)}–{steps(hi)} (last)**"
            rows.append(cells)
        out.append(table(["steps"] + [name for name, _, _ in LOSS_COLUMNS], rows))
    if evals:
        if out:
            out.append("")
        out += [
            "Held-out mean absolute errors per pixel and channel, [-1, 1] units (`eval.jsonl`):",
            "",
        ]
        rows = [[steps(s), lr_text(lr_at.get(s)), *(f"{evals[s][k]:.3f}" for k in
                 ("cycle_x", "cycle_y", "identity_x", "identity_y"))] for s in sorted(evals)]
        out.append(table(["step", "learning rate", "cycle X", "cycle Y", "identity X", "identity Y"], rows))
    if not out:
        raise SystemExit(f"error: {run_dir} has neither losses.jsonl nor eval.jsonl")
    return "\n".join(out)


# ---- the card ----------------------------------------------------------------------------------


def sections(judge_dir, runs_dir):
    out = {"judge": judge_section(judge_dir)}
    if os.path.exists(os.path.join(judge_dir, "selection.jsonl")):
        out["selection"] = selection_section(judge_dir)
    if os.path.isdir(runs_dir):
        for name in sorted(os.listdir(runs_dir)):
            if os.path.isdir(os.path.join(runs_dir, name)):
                out[f"run {name}"] = run_section(os.path.join(runs_dir, name))
    return out


def markers(name):
    return f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"


def fill(card, generated):
    """The card with every generated section replaced; errors name the sections without markers."""
    missing = []
    for name, body in generated.items():
        begin, end = markers(name)
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(card):
            missing.append(name)
            continue
        card = pattern.sub(lambda _: f"{begin}\n{body}\n{end}", card, count=1)
    return card, missing


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    models = os.path.join(here, "..", "models")
    parser.add_argument("--judge-dir", default=os.path.join(models, "judge"))
    parser.add_argument("--runs-dir", default=os.path.join(models, "runs"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="CARD", help="replace the generated sections of CARD")
    mode.add_argument("--check", metavar="CARD", help="exit 1 if CARD's generated sections are stale")
    args = parser.parse_args()
    generated = sections(args.judge_dir, args.runs_dir)
    card_path = args.write or args.check
    if not card_path:
        for name, body in generated.items():
            begin, end = markers(name)
            print(f"{begin}\n{body}\n{end}\n")
        return 0
    with open(card_path) as f:
        card = f.read()
    filled, missing = fill(card, generated)
    if missing:
        for name in missing:
            begin, end = markers(name)
            print(f"{card_path}: no section for '{name}': add the lines\n{begin}\n{end}", file=sys.stderr)
        return 1
    if args.write:
        if filled != card:
            with open(card_path, "w") as f:
                f.write(filled)
        return 0
    if filled != card:
        sys.stderr.writelines(difflib.unified_diff(card.splitlines(True), filled.splitlines(True),
                                                   card_path, "generated"))
        print(f"{card_path} is stale: run scripts/model_card_tables.py --write {card_path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
