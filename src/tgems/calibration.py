"""Thresholds for the Jumper's exit score: a compute budget, or a maximum disagreement with the full model
at a stated confidence (Learn-then-Test fixed-sequence testing with Clopper-Pearson bounds).

Everything here works on cached scores and per-layer predictions, so the engine (which decides exactly
as `simulate` does) is never run during calibration.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from tgems.errors import TGEMError
from tgems.options import NEVER_EXIT  # above every sigmoid score: no early exit, the full model

ALWAYS_EXIT = 0.0


def check_tau(tau) -> float:
    """A threshold must be a number in [0, 2] (scores are probabilities; 2 never exits)."""
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise TGEMError(f"tau must be a number in [0, {NEVER_EXIT}], got {tau!r}") from None
    if not ALWAYS_EXIT <= tau <= NEVER_EXIT:  # also refuses nan
        raise TGEMError(f"tau must be a number in [0, {NEVER_EXIT}] ({NEVER_EXIT} never exits early), got {tau}")
    return tau


def first_exit(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Index of the first candidate with score >= tau, or n (the last layer) where none is."""
    n = scores.shape[1]
    hit = scores >= tau
    return torch.where(hit.any(1), hit.float().argmax(1), torch.full((scores.shape[0],), n, device=scores.device))


MIN_GAP_ULPS = 16  # a threshold sits in a gap between calibration scores at least this many float32 steps wide


def tau_grid(scores: torch.Tensor, size: int = 400) -> np.ndarray:
    """Descending thresholds, from 'never exit' to 'exit at the first candidate'.

    Each threshold sits in a gap between consecutive calibration scores, never on a score: an exit there
    would hinge on the last bits of a float, which the engine, another machine or thread count (another
    summation order) need not reproduce. The gaps are those at `size` evenly spaced ranks of the scores
    sorted with their ties (so ranks do not move when last-bit noise makes or breaks a tie), or the nearest
    gap at least MIN_GAP_ULPS float32 steps wide, each threshold at its middle: last-bit noise in the scores
    moves a threshold by that noise only, and while it stays under 8 float32 steps no exit decision changes."""
    s = np.sort(scores.detach().flatten().cpu().numpy().astype(np.float64))
    lo, hi = s[:-1], s[1:]
    ulp = np.spacing(np.abs(hi).astype(np.float32)).astype(np.float64)
    wide = np.flatnonzero(hi - lo >= MIN_GAP_ULPS * ulp)
    if len(wide) > size:
        ranks = np.linspace(0, len(s) - 2, size)
        at = np.searchsorted(wide, ranks)
        left, right = wide[np.clip(at - 1, 0, len(wide) - 1)], wide[np.clip(at, 0, len(wide) - 1)]
        wide = np.unique(np.where(np.abs(ranks - left) <= np.abs(right - ranks), left, right))
    return np.unique(np.concatenate([[ALWAYS_EXIT, NEVER_EXIT], (lo[wide] + hi[wide]) / 2]))[::-1]


def simulate(scores: torch.Tensor, layer_preds: torch.Tensor, layers: list[int], tau: float):
    """Exit decisions on cached data: (prediction, exit layer) per sample.
    layer_preds (N, n + 1): predictions at each candidate layer then the last layer; layers: the n + 1 layers."""
    e = first_exit(scores, tau)
    preds = layer_preds.gather(1, e[:, None])[:, 0]
    depth = torch.as_tensor(layers, dtype=torch.long, device=e.device)[e]
    return preds, depth


def calibrate_budget(scores, layer_preds, layers: list[int], num_layers: int, budget: float,
                     labels: torch.Tensor | None = None) -> float:
    """The tau with the best accuracy (agreement with the full model without labels) among those whose
    mean executed layers / L <= budget on this data; the last layer counts as L."""
    full = layer_preds[:, -1]
    target = labels if labels is not None else full
    best, best_tau = -1.0, None
    for tau in tau_grid(scores):
        preds, depth = simulate(scores, layer_preds, layers, float(tau))
        if depth.float().mean().item() / num_layers <= budget + 1e-9:
            acc = (preds == target).float().mean().item()
            if acc > best + 1e-12:
                best, best_tau = acc, float(tau)
    return ALWAYS_EXIT if best_tau is None else best_tau


def binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(0, k + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) upper confidence bound on a binomial rate after k events in n trials."""
    if k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if binom_cdf(k, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def min_calibration_size(eps: float, delta: float) -> int:
    """The fewest calibration images with which Learn-then-Test can certify any early exit at (eps, delta):
    even zero disagreements give a Clopper-Pearson bound above eps below this size."""
    return int(math.ceil(math.log(delta) / math.log1p(-eps)))


def calibrate_max_drop(scores, layer_preds, layers: list[int], eps: float, delta: float) -> tuple[float, dict]:
    """Learn-then-Test, fixed sequence from safe to aggressive tau: keep lowering tau while the
    Clopper-Pearson upper bound on disagreement with the full model stays <= eps. The chosen tau then
    has disagreement <= eps with probability >= 1 - delta over the calibration draw."""
    full = layer_preds[:, -1]
    n = len(full)
    chosen, info = NEVER_EXIT, {"n": n, "disagree": 0, "ucb": 0.0}
    for tau in tau_grid(scores):
        preds, _ = simulate(scores, layer_preds, layers, float(tau))
        k = int((preds != full).sum())
        ucb = clopper_pearson_upper(k, n, delta)
        if ucb > eps:
            break
        chosen, info = float(tau), {"n": n, "disagree": k, "ucb": ucb}
    return chosen, info
