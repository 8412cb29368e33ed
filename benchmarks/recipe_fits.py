"""Issue 27's ablation fits: `tgems fit` checkpoints of several exit recipes on the same data and seed, the
T-GEM modules (main and cross-fitted halves) trained once and shared (the recipe does not change how they
train: `training.fit._fit_modules`' memo). Each arm is saved as a checkpoint, as `tgems fit` saves it.

    python benchmarks/recipe_fits.py --out results/fits        # arms: tgem, signal, mix_z, mix, mix_nt, mix_main
then `benchmarks/trajectory_ablation.py today=embedded:cls tgem=results/fits/tgem ...` measures them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import tgems
from tgems.tgem import save_tgem
from tgems.training.fit import FitSettings, fit_tgem

sys.path.insert(0, str(Path(__file__).parent))
from jumper_study import cached_features  # noqa: E402

ARMS = {"tgem": {"recipe": "tgem", "trajectory": True},  # today's modules and Jumper + the trajectory signals
        "signal": {"recipe": "distilled", "readout_mix": False, "trajectory": True},  # + distilled readouts, Jumper only
        "mix_z": {"recipe": "distilled", "trajectory": True, "readout_patch": False},  # + both readouts mixed (maps of z_l)
        "mix": {"recipe": "distilled", "trajectory": True},  # the maps read the mean-patch readout m_l too
        "mix_nt": {"recipe": "distilled", "trajectory": False},  # the same without the trajectory signals
        "mix_main": {"recipe": "distilled", "mix_maps": "main"}}  # mixing weights judged with the main maps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="scenes:train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", default="results/fits")
    ap.add_argument("--main-from", help="reuse the main T-GEM modules of this checkpoint (e.g. embedded:cls, fit "
                                        "by `tgems fit --data scenes:train --space cls --seed 0`)")
    args = ap.parse_args()
    bb = tgems.load_backbone(args.model)
    data = tgems.load_dataset(args.data, seed=args.seed)
    feats, _ = cached_features(bb, args.data, args.seed, args.model, rates=False)  # kept under results/jumper_study
    memo: dict = {}
    if args.main_from:  # the main modules of a checkpoint fit on the same data and seed: only the halves train
        from tgems.tgem import load_tgem

        main, _, cfg = load_tgem(args.main_from, bb)
        if cfg.get("data") != args.data or cfg["settings"]["seed"] != args.seed or cfg["space"] != "cls":
            raise SystemExit(f"{args.main_from} was not fit on {args.data} (cls, seed {args.seed})")
        memo["fit T-GEM (cls)"] = (main, cfg["settings"]["soft_tau"], cfg["history"])
    for arm in args.arms:
        s = replace(FitSettings(space="cls", seed=args.seed), **ARMS[arm])
        tgem, jumper, info = fit_tgem(bb, data, s, feats=feats, memo=memo)
        out = save_tgem(Path(args.out) / (arm if args.seed == 0 else f"{arm}_s{args.seed}"), tgem, jumper, bb, info,
                        data_spec=args.data)
        print(f"{arm}: {out} (mix {json.dumps(tgem.mix.tolist()) if tgem.recipe == 'distilled' else '-'})", flush=True)


if __name__ == "__main__":
    main()
