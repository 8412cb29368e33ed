"""Large label sets (issue 23.7): what scoring every label at every candidate layer costs, and what the shortlist
(`tgems.profiles.SHORTLIST_*`: above 1,000 labels, layers between full scorings score only the 64 classes still
in contention) saves and changes, on the embedded model and its `embedded:cls` T-GEM.

    python benchmarks/label_scale.py --quick            # 100 images, one prompt template: about a minute
    python benchmarks/label_scale.py --n 1000 --json results/label_scale.json

Label sets: the 64 scenes classes plus distractors made of the embedded vocabulary ("a small red star at the
top left", one seeded order, so each set contains the smaller ones), 64 / 1,000 / 5,000 in all; the text tower
runs once, on the largest. For each: the FLOPs ratio of an image that runs to the last layer, and on
`scenes:testall` images at the checkpoint's threshold (no calibration), mean FLOPs ratio, mean layers,
accuracy (the predicted label names the image's colour and shape; distractors that do count) with full
scoring at every layer and with the shortlist, and how often the two give the same label and exit layer.
"""
from __future__ import annotations

import argparse
import itertools
import warnings

import numpy as np

import tgems
from tgems import profiles as P
from tgems.classifier import EarlyExitClassifier
from tgems.io import write_json

SIZES = ["", "small ", "medium ", "large "]
TEXTURE = ["", "textured "]
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
SHAPES = ["circle", "crescent", "cross", "heart", "ring", "square", "star", "triangle"]
PLACES = ["", " at the top left", " at the top right", " at the bottom left", " at the bottom right",
          " in the center", " near the top", " near the bottom", " on the left", " on the right"]


def label_set(classes: list[str], total: int, seed: int = 0) -> list[str]:
    """The dataset's classes first, then distractor texts the embedded model reads in one seeded order."""
    pool = [f"a {s}{t}{c} {h}{p}" for s, t, c, h, p in itertools.product(SIZES, TEXTURE, COLOURS, SHAPES, PLACES)]
    pool = [x for x in pool if x not in set(classes)]
    order = np.random.default_rng(seed).permutation(len(pool))[:max(0, total - len(classes))]
    return list(classes) + [pool[i] for i in order]


def colour_shape(label: str) -> tuple:
    words = label.split()
    return next((w for w in words if w in COLOURS), None), next((w for w in words if w in SHAPES), None)


def subset(clf, k: int):
    """The classifier for the first k labels, from the largest one's profiles (no text tower run)."""
    from dataclasses import replace

    p = clf.profiles
    prof = replace(p, protos=p.protos[:, :k], text=p.text[:k])
    return EarlyExitClassifier(clf.backbone, None, clf.labels[:k], clf.templates, jumper=clf.jumper, profiles=prof,
                               calibration=clf.calibration)


def run(clf, images, shortlist: bool) -> dict:
    saved = P.SHORTLIST_ABOVE
    P.SHORTLIST_ABOVE = saved if shortlist else 10 ** 9
    try:
        return {"pred": clf.predict(images), "cost": clf._scoring_cost()}
    finally:
        P.SHORTLIST_ABOVE = saved


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 images")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sizes", default="64,1000,5000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    n = 100 if args.quick else args.n
    bb = tgems.load_backbone("embedded")
    data = tgems.load_dataset(f"scenes:testall:{n}", seed=args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    labels = label_set(data.classes, max(sizes), args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        largest = EarlyExitClassifier(bb, "embedded:cls", labels, templates=["{}"] if args.quick else None)
    truth = [colour_shape(data.classes[c]) for c in data.labels]
    rows = []
    print(f"{'labels':>7} {'scoring':>9} {'full-depth':>10} {'FLOPs':>7} {'layers':>7} {'acc %':>6} "
          f"{'same label %':>12} {'same exit %':>11}")
    for size in sizes:
        clf = subset(largest, size)
        full = run(clf, data.images, shortlist=False)
        short = run(clf, data.images, shortlist=True) if size > P.SHORTLIST_ABOVE else full
        for name, r in (("all", full), ("shortlist", short)):
            if name == "shortlist" and short is full:
                continue
            p = r["pred"]
            row = {"labels": size, "scoring": name, "shortlist": r["cost"]["shortlist"],
                   "full_depth_flops_ratio": r["cost"]["full_depth_flops_ratio"],
                   "break_even_layer": r["cost"]["break_even_layer"],
                   "flops_ratio": round(float(p.flops_ratio.mean()), 4), "mean_layers": round(p.mean_layers, 3),
                   "accuracy": round(float(np.mean([colour_shape(lab) == t for lab, t in zip(p.labels, truth)])), 4),
                   "same_label": round(float((p.indices == full["pred"].indices).mean()), 4),
                   "same_exit": round(float((p.exit_layers == full["pred"].exit_layers).mean()), 4)}
            rows.append(row)
            print(f"{size:>7} {name:>9} {row['full_depth_flops_ratio']:>10.3f} {row['flops_ratio']:>7.3f} "
                  f"{row['mean_layers']:>7.2f} {100 * row['accuracy']:>6.2f} {100 * row['same_label']:>12.2f} "
                  f"{100 * row['same_exit']:>11.2f}")
    if args.json:
        write_json(args.json, {"benchmark": "label_scale", "n": n, "seed": args.seed, "rows": rows,
                               "templates": largest.templates,
                               "shortlist_above": P.SHORTLIST_ABOVE, "shortlist_size": P.SHORTLIST_SIZE,
                               "shortlist_refresh": P.SHORTLIST_REFRESH})


if __name__ == "__main__":
    main()
