"""The Jumper: per-layer exit scores from cheap signals of P_l, and the calibration of its threshold.

s_l(x) estimates P(prediction at layer l == full model's prediction) (the model used for max_drop
goals) or P(exiting at l costs no accuracy) (the model used for budget goals, see `fit.fit_jumper`).
An image exits at the first candidate layer with s_l(x) >= tau; tau is calibrated for a compute
budget or, with a Learn-then-Test fixed-sequence procedure and Clopper-Pearson bounds, for a maximum
disagreement with the full model at a stated confidence.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

NUM_SIGNALS = 6  # the confidence signals; the unit readout z_l follows them


def exit_signals(probs: torch.Tensor, prev_probs: torch.Tensor | None, z: torch.Tensor,
                 prev_z: torch.Tensor | None) -> torch.Tensor:
    """(n, NUM_SIGNALS + D): top-1, margin, normalised entropy, agreement and prob change vs the previous
    candidate layer, cosine of z with the previous candidate's z; then z_l / |z_l| itself, which lets
    the Jumper learn which kinds of image are settled early. A Jumper with NUM_SIGNALS weights per layer
    (the agreement model, and every checkpoint from before z was a signal) reads just those."""
    top2 = probs.topk(min(2, probs.shape[1]), dim=1).values
    top1 = top2[:, 0]
    margin = top1 - (top2[:, 1] if top2.shape[1] > 1 else 0)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(max(probs.shape[1], 2))
    if prev_probs is None:
        agree = torch.zeros_like(top1)
        prev_top = torch.zeros_like(top1)
        cos = torch.zeros_like(top1)
    else:
        pred = probs.argmax(1)
        agree = (pred == prev_probs.argmax(1)).float()
        prev_top = prev_probs.gather(1, pred[:, None])[:, 0]
        cos = F.cosine_similarity(z, prev_z, dim=1)
    conf = torch.stack([top1, margin, ent, agree, prev_top, cos], dim=1)
    return torch.cat([conf, F.normalize(z.float(), dim=-1)], dim=1)


class Jumper:
    """One logistic model per candidate layer (signals -> P(agree with full model)).

    `budget`, when set, is a second Jumper whose score serves budget goals (see `fit.fit_jumper`);
    `for_goal` picks the model a calibration goal uses."""

    def __init__(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, tau: float = 2.0,
                 budget: "Jumper | None" = None):
        self.weight, self.bias, self.tau, self.budget = weight, bias, tau, budget

    def for_goal(self, goal: str) -> "Jumper":
        return self.budget if goal == "budget" and self.budget is not None else self

    @property
    def num_layers(self) -> int:
        return 0 if self.weight is None else self.weight.shape[0]

    def fit(self, signals: torch.Tensor, agree: torch.Tensor, l2: float = 1e-3, steps: int = 200) -> "Jumper":
        """signals (N, n, S), agree (N, n) in {0, 1}: fit every layer's logistic model by L-BFGS."""
        n = signals.shape[1]
        x = signals.float()
        y = agree.float()
        w = torch.zeros(n, x.shape[2], requires_grad=True)
        b = torch.zeros(n, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logit = (x * w[None]).sum(-1) + b[None]
            loss = F.binary_cross_entropy_with_logits(logit, y) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def score(self, j: int, signals: torch.Tensor) -> torch.Tensor:
        # the same reduction as `scores`, so the engine's scores equal the cached ones bit for bit
        x = signals[..., :self.weight.shape[-1]].float()
        return torch.sigmoid((x * self.weight[j]).sum(-1) + self.bias[j])

    def scores(self, signals: torch.Tensor) -> torch.Tensor:
        """(N, n, S) -> (N, n)."""
        x = signals[..., :self.weight.shape[-1]].float()
        return torch.sigmoid((x * self.weight[None]).sum(-1) + self.bias[None])

    def state(self) -> dict:
        out = {"jumper.weight": self.weight.contiguous(), "jumper.bias": self.bias.contiguous()}
        if self.budget is not None:
            out.update({"jumper.budget.weight": self.budget.weight.contiguous(),
                        "jumper.budget.bias": self.budget.bias.contiguous()})
        return out

    @classmethod
    def from_state(cls, tensors: dict, tau: float = 2.0) -> "Jumper":
        budget = None
        if "jumper.budget.weight" in tensors:
            budget = cls(tensors.pop("jumper.budget.weight"), tensors.pop("jumper.budget.bias"))
        return cls(tensors.pop("jumper.weight"), tensors.pop("jumper.bias"), tau, budget)


def first_exit(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Index of the first candidate with score >= tau, or n (the last layer) where none is."""
    n = scores.shape[1]
    hit = scores >= tau
    idx = torch.where(hit.any(1), hit.float().argmax(1), torch.full((scores.shape[0],), n))
    return idx


def tau_grid(scores: torch.Tensor, size: int = 400) -> np.ndarray:
    """Descending thresholds, from 'never exit' (2.0) to 'exit at the first candidate' (0.0).

    Thresholds lie midway between distinct scores (at `size` evenly spaced ranks), never on a score:
    a threshold equal to a calibration score would make that image's exit hinge on the last bit of a
    float, which the engine (other batch, other summation order) need not reproduce."""
    s = np.unique(scores.flatten().numpy().astype(np.float64))
    mids = (s[1:] + s[:-1]) / 2
    if len(mids) > size:
        mids = mids[np.unique(np.linspace(0, len(mids) - 1, size).round().astype(np.int64))]
    return np.unique(np.concatenate([[0.0, 2.0], mids]))[::-1]


def simulate(scores: torch.Tensor, layer_preds: torch.Tensor, layers: list[int], tau: float):
    """Exit decisions on cached data: (prediction, exit layer) per sample.
    layer_preds (N, n + 1): predictions at each candidate layer then the last layer."""
    e = first_exit(scores, tau)
    preds = layer_preds.gather(1, e[:, None])[:, 0]
    depth = torch.as_tensor(layers, dtype=torch.long)[e]
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
    return 0.0 if best_tau is None else best_tau


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


def calibrate_max_drop(scores, layer_preds, layers: list[int], eps: float, delta: float) -> tuple[float, dict]:
    """Learn-then-Test, fixed sequence from safe to aggressive tau: keep lowering tau while the
    Clopper-Pearson upper bound on disagreement with the full model stays <= eps. The chosen tau then
    has disagreement <= eps with probability >= 1 - delta over the calibration draw."""
    full = layer_preds[:, -1]
    n = len(full)
    chosen, info = 2.0, {"n": n, "disagree": 0, "ucb": 0.0}
    for tau in tau_grid(scores):
        preds, _ = simulate(scores, layer_preds, layers, float(tau))
        k = int((preds != full).sum())
        ucb = clopper_pearson_upper(k, n, delta)
        if ucb > eps:
            break
        chosen, info = float(tau), {"n": n, "disagree": k, "ucb": ucb}
    return chosen, info
