"""Issue 27, item 2: do learned ensembles of earlier layers (ZTW-style) add to the shipped per-layer mix?

On cached features of the embedded model and the shipped `embedded:cls` checkpoint, per candidate layer j,
from the two readouts' logits (T-GEM t_j, distilled d_j; `ClassProfiles.parts`):
- `mix`: the shipped weights, a t_j + b d_j (fit by `tgems fit` on the Jumper's images of cross-fitted halves);
- `ab`: the same form refit here, so that the two columns below differ from it only by the ensemble;
- `cascade`: a t_j + b d_j + c e_{j-1}, e_{j-1} the previous layer's cascade logits (ZTW's cascading);
- `geometric`: sum over k <= j of a_k t_k + b_k d_k (ZTW's geometric ensemble of every earlier layer).
The last three are fit label-free on `scenes:calib` (the KL divergence from the full model's class
distribution, L-BFGS, as `training.readout_fit.fit_mix`), layer by layer, and measured on `scenes:testall`:
top-1 accuracy on seen and held-out classes, and agreement with the full model (what an exit needs).

    python benchmarks/ensemble_probe.py --json results/ensemble_probe.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import tgems
from tgems.io import write_json
from tgems.training.readout_fit import fit_weights

sys.path.insert(0, str(Path(__file__).parent))
from jumper_study import cached_features  # noqa: E402


def readouts(prof, feats):
    """Per candidate layer (t, d), and the full model's class probabilities."""
    with torch.no_grad():
        parts = [prof.parts(j, feats.z[:, l - 1], patch=feats.patch[:, l - 1]) for j, l in enumerate(prof.layers)]
        return parts, prof.probs(len(prof.layers), feats.z[:, -1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="embedded:cls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    bb = tgems.load_backbone("embedded")
    ft, split = cached_features(bb, "scenes:testall", args.seed, "embedded")
    fc, _ = cached_features(bb, "scenes:calib", args.seed, "embedded")
    prof = tgems.EarlyExitClassifier(bb, args.checkpoint, ft.classes).profiles.to("cpu")
    held = torch.as_tensor(split == "heldout")
    (cal, p_cal), (test, p_test) = readouts(prof, fc), readouts(prof, ft)
    full = p_test.argmax(1)

    def scores(logits) -> dict:
        top = logits.argmax(1)
        return {"seen": round(100 * float((top[~held] == ft.labels[~held]).float().mean()), 2),
                "heldout": round(100 * float((top[held] == ft.labels[held]).float().mean()), 2),
                "agree": round(100 * float((top == full).float().mean()), 2)}

    rows, prev_c, prev_t, hist_c, hist_t = [], None, None, [], []
    for j, l in enumerate(prof.layers):
        (tc, dc), (tt, dt) = cal[j], test[j]
        ab = fit_weights(lambda w: w[0] * tc + w[1] * dc, 2, p_cal)
        if prev_c is None:
            casc = torch.cat([ab, torch.zeros(1)])
        else:
            casc = fit_weights(lambda w: w[0] * tc + w[1] * dc + w[2] * prev_c, 3, p_cal)
        cascade_c = casc[0] * tc + casc[1] * dc + (0 if prev_c is None else casc[2] * prev_c)
        cascade_t = casc[0] * tt + casc[1] * dt + (0 if prev_t is None else casc[2] * prev_t)
        prev_c, prev_t = cascade_c, cascade_t
        hist_c += [tc, dc]
        hist_t += [tt, dt]
        gc, gt = torch.stack(hist_c), torch.stack(hist_t)
        geo = fit_weights(lambda w: torch.einsum("k,knc->nc", w, gc), len(hist_c), p_cal)
        rows.append({"layer": l,
                     **{f"mix_{k}": v for k, v in scores(prof.mixed(j, tt, dt)).items()},
                     **{f"ab_{k}": v for k, v in scores(ab[0] * tt + ab[1] * dt).items()},
                     **{f"cascade_{k}": v for k, v in scores(cascade_t).items()},
                     **{f"geometric_{k}": v for k, v in scores(torch.einsum("k,knc->nc", geo, gt)).items()},
                     "cascade_weights": [round(float(v), 3) for v in casc]})
        r = rows[-1]
        print(f"layer {l:2d}: seen/held-out/agree  mix {r['mix_seen']:5.2f} {r['mix_heldout']:5.2f} {r['mix_agree']:5.2f}"
              f" | ab {r['ab_seen']:5.2f} {r['ab_heldout']:5.2f} {r['ab_agree']:5.2f}"
              f" | cascade {r['cascade_seen']:5.2f} {r['cascade_heldout']:5.2f} {r['cascade_agree']:5.2f}"
              f" | geometric {r['geometric_seen']:5.2f} {r['geometric_heldout']:5.2f} {r['geometric_agree']:5.2f}"
              f" | c = {r['cascade_weights'][-1]:+.3f}", flush=True)
    if args.json:
        write_json(args.json, {"checkpoint": args.checkpoint, "fit_on": "scenes:calib", "test": "scenes:testall",
                               "seed": args.seed, "rows": rows})


if __name__ == "__main__":
    main()
