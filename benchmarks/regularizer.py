"""Effect of the rate-based regularizer: T-GEM (cls) accuracy/compute curves with lambda = 0 and lambda > 0.

Fits two T-GEMs with the same seed and data, calibrates each for every budget on scenes:calib and
reports accuracy, agreement and mean depth on scenes:testall, side by side.

    python benchmarks/regularizer.py --lam 1.0 --r-target 0.35 --json results/regularizer.json
"""
from __future__ import annotations

import argparse

import torch

import tgems
from tgems.io import write_json
from tgems.classifier import EarlyExitClassifier
from tgems.data import load_dataset
from tgems.features import extract_features
from tgems.training.fit import FitSettings, fit_tgem

BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def curve(bb, tgem, jumper, info, labels, fc, ft, splits):
    clf = EarlyExitClassifier(bb, tgem, labels, info["templates"], jumper=jumper)
    rows = []
    for b in BUDGETS:
        cal = clf.calibrate(fc, budget=b, allow_uncovered=True)
        preds, depth = cal.simulate(ft)
        _, lp = cal.layer_predictions(ft)
        row = {"budget": b, "mean_layers": round(float(depth.float().mean()), 3),
               "agreement": round(float((preds == lp[:, -1]).float().mean()), 4)}
        for s in ("seen", "heldout"):
            m = torch.as_tensor(splits == s)
            row[f"acc_{s}"] = round(float((preds[m] == ft.labels[m]).float().mean()), 4)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--r-target", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    bb = tgems.load_backbone(args.model)
    train = load_dataset("scenes:train", n=args.n_train, seed=args.seed)
    test, calib = load_dataset("scenes:testall", seed=args.seed), load_dataset("scenes:calib", seed=args.seed)
    feats = extract_features(bb, train, desc="train features")
    fc, ft = extract_features(bb, calib), extract_features(bb, test)
    out = {"model": args.model, "seed": args.seed, "lam": args.lam, "r_target": args.r_target, "curves": {}}
    for lam in (0.0, args.lam):
        s = FitSettings(space="cls", epochs=args.epochs, lam=lam, r_target=args.r_target, seed=args.seed)
        tgem, jumper, info = fit_tgem(bb, train, s, feats=feats)
        out["curves"][str(lam)] = {"expected_depth_last_epoch": info["history"][-1]["expected_depth"],
                                   "rows": curve(bb, tgem, jumper, info, test.classes, fc, ft, test.sample_split())}
    print(f"T-GEM (cls) with and without the rate-based regularizer (r_target {args.r_target}), scenes:testall")
    print(f"{'budget':>7} | {'lambda':>6} {'layers':>7} {'acc seen':>9} {'acc held':>9} {'agree':>7}")
    for i, b in enumerate(BUDGETS):
        for lam, c in out["curves"].items():
            r = c["rows"][i]
            print(f"{b:>7.2f} | {float(lam):>6.2f} {r['mean_layers']:>7.2f} {100 * r['acc_seen']:>9.2f} "
                  f"{100 * r['acc_heldout']:>9.2f} {100 * r['agreement']:>7.2f}")
    for lam, c in out["curves"].items():
        print(f"lambda {lam}: expected depth at the end of training {c['expected_depth_last_epoch']}")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
