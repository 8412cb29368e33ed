"""The Jumper: per-layer exit scores from cheap signals of the layer's class probabilities.

s_l(x) estimates P(prediction at layer l == full model's prediction) (the model used for max_drop
goals) or P(exiting at l costs no accuracy) (the model used for budget goals); fitting them is
`tgems.training.jumper_fit.fit_jumper` (docs/design.md). An image exits at the first candidate layer with s_l(x) >= tau (calibration.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tgems.profiles import ClassProfiles

NUM_SIGNALS = 6  # the confidence signals; the unit readout z_l follows them
NUM_SET_SIGNALS = 3  # label-set signals, after z_l (when the label set's text embeddings are given)
NUM_TRAJ_SIGNALS = 3  # trajectory signals, after the label-set ones (see trajectory_signals)
NUM_TAIL_SIGNALS = 5  # tail signals, after the trajectory ones (see tail_signals); the agreement model reads them
_TAIL_FLOOR = 1e-4
TOP_K = 5  # ranking stability: overlap of the top-k classes with the previous candidate layer's


def text_neighbours(text: torch.Tensor) -> torch.Tensor:
    """(C,) cosine of each class text to the nearest other class text of the label set (0 for one class)."""
    t = text.float()
    if t.shape[0] < 2:
        return torch.zeros(t.shape[0], device=t.device)
    cos = t @ t.T
    cos.fill_diagonal_(-2.0)
    return cos.max(1).values


def trajectory_signals(patience: torch.Tensor, pair: torch.Tensor | None) -> torch.Tensor:
    """(n, NUM_TRAJ_SIGNALS): patience (how many candidate layers in a row before this one kept the top-1),
    then `readout_pair` (zeros when not given)."""
    if pair is None:
        pair = torch.zeros(len(patience), 2, device=patience.device)
    return torch.cat([patience.float()[:, None], pair.float()], dim=1)


def tail_signals(conf: torch.Tensor, traj: torch.Tensor) -> torch.Tensor:
    """(n, NUM_TAIL_SIGNALS): how far from certainty the layer is, on a log scale: log(1 - top-1), log(margin),
    log(entropy), log(1 - the previous candidate's probability of this top-1) and log(1 - the distilled
    readout's top-1), each floored at 1e-4. A max_drop threshold sits where 1 - top-1 is a few thousandths;
    linear in the probabilities, the agreement model could not tell 0.995 from 0.9999 (docs/design.md)."""
    top1, margin, ent, prev_top, d_top1 = conf[:, 0], conf[:, 1], conf[:, 2], conf[:, 4], traj[:, 2]
    return torch.log(torch.stack([1 - top1, margin, ent, 1 - prev_top, 1 - d_top1], dim=1) + _TAIL_FLOOR)


def exit_signals(probs: torch.Tensor, prev_probs: torch.Tensor | None, z: torch.Tensor,
                 prev_z: torch.Tensor | None, text: torch.Tensor | None = None,
                 neighbours: torch.Tensor | None = None, traj: torch.Tensor | None = None) -> torch.Tensor:
    """(n, NUM_SIGNALS + D [+ NUM_SET_SIGNALS]): top-1, margin, normalised entropy, agreement and prob
    change vs the previous candidate layer, cosine of z with the previous candidate's z; then z_l / |z_l|
    itself, which lets the Jumper learn which kinds of image are settled early; then, when the label set's
    unit text embeddings `text` (C, D) and their `neighbours` (text_neighbours) are given, signals that
    describe the label set around the prediction rather than its class identity: the cosine between the
    top-2 classes' texts, the top-1 class text's cosine to its nearest other class text, and the overlap
    of the top-k classes with the previous candidate layer's top-k; then, with the label-set signals, the
    trajectory signals `traj` (trajectory_signals; zeros when not given) and the tail signals (tail_signals).
    A Jumper model reads the first `weight.shape[-1]` of them (NUM_SIGNALS: agreement models fit before
    issue 12; NUM_SIGNALS + D: budget models fit before the label-set signals; NUM_SIGNALS + D +
    NUM_SET_SIGNALS: before issue 27; all but the tail: budget models, and agreement models fit before the
    tail signals; all: current agreement models)."""
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
        cos = F.cosine_similarity(z.float(), prev_z.float(), dim=1)
    conf = torch.stack([top1, margin, ent, agree, prev_top, cos], dim=1)
    out = [conf, F.normalize(z.float(), dim=-1)]
    if text is not None:
        C = probs.shape[1]
        k = min(TOP_K, C)
        top = probs.topk(k, dim=1).indices
        pred, second = top[:, 0], top[:, min(1, k - 1)]
        t = text.float()
        pair = (t[pred] * t[second]).sum(-1) if C > 1 else torch.zeros_like(top1)
        if prev_probs is None:
            overlap = torch.zeros_like(top1)
        else:
            prev_top_k = prev_probs.topk(k, dim=1).indices
            overlap = (top[:, :, None] == prev_top_k[:, None, :]).any(2).float().mean(1)
        out.append(torch.stack([pair, neighbours[pred].float(), overlap], dim=1))
        traj = traj.float() if traj is not None else torch.zeros(len(top1), NUM_TRAJ_SIGNALS, device=top1.device)
        out += [traj, tail_signals(conf, traj)]
    return torch.cat(out, dim=1)


def next_patience(patience: torch.Tensor | None, probs: torch.Tensor, prev_probs: torch.Tensor | None) -> torch.Tensor:
    """Patience at this candidate layer: the previous one's + 1 where the top-1 is unchanged, else 0."""
    if prev_probs is None or patience is None:
        return torch.zeros(len(probs), device=probs.device)
    return torch.where(probs.argmax(1) == prev_probs.argmax(1), patience + 1, torch.zeros_like(patience))


def jumper_signals(probs: torch.Tensor, feats, layers: list[int], text: torch.Tensor | None = None,
                   pairs: torch.Tensor | None = None) -> torch.Tensor:
    """(N, n, S) exit signals at each candidate layer on cached features (the last layer needs none);
    with the label set's text embeddings, the label-set and trajectory signals too (see exit_signals);
    `pairs` (N, n, 2): `readout_pair` at each candidate layer (`profiles.layer_probs(..., pairs=True)`)."""
    out, prev_p, prev_z, patience = [], None, None, None
    neighbours = None if text is None else text_neighbours(text)
    for j, l in enumerate(layers):
        z = feats.z[:, l - 1]
        patience = next_patience(patience, probs[:, j], prev_p)
        traj = trajectory_signals(patience, None if pairs is None else pairs[:, j])
        out.append(exit_signals(probs[:, j], prev_p, z, prev_z, text, neighbours, traj))
        prev_p, prev_z = probs[:, j], z
    return torch.stack(out, 1)


def exit_head_flops(profiles: ClassProfiles) -> float:
    """Per row and candidate layer: scoring against C prototypes (and the distilled readout, see
    `ClassProfiles.scoring_flops`), the Jumper's signals (about 10 per class, 5 more for the top-k, 2 D for
    the top-2 texts' cosine, 6 per class for the readout pair) and its logistic model over them (2 per
    input)."""
    C, D = profiles.num_classes, profiles.text.shape[-1]
    traj = 2 * NUM_TRAJ_SIGNALS + 2 + (6 * C if profiles.distilled else 0)  # patience; the readout pair
    tail = 4 * NUM_TAIL_SIGNALS  # a subtraction and a logarithm each, then the logistic model's 2
    return profiles.scoring_flops() + float(15 * C + 2 * D + 2 * (NUM_SIGNALS + D + NUM_SET_SIGNALS) + traj + tail)


def exit_head_flops_by_layer(profiles: ClassProfiles) -> dict:
    """{exit layer: head FLOPs} of `exit_head_flops`, with the scoring counted against the shortlist at the
    layers that score only it (`ClassProfiles.contention_probs`); the signals still read all C classes."""
    full, out = exit_head_flops(profiles), {}
    for j, l in enumerate(profiles.exit_layers):
        out[l] = full - profiles.scoring_flops() + profiles.scoring_flops(j)
    return out


class Jumper:
    """One logistic model per candidate layer (signals -> exit score).

    `budget`, when set, is a second Jumper whose score serves budget goals (see `fit_jumper`);
    `for_goal` picks the model a calibration goal uses. `tau` is the checkpoint's default threshold."""

    def __init__(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, tau: float = 2.0,
                 budget: "Jumper | None" = None):
        self.weight, self.bias, self.tau, self.budget = weight, bias, tau, budget

    def for_goal(self, goal: str) -> "Jumper":
        return self.budget if goal == "budget" and self.budget is not None else self

    @property
    def num_layers(self) -> int:
        return 0 if self.weight is None else self.weight.shape[0]

    def to(self, device) -> "Jumper":
        move = (lambda t: None if t is None else t.to(device=device, dtype=torch.float32))
        return Jumper(move(self.weight), move(self.bias), self.tau,
                      None if self.budget is None else self.budget.to(device))

    def score(self, j: int, signals: torch.Tensor) -> torch.Tensor:
        # the same reduction as `scores`, so the engine's scores equal the cached ones bit for bit
        x = signals[..., :self.weight.shape[-1]].float()
        return torch.sigmoid((x * self.weight[j]).sum(-1) + self.bias[j])

    def scores(self, signals: torch.Tensor) -> torch.Tensor:
        """(N, n, S) -> (N, n)."""
        x = signals[..., :self.weight.shape[-1]].float()
        return torch.sigmoid((x * self.weight[None]).sum(-1) + self.bias[None])

    def state(self) -> dict:
        out = {"jumper.weight": self.weight, "jumper.bias": self.bias}
        if self.budget is not None:
            out.update({"jumper.budget.weight": self.budget.weight, "jumper.budget.bias": self.budget.bias})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_state(cls, tensors: dict, tau: float = 2.0) -> "Jumper":
        budget = None
        if "jumper.budget.weight" in tensors:
            budget = cls(tensors.pop("jumper.budget.weight"), tensors.pop("jumper.budget.bias"))
        return cls(tensors.pop("jumper.weight"), tensors.pop("jumper.bias"), tau, budget)
