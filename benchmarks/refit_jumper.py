"""Refit only the Jumper of a T-GEM checkpoint with the current `fit_jumper`, on the same images `tgems fit`
set aside for it, keeping the exit modules G_l (and, unless --all, the agreement model that max_drop goals
use) bit for bit. Used when the Jumper's recipe changes and the modules do not (issue 12): it isolates the
change, and costs the features of the Jumper's images (20 % of the fit data) instead of a full fit. It
does not cross-fit (that needs the half-class modules of a full `tgems fit`): the budget model it makes is
the `--no-cross-fit` one.

The Jumper images are fit_tgem's: a permutation of the fit data by `settings.seed`, the first
`jumper_fraction` of it; labels remapped to the classes present, class texts with the checkpoint's templates.
The checkpoint's tau is recomputed as fit_tgem does (budget `default_budget` on those images).

    python benchmarks/refit_jumper.py src/tgems/assets/embedded_tgem/cls
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import tgems
from tgems.calibration import calibrate_budget
from tgems.features import extract_features
from tgems.jumper import fit_jumper, jumper_signals
from tgems.profiles import check_readable_labels, layer_probs
from tgems.tgem import load_tgem, save_tgem


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--all", action="store_true", help="refit the agreement model too")
    ap.add_argument("--out", help="write here (default: in place)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    bb = tgems.load_backbone(args.model)
    tgem, old, cfg = load_tgem(args.checkpoint, bb)
    s = cfg["settings"]
    data = tgems.load_dataset(cfg["data"], seed=s["seed"])
    perm = np.random.default_rng(s["seed"]).permutation(len(data))
    jump_idx = np.sort(perm[:int(round(len(perm) * s["jumper_fraction"]))])
    present = np.unique(data.labels)
    classes = [data.classes[i] for i in present]
    text = check_readable_labels(bb, classes, cfg["templates"]).cpu()
    jdata = data.subset(jump_idx)
    feats = extract_features(bb, jdata, rates=tgem.space == "rates", desc="Jumper images")
    remap = torch.full((len(data.classes),), -1, dtype=torch.long)
    remap[torch.as_tensor(present)] = torch.arange(len(present))
    feats.labels = remap[feats.labels]
    profiles = tgem.profiles(text, bb).to("cpu")
    jumper = fit_jumper(profiles, feats, s["jumper_target"])
    if not args.all:
        jumper.weight, jumper.bias = old.weight, old.bias
    probs, pairs = layer_probs(profiles, feats, pairs=True)
    preds = probs.argmax(-1)
    scores = jumper.for_goal("budget").scores(jumper_signals(probs, feats, profiles.layers, profiles.text, pairs))
    jumper.tau = calibrate_budget(scores, preds, profiles.exit_layers, bb.num_layers, s["default_budget"])
    info = {k: v for k, v in cfg.items() if k not in ("format", "backbone", "family", "fingerprint", "num_layers",
                                                      "layers", "space", "embed_dim", "out_dim", "hidden", "tau",
                                                      "data")}
    info["jumper_refit"] = {"what": "budget model" if not args.all else "both models",
                            "script": "benchmarks/refit_jumper.py", "num_jumper": len(jump_idx),
                            "seconds": round(time.time() - t0, 1), "old_tau": cfg.get("tau")}
    save_tgem(args.out or args.checkpoint, tgem, jumper, bb, info, data_spec=cfg["data"])
    print(f"{args.checkpoint}: tau {cfg.get('tau'):.4f} -> {jumper.tau:.4f}; budget weights "
          f"{tuple(jumper.budget.weight.shape)}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
