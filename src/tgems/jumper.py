"""The Jumper: per-layer exit scores from cheap signals of the layer's class probabilities.

s_l(x) estimates P(prediction at layer l == full model's prediction) (the model used for max_drop
goals) or P(exiting at l costs no accuracy) (the model used for budget goals); see `fit_jumper` and
docs/design.md. An image exits at the first candidate layer with s_l(x) >= tau (calibration.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tgems.errors import TGEMError
from tgems.profiles import ClassProfiles, layer_probs

NUM_SIGNALS = 6  # the confidence signals; the unit readout z_l follows them
NUM_SET_SIGNALS = 3  # label-set signals, after z_l (when the label set's text embeddings are given)
TOP_K = 5  # ranking stability: overlap of the top-k classes with the previous candidate layer's
JUMPER_TARGETS = ("goal", "agree", "no_loss")


def text_neighbours(text: torch.Tensor) -> torch.Tensor:
    """(C,) cosine of each class text to the nearest other class text of the label set (0 for one class)."""
    t = text.float()
    if t.shape[0] < 2:
        return torch.zeros(t.shape[0], device=t.device)
    cos = t @ t.T
    cos.fill_diagonal_(-2.0)
    return cos.max(1).values


def exit_signals(probs: torch.Tensor, prev_probs: torch.Tensor | None, z: torch.Tensor,
                 prev_z: torch.Tensor | None, text: torch.Tensor | None = None,
                 neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """(n, NUM_SIGNALS + D [+ NUM_SET_SIGNALS]): top-1, margin, normalised entropy, agreement and prob
    change vs the previous candidate layer, cosine of z with the previous candidate's z; then z_l / |z_l|
    itself, which lets the Jumper learn which kinds of image are settled early; then, when the label set's
    unit text embeddings `text` (C, D) and their `neighbours` (text_neighbours) are given, signals that
    describe the label set around the prediction rather than its class identity: the cosine between the
    top-2 classes' texts, the top-1 class text's cosine to its nearest other class text, and the overlap
    of the top-k classes with the previous candidate layer's top-k. A Jumper model reads the first
    `weight.shape[-1]` of them (NUM_SIGNALS: agreement models fit before issue 12; NUM_SIGNALS + D: budget
    models fit before the label-set signals; all: current models)."""
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
    return torch.cat(out, dim=1)


def jumper_signals(probs: torch.Tensor, feats, layers: list[int], text: torch.Tensor | None = None) -> torch.Tensor:
    """(N, n, S) exit signals at each candidate layer on cached features (the last layer needs none);
    with the label set's text embeddings, the label-set signals too (see exit_signals)."""
    out, prev_p, prev_z = [], None, None
    neighbours = None if text is None else text_neighbours(text)
    for j, l in enumerate(layers):
        z = feats.z[:, l - 1]
        out.append(exit_signals(probs[:, j], prev_p, z, prev_z, text, neighbours))
        prev_p, prev_z = probs[:, j], z
    return torch.stack(out, 1)


def exit_head_flops(profiles: ClassProfiles) -> float:
    """Per row and candidate layer: scoring against C prototypes, the Jumper's signals (about 10 per class,
    5 more for the top-k, 2 D for the top-2 texts' cosine) and its logistic model over them, the readout
    z_l and the label-set signals (2 per input)."""
    C, D = profiles.num_classes, profiles.text.shape[-1]
    return profiles.scoring_flops() + float(15 * C + 2 * D + 2 * (NUM_SIGNALS + D + NUM_SET_SIGNALS))


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

    def fit(self, signals: torch.Tensor, target: torch.Tensor, l2: float = 1e-3, steps: int = 200,
            standardize: bool = False) -> "Jumper":
        """signals (N, n, S), target (N, n) in {0, 1}: fit every layer's logistic model by L-BFGS.
        `standardize`: fit (and penalise) on signals scaled to unit variance over all layers, then fold the
        scaling into the weights, so scoring reads the raw signals as before."""
        n = signals.shape[1]
        x = signals.float()
        y = target.float()
        if standardize:
            mu, sd = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-3)
            x = (x - mu) / sd
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
        if standardize:
            self.weight = self.weight / sd
            self.bias = self.bias - (self.weight * mu).sum(-1)
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


def check_jumper_target(target: str) -> None:
    if target not in JUMPER_TARGETS:
        raise TGEMError(f"unknown Jumper target '{target}' (choose from {', '.join(JUMPER_TARGETS)})")


def _training_set(profiles: ClassProfiles, feats) -> tuple[torch.Tensor, torch.Tensor]:
    """(signals (N, n, S), predictions (N, n + 1)) of one set of exit modules on cached features."""
    profiles = profiles.to("cpu")
    probs = layer_probs(profiles, feats)
    return jumper_signals(probs, feats, profiles.layers, profiles.text), probs.argmax(-1)


def _fit_on(signals: torch.Tensor, target: torch.Tensor, cols: torch.Tensor) -> Jumper:
    """A Jumper fit on standardised signal columns `cols`, zero weights on the others."""
    fit = Jumper().fit(signals[..., cols], target.float(), standardize=True)
    weight = torch.zeros(fit.weight.shape[0], signals.shape[-1])
    weight[:, cols] = fit.weight
    return Jumper(weight, fit.bias)


def fit_jumper(profiles: ClassProfiles, feats, target: str = "goal", cross: list[ClassProfiles] = ()) -> Jumper:
    """Fit the Jumper's per-layer logistic models on cached features (labels index the profiles' classes).

    `agree`: s_l estimates P(the layer-l prediction equals the full model's), needs no labels. `no_loss`:
    s_l estimates P(exiting at l costs no accuracy against the full model), i.e. layer l is right or the
    full model is wrong too; it needs labels and spends the depth on images that more depth can still fix.
    `goal` (the default): both, `agree` for max_drop goals (a bound on disagreement) and `no_loss` for
    budgets; without labels it falls back to `agree`. Both read the confidence and label-set signals, fit
    on standardised signals. `cross`: profiles of the same classes from cross-fitted modules (each trained
    on part of the classes, see `training.fit.fit_tgem`); the no-loss model then learns from these images
    scored by every set of modules, and reads z_l too. Otherwise z_l weights are zero: fit on the modules'
    own classes only, a readout-based model learned which images of those classes settle early, and did
    not transfer to text-only classes (docs/design.md)."""
    check_jumper_target(target)
    signals, preds = _training_set(profiles, feats)
    labelled = bool((feats.labels >= 0).all())
    if target == "no_loss" and not labelled:
        raise TGEMError("the no_loss Jumper target needs labelled images")
    width = signals.shape[-1]
    readable = torch.cat([torch.arange(NUM_SIGNALS), torch.arange(width - NUM_SET_SIGNALS, width)])
    agree = None
    if target != "no_loss":
        agree = _fit_on(signals, preds[:, :-1] == preds[:, -1:], readable)
    if target == "agree" or not labelled:
        return agree
    if cross:
        sets = [(signals, preds)] + [_training_set(p, feats) for p in cross]
        signals, preds = torch.cat([x for x, _ in sets]), torch.cat([p for _, p in sets])
    labels = feats.labels.repeat(len(cross) + 1)[:, None]
    no_loss = _fit_on(signals, (preds[:, :-1] == labels) | (preds[:, -1:] != labels),
                      torch.arange(width) if cross else readable)
    if target == "no_loss":
        return no_loss
    agree.budget = no_loss
    return agree
