"""Does the max_drop calibration keep its promise? Learn-then-Test on re-drawn calibration sets.

Each of `--splits` draws takes `--n-calib` images of a pool at random, calibrates tau for
max_drop=eps at confidence 1 - delta on them, and measures the disagreement with the full model on
the rest of the pool. The promise is about the population: P(disagreement > eps) <= delta over the
calibration draw. A test part of a few thousand images adds its own sampling noise on top (about
+-0.2 points at 1 %), so the larger `--n-test` is, the closer the count measures the promise itself.

    python benchmarks/guarantee.py --json results/guarantee.json                 # 20k-image test parts
    python benchmarks/guarantee.py --n-test 2900 --json results/guarantee_small.json
"""
from __future__ import annotations

import argparse

import torch

import tgems
from tgems.io import write_json
from tgems.classifier import EarlyExitClassifier
from tgems.data import scenes
from tgems.evaluation.guarantee import guarantee_pool, guarantee_study

TGEM = "embedded:cls"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tgem", default=TGEM)
    ap.add_argument("--n-calib", type=int, default=2900)
    ap.add_argument("--n-test", type=int, default=20000)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    bb = tgems.load_backbone(args.model)
    clf = EarlyExitClassifier(bb, args.tgem, scenes.CLASSES)
    pool = guarantee_pool(bb, args.n_calib, args.n_test, args.seed, rates=clf.profiles.space == "rates")
    g = guarantee_study(clf, pool, eps=args.eps, delta=args.delta, n_splits=args.splits, seed=args.seed,
                        calib_fraction=args.n_calib / len(pool))
    dis = [r["test_disagreement"] for r in g["rows"]]
    print(f"max_drop eps {args.eps}, delta {args.delta}: {args.splits} draws of {g['n_calib']} calibration images, "
          f"{g['n_test']} test images each")
    print(f"disagreement <= eps on {g['held']}/{g['n_splits']} draws (promise: >= {1 - args.delta:.0%} of draws "
          f"on average); test disagreement min {min(dis):.4f}, median {sorted(dis)[len(dis) // 2]:.4f}, "
          f"max {max(dis):.4f}; mean executed layers {g['mean_test_layers']:.2f} of {bb.num_layers}")
    if args.json:
        write_json(args.json, {"model": args.model, "tgem": args.tgem, "seed": args.seed, **g})


if __name__ == "__main__":
    main()
