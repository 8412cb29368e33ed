"""The max_drop promise, checked: calibrate on many re-drawn calibration sets, measure the disagreement with
the full model on the rest each time, count the draws that keep it."""
from __future__ import annotations

import numpy as np
import torch

from tgems.calibration import calibrate_max_drop, simulate, tau_grid
from tgems.classifier import EarlyExitClassifier
from tgems.features import LayerFeatures, extract_features
from tgems.options import DELTA


def guarantee_pool(backbone, n_calib: int = 2900, n_test: int = 20000, seed: int = 0,
                   progress: bool = True, rates: bool = False) -> LayerFeatures:
    """Features of n_calib + n_test scenes:testall images (its seen / held-out mix) for `guarantee_study`
    with calib_fraction = n_calib / (n_calib + n_test): test parts that large measure a disagreement
    near 1 % to about +-0.07 points, so the count of held draws checks the promise, not the test noise."""
    from tgems.data import load_dataset

    data = load_dataset(f"scenes:testall:{n_calib + n_test}", seed=seed)
    return extract_features(backbone, data, rates=rates, progress=progress, desc="guarantee pool")


def guarantee_study(clf: EarlyExitClassifier, pool: LayerFeatures, eps: float = 0.01, delta: float = DELTA,
                    n_splits: int = 20, seed: int = 0, calib_fraction: float = 0.5, headroom: bool = False) -> dict:
    """Re-split a pool into calibration / test halves n_splits times; calibrate max_drop on one half and
    measure the disagreement with the full model on the other. `headroom`: also the best single threshold
    on the whole pool (`threshold_headroom`), from the same scores."""
    scores, preds = clf.layer_predictions(pool, goal="max_drop")
    layers = clf.profiles.exit_layers
    rng = np.random.default_rng(seed)
    nc = int(round(len(pool) * calib_fraction))
    rows = []
    for i in range(n_splits):
        perm = torch.as_tensor(rng.permutation(len(pool)))
        c, t = perm[:nc], perm[nc:]
        tau, info = calibrate_max_drop(scores[c], preds[c], layers, eps, delta)
        p, d = simulate(scores[t], preds[t], layers, tau)
        dis = float((p != preds[t, -1]).float().mean())
        rows.append({"split": i, "tau": round(tau, 5), "test_disagreement": round(dis, 5),
                     "test_mean_layers": round(float(d.float().mean()), 3), "calib_ucb": round(info["ucb"], 5)})
    held = sum(r["test_disagreement"] <= eps for r in rows)
    out = {"eps": eps, "delta": delta, "n_splits": n_splits, "n_calib": nc, "n_test": len(pool) - nc,
           "held": held, "rows": rows,
           "mean_test_layers": round(float(np.mean([r["test_mean_layers"] for r in rows])), 3)}
    if headroom:
        out["headroom"] = threshold_headroom(scores, preds, layers, eps)
    return out


def threshold_headroom(scores: torch.Tensor, preds: torch.Tensor, layers: list[int], eps: float = 0.01) -> dict:
    """The fewest mean layers that one threshold on these max_drop scores reaches on the whole pool while its
    disagreement with the full model (the last column of `preds`) stays <= eps (taus tried from safe to
    aggressive, as Learn-then-Test tries them): what a calibration that knew the pool could give. Above it,
    the layers are the price of the guarantee; up to it, they are the score's ranking of images."""
    best = {"tau": None, "mean_layers": float(layers[-1]), "disagreement": 0.0}
    for tau in tau_grid(scores, size=2000):
        p, d = simulate(scores, preds, layers, float(tau))
        dis = float((p != preds[:, -1]).float().mean())
        if dis > eps:
            break
        best = {"tau": float(tau), "mean_layers": round(float(d.double().mean()), 3),
                "disagreement": round(dis, 5)}
    return {"eps": eps, "n": len(scores), **best}
