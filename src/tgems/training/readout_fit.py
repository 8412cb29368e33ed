"""Fitting distilled readouts (tgems.readouts): ridge maps z_l -> z_L, label-free, and the per-layer weights that
mix them with the T-GEM profiles, fit toward the full model's own distribution (no labels either)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tgems.training.settings import READOUT_L2
_ROWS = 2048  # rows per pass (memory, not results)


def ridge(xtx: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """Solve (X'X + lam I') W = X'Y in float64; the last row and column (the bias) are not penalised."""
    pen = torch.full((xtx.shape[0],), lam, dtype=torch.float64)
    pen[-1] = 0.0
    return torch.linalg.solve(xtx + torch.diag(pen), xty)


def fit_readouts(store, rows: np.ndarray, layers: list[int], l2: float = READOUT_L2,
                 patch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (n, D_in, D), bias (n, D)): per candidate layer, the ridge regression of unit z_L on unit z_l
    (D_in = D), or on [unit z_l, unit m_l] with `patch` (D_in = 2 D), over the feature rows `rows` (a cache
    on disk or in memory, read `_ROWS` at a time). Closed form, so deterministic: no seed is needed."""
    rows = np.asarray(rows)
    xtx = xty = None
    for a in range(0, len(rows), _ROWS):
        idx = rows[a:a + _ROWS]
        z = store.take(idx, "cls", layers)  # (B, n, D)
        m = store.take(idx, "patch", layers) if patch else None
        y = F.normalize(store.final_z(idx), dim=-1).double()
        ones = torch.ones(len(idx), 1, dtype=torch.float64)
        for j in range(len(layers)):  # one layer at a time: float64 copies of a layer, not of the batch
            x = torch.cat([F.normalize(z[:, j], dim=-1).double()]
                          + ([F.normalize(m[:, j], dim=-1).double()] if patch else []) + [ones], dim=1)
            if xtx is None:
                xtx = torch.zeros(len(layers), x.shape[1], x.shape[1], dtype=torch.float64)
                xty = torch.zeros(len(layers), x.shape[1], y.shape[1], dtype=torch.float64)
            xtx[j] += x.T @ x
            xty[j] += x.T @ y
    dim = xtx.shape[-1] - 1
    lam = l2 * len(rows) / dim
    w = torch.stack([ridge(xtx[j], xty[j], lam) for j in range(len(layers))]).float()
    return w[:, :-1].contiguous(), w[:, -1].contiguous()


def fit_weights(logits_of, n: int, target: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Weights w (n,), starting at (1, 0, ..., 0), minimising the cross-entropy of softmax(logits_of(w)) against
    the class distribution `target` (L-BFGS): how much each of n logit sets is worth toward the full model."""
    w = torch.zeros(n)
    w[0] = 1.0
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(target * logits_of(w).log_softmax(-1)).sum(-1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def fit_mix(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: int = 100) -> torch.Tensor:
    """(n, 2) per-layer weights (T-GEM, distilled) minimising the KL divergence from the full model's class
    distribution to softmax(a t + b d). `parts`: per candidate layer, (t, d, full probs) over the same rows,
    which should be images of classes the readouts were not fit on (cross-fitting), so the weights say how
    much each readout is worth on text-only classes."""
    return torch.stack([fit_weights(lambda w: w[0] * t + w[1] * d, 2, p, steps) for t, d, p in parts])
