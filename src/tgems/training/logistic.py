"""The Jumper's per-layer logistic fit, the same for any thread count.

L-BFGS amplifies last-bit differences: fitted in float32 with torch's own reductions (a mean over all rows,
matrix products whose summation order follows the thread count), a Jumper fit on 4,000 images with 1 and 2
threads differed in the 4th digit of its scores, and the calibrated taus and accuracies of the k-shot
baseline with it (issue 30.11). Here the loss and its gradient are written out and summed in float64, a
fixed block of rows at a time in a fixed order, on one thread; the problem is strictly convex (L2), so
L-BFGS run to a tight tolerance lands on its one optimum whatever rounding the machine does, and the
result is rounded to float32. Nothing holds a float64 copy of the signals, and signals spilled to disk
(`training.spill`) are read a block at a time (docs/fit.md, memory).
"""
from __future__ import annotations

import contextlib

import torch

from tgems.jumper import Jumper
from tgems.training.spill import release

ROWS = 128  # rows per block (a fixed summation order; blocks this small stay in cache)
TOLERANCE_GRAD = 1e-11  # max |gradient| at which L-BFGS stops: far below float32's resolution of the weights


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside (the caller's setting restored after): a fixed reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def column_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and standard deviation of each signal over rows and layers (the last dimension kept),
    block by block: no temporary of the size of `x`."""
    m = x.shape[0] * x.shape[1]
    total = sum(_read(x, a).sum((0, 1)) for a in range(0, len(x), ROWS))
    mu = total / m
    sq = sum(((_read(x, a) - mu) ** 2).sum((0, 1)) for a in range(0, len(x), ROWS))
    sd = (sq / max(m - 1, 1)).sqrt()
    return mu, sd.clamp_min(1e-3)


def _read(x: torch.Tensor, a: int) -> torch.Tensor:
    """Rows a .. a + ROWS of `x` in float64 (spilled to disk: their pages handed back at once)."""
    out = x[a:a + ROWS].double()
    release(x[a:a + ROWS])
    return out


def _loss_and_grad(x, y, w, b, mu, sd, l2):
    """Mean binary cross-entropy over every row and layer (+ l2 |w|^2) and its gradient in (w, b), for the
    weights `w / sd` on the raw signals and the bias `b - (w / sd) . mu` (the standardised fit, folded)."""
    ws = w / sd
    c = b - (ws * mu).sum(-1)
    loss = torch.zeros((), dtype=torch.float64)
    g_ws, g_c = torch.zeros_like(w), torch.zeros_like(b)
    for a in range(0, len(x), ROWS):
        xb, yb = _read(x, a).transpose(0, 1), y[a:a + ROWS].double().t()  # (n, rows, S), (n, rows)
        logit = torch.bmm(xb, ws[:, :, None])[..., 0] + c[:, None]
        loss = loss + (torch.nn.functional.softplus(logit) - yb * logit).sum()
        r = torch.sigmoid(logit) - yb
        g_ws += torch.bmm(r[:, None, :], xb)[:, 0]
        g_c += r.sum(1)
    m = x.shape[0] * x.shape[1]
    loss, g_ws, g_c = loss / m, g_ws / m, g_c / m
    return loss + l2 * (w ** 2).sum(), (g_ws - g_c[:, None] * mu) / sd + 2 * l2 * w, g_c


def fit_logistic(signals: torch.Tensor, target: torch.Tensor, l2: float = 1e-3, steps: int = 200,
                 standardize: bool = False) -> Jumper:
    """signals (N, n, S), target (N, n) in {0, 1}: fit every layer's logistic model by L-BFGS.
    `standardize`: fit (and penalise) weights on signals scaled to unit variance over all layers, then fold
    the scaling into the weights, so scoring reads the raw signals. Deterministic: see the module's note."""
    n, S = signals.shape[1], signals.shape[2]
    with one_thread():
        mu, sd = (column_moments(signals) if standardize
                  else (torch.zeros(S, dtype=torch.float64), torch.ones(S, dtype=torch.float64)))
        w = torch.zeros(n, S, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, tolerance_grad=TOLERANCE_GRAD,
                                tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            with torch.no_grad():
                loss, w.grad, b.grad = _loss_and_grad(signals, target, w, b, mu, sd, l2)
            return loss

        opt.step(closure)
        with torch.no_grad():
            weight = w / sd
            bias = b - (weight * mu).sum(-1)
    return Jumper(weight.float(), bias.float())
