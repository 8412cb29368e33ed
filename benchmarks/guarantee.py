"""Does the max_drop calibration keep its promise? Learn-then-Test on re-drawn calibration sets.

Each of `--splits` draws takes `--n-calib` images of a pool at random, calibrates tau for
max_drop=eps at confidence 1 - delta on them, and measures the disagreement with the full model on
the rest of the pool. The promise is about the population: P(disagreement > eps) <= delta over the
calibration draw. A test part of a few thousand images adds its own sampling noise on top (about
+-0.2 points at 1 %), so the larger `--n-test` is, the closer the count measures the promise itself.

Each `--arm NAME=CHECKPOINT` (default: the shipped `embedded:cls`) runs on the same pool and draws; per arm
it also reports the threshold headroom (`evaluation.guarantee.threshold_headroom`): the mean layers of the
best single threshold on the whole pool at disagreement <= eps, i.e. what the score's ranking allows before
any price is paid for the guarantee.

    python benchmarks/guarantee.py --json results/guarantee.json                 # 20k-image test parts
    python benchmarks/guarantee.py --n-test 2900 --json results/guarantee_small.json
    python benchmarks/guarantee.py --arm before=results/guarantee/before_cls --arm shipped=embedded:cls
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
    ap.add_argument("--arm", action="append", metavar="NAME=CHECKPOINT",
                    help=f"a checkpoint to study (repeatable; default: shipped={TGEM}); the first is the record's")
    ap.add_argument("--n-calib", type=int, default=2900)
    ap.add_argument("--n-test", type=int, default=20000)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    arms = [a.split("=", 1) for a in (args.arm or [f"shipped={TGEM}"])]
    if any(len(a) != 2 for a in arms):
        ap.error("--arm takes NAME=CHECKPOINT")
    torch.manual_seed(args.seed)
    bb = tgems.load_backbone(args.model)
    pools, out = {}, []
    for name, ckpt in arms:
        clf = EarlyExitClassifier(bb, ckpt, scenes.CLASSES)
        rates = clf.profiles.space == "rates"
        if rates not in pools:
            pools[rates] = guarantee_pool(bb, args.n_calib, args.n_test, args.seed, rates=rates)
        pool = pools[rates]
        g = guarantee_study(clf, pool, eps=args.eps, delta=args.delta, n_splits=args.splits, seed=args.seed,
                            calib_fraction=args.n_calib / len(pool), headroom=True)
        dis = [r["test_disagreement"] for r in g["rows"]]
        print(f"[{name}: {ckpt}] max_drop eps {args.eps}, delta {args.delta}: {args.splits} draws of {g['n_calib']} "
              f"calibration images, {g['n_test']} test images each")
        print(f"disagreement <= eps on {g['held']}/{g['n_splits']} draws (promise: >= {1 - args.delta:.0%} of draws "
              f"on average); test disagreement min {min(dis):.4f}, median {sorted(dis)[len(dis) // 2]:.4f}, "
              f"max {max(dis):.4f}; mean executed layers {g['mean_test_layers']:.2f} of {bb.num_layers}; "
              f"best single threshold on the pool: {g['headroom']['mean_layers']:.2f} layers")
        out.append({"name": name, "tgem": ckpt, **g})
    if args.json:
        first = out[0]
        write_json(args.json, {"model": args.model, "tgem": first["tgem"], "seed": args.seed,
                               **{k: v for k, v in first.items() if k not in ("name", "tgem")},
                               "arms": [{k: v for k, v in a.items() if k != "rows"} for a in out]})


if __name__ == "__main__":
    main()
