"""Issue 27's ablation: exit recipes side by side on cached features of the shipped embedded model.

Each CHECKPOINT (NAME=PATH, or a shipped name) is a `tgems fit` of one recipe, e.g. today's shipped
`embedded:cls`; `--recipe tgem` (today's modules, the Jumper with trajectory signals); `--recipe distilled
--no-readout-mix` (+ distilled readouts as a Jumper signal, T-GEM predicts); `--recipe distilled` (+ the two
readouts mixed). Per checkpoint, as the demo measures it (calibrated on `scenes:calib`, tested on
`scenes:testall`, seen / held-out %):
- budgets 0.3 .. 0.7: accuracy, mean layers, FLOPs ratio (the engine's count, readouts included);
- max_drop 0.01 / delta 0.1 over 20 re-drawn calibration sets (`--pool 20000`: of a 22,900-image pool, as
  the demo; default: calibration and test images pooled, half-splits, as `tgems demo --n`);
- per candidate layer: accuracy of the logit lens, the T-GEM profiles, the distilled readout and the mix,
  and the failure-ranking AUROC of the budget Jumper (target: exiting costs nothing) and of the agreement
  model (target: agrees with the full model), on seen and on text-only classes;
- the agreement oracle's mean layers (first candidate layer whose prediction equals the full model's).

    python benchmarks/trajectory_ablation.py today=embedded:cls new=results/fits/distilled --json out.json
Features are cached under results/jumper_study/ (as jumper_study.py caches them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import tgems
from tgems.calibration import simulate
from tgems.engine import exit_flops, full_flops
from tgems.evaluation.guarantee import guarantee_study
from tgems.evaluation.harness import lens_predictions
from tgems.features import LayerFeatures
from tgems.io import write_json
from tgems.jumper import exit_head_flops

sys.path.insert(0, str(Path(__file__).parent))
from jumper_study import auc, cached_features  # noqa: E402

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
SPLITS = ("seen", "heldout")


def pct(x) -> float:
    return round(100 * float(x), 2)


def per_layer(clf, ft: LayerFeatures, masks: dict) -> list:
    """Per candidate layer: accuracy of lens / T-GEM / distilled / mix, and the Jumper's AUROCs, per split."""
    prof = clf.profiles.to("cpu")
    y = ft.labels
    s_budget, lp = clf.layer_predictions(ft, "budget")
    s_agree, _ = clf.layer_predictions(ft, "max_drop")
    lens = lens_predictions(ft.z, prof.text)
    full = lp[:, -1]
    rows = []
    for j, l in enumerate(prof.layers):
        t, d = prof.parts(j, ft.z[:, l - 1], patch=ft.patch[:, l - 1])
        preds = {"lens": lens[:, l - 1], "tgem": t.argmax(1), "distilled": None if d is None else d.argmax(1),
                 "mix": lp[:, j]}
        row = {"layer": l}
        for s, m in masks.items():
            for k, p in preds.items():
                if p is not None:
                    row[f"{k}_{s}"] = pct((p[m] == y[m]).float().mean())
            no_loss = ((lp[m, j] == y[m]) | (full[m] != y[m])).numpy()
            agree = (lp[m, j] == full[m]).numpy()
            a, b = auc(s_budget[m, j].numpy(), no_loss), auc(s_agree[m, j].numpy(), agree)
            row[f"auroc_budget_{s}"] = None if a is None else round(a, 4)
            row[f"auroc_agree_{s}"] = None if b is None else round(b, 4)
        rows.append(row)
    first = torch.where((lp == full[:, None]).any(1), (lp == full[:, None]).int().argmax(1), lp.shape[1] - 1)
    oracle = torch.as_tensor(prof.exit_layers)[first].double()
    return rows, {s: round(float(oracle[m].mean()), 3) for s, m in masks.items()} | {"all": round(float(oracle.mean()), 3)}


def evaluate(bb, name: str, ckpt: str, ft, fc, split_t, pool, frac: float) -> dict:
    clf = tgems.EarlyExitClassifier(bb, ckpt, ft.classes)
    masks = {s: torch.as_tensor(split_t == s) for s in SPLITS}
    prof = clf.profiles.to("cpu")
    head = exit_head_flops(prof)
    out = {"name": name, "checkpoint": str(ckpt), "recipe": clf.config.get("recipe", "tgem"),
           "distilled": prof.distilled, "budgets": []}
    if prof.distilled:
        out["mix"] = [[round(float(v), 4) for v in r] for r in prof.mix]
    _, lp = clf.layer_predictions(ft, "budget")
    for b in BUDGETS:
        c = clf.calibrate(fc, budget=b, allow_uncovered=True)
        scores, _ = c.layer_predictions(ft)
        p, depth = simulate(scores, lp, prof.exit_layers, c.tau)
        flops = exit_flops(bb, depth, prof.exit_layers, head) / full_flops(bb, prof.num_classes)
        row = {"budget": b, "tau": round(c.tau, 5), "mean_layers": round(float(depth.double().mean()), 3),
               "flops_ratio": round(float(flops.mean()), 4)}
        for s, m in masks.items():
            row[s] = pct((p[m] == ft.labels[m]).float().mean())
        out["budgets"].append(row)
    out["full"] = {s: pct((lp[m, -1] == ft.labels[m]).float().mean()) for s, m in masks.items()}
    g = guarantee_study(clf, pool, eps=0.01, delta=0.1, n_splits=20, seed=0, calib_fraction=frac)
    out["max_drop"] = {k: g[k] for k in ("eps", "delta", "n_splits", "n_calib", "n_test", "held", "mean_test_layers")}
    out["layers"], out["oracle_mean_layers"] = per_layer(clf, ft, masks)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="NAME=PATH (or a shipped name such as embedded:cls)")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=0,
                    help="max_drop study on 2,900 + POOL fresh scenes:testall images as the demo (default: the "
                         "calibration and test images pooled, half-splits, as `tgems demo --n`)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    bb = tgems.load_backbone(args.model)
    ft, split_t = cached_features(bb, "scenes:testall", args.seed, args.model)
    fc, _ = cached_features(bb, "scenes:calib", args.seed, args.model)
    if args.pool:
        pool, _ = cached_features(bb, f"scenes:testall:{2900 + args.pool}", args.seed, args.model)
        pool = LayerFeatures(pool.z, None, pool.labels, classes=pool.classes, patch=pool.patch)
    else:  # the demo's small-run pool: calibration and test images together, half-splits
        pool = LayerFeatures(torch.cat([fc.z, ft.z]), None, torch.cat([fc.labels, ft.labels]), classes=ft.classes,
                             patch=torch.cat([fc.patch, ft.patch]))
    runs = []
    for c in args.checkpoints:
        name, _, path = c.rpartition("=")
        r = evaluate(bb, name or path, path, ft, fc, split_t, pool, 2900 / len(pool) if args.pool else 0.5)
        runs.append(r)
        b5 = next(x for x in r["budgets"] if x["budget"] == 0.5)
        print(f"{r['name']:>14} ({r['recipe']}): budget 0.5 seen {b5['seen']:.2f} heldout {b5['heldout']:.2f} "
              f"({b5['mean_layers']:.2f} layers, flops {b5['flops_ratio']:.3f}); max_drop {r['max_drop']['held']}/20 "
              f"at {r['max_drop']['mean_test_layers']:.2f} layers; oracle {r['oracle_mean_layers']['all']:.2f}",
              flush=True)
        for x in r["budgets"]:
            print(f"     budget {x['budget']}: seen {x['seen']:.2f} heldout {x['heldout']:.2f} "
                  f"layers {x['mean_layers']:.2f}", flush=True)
    if args.json:
        write_json(args.json, {"model": args.model, "test": "scenes:testall", "calib": "scenes:calib",
                               "seed": args.seed, "budgets": list(BUDGETS), "runs": runs})


if __name__ == "__main__":
    main()
