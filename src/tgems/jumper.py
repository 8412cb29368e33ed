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
JUMPER_TARGETS = ("goal", "agree", "no_loss")


def exit_signals(probs: torch.Tensor, prev_probs: torch.Tensor | None, z: torch.Tensor,
                 prev_z: torch.Tensor | None) -> torch.Tensor:
    """(n, NUM_SIGNALS + D): top-1, margin, normalised entropy, agreement and prob change vs the previous
    candidate layer, cosine of z with the previous candidate's z; then z_l / |z_l| itself, which lets
    the Jumper learn which kinds of image are settled early. A Jumper with NUM_SIGNALS weights per layer
    (the agreement model) reads just those."""
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
    return torch.cat([conf, F.normalize(z.float(), dim=-1)], dim=1)


def jumper_signals(probs: torch.Tensor, feats, layers: list[int]) -> torch.Tensor:
    """(N, n, S) exit signals at each candidate layer on cached features (the last layer needs none)."""
    out, prev_p, prev_z = [], None, None
    for j, l in enumerate(layers):
        z = feats.z[:, l - 1]
        out.append(exit_signals(probs[:, j], prev_p, z, prev_z))
        prev_p, prev_z = probs[:, j], z
    return torch.stack(out, 1)


def exit_head_flops(profiles: ClassProfiles) -> float:
    """Per row and candidate layer: scoring against C prototypes, the Jumper's signals (about 10 per class)
    and its logistic model over them and the readout z_l (2 per input)."""
    C, D = profiles.num_classes, profiles.text.shape[-1]
    return profiles.scoring_flops() + float(10 * C + 2 * (NUM_SIGNALS + D))


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

    def fit(self, signals: torch.Tensor, target: torch.Tensor, l2: float = 1e-3, steps: int = 200) -> "Jumper":
        """signals (N, n, S), target (N, n) in {0, 1}: fit every layer's logistic model by L-BFGS."""
        n = signals.shape[1]
        x = signals.float()
        y = target.float()
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


def fit_jumper(profiles: ClassProfiles, feats, target: str = "goal") -> Jumper:
    """Fit the Jumper's per-layer logistic models on cached features (labels index the profiles' classes).

    `agree`: s_l estimates P(the layer-l prediction equals the full model's), needs no labels. `no_loss`:
    s_l estimates P(exiting at l costs no accuracy against the full model), i.e. layer l is right or the
    full model is wrong too; it needs labels and spends the depth on images that more depth can still fix.
    `goal` (the default): both, `agree` for max_drop goals (a bound on disagreement) and `no_loss` for
    budgets; without labels it falls back to `agree`. The `agree` model reads the confidence signals only;
    the `no_loss` model reads z_l too."""
    check_jumper_target(target)
    profiles = profiles.to("cpu")
    probs = layer_probs(profiles, feats)
    preds = probs.argmax(-1)
    signals = jumper_signals(probs, feats, profiles.layers)
    labelled = bool((feats.labels >= 0).all())
    if target == "no_loss" and not labelled:
        raise TGEMError("the no_loss Jumper target needs labelled images")
    agree = None
    if target != "no_loss":
        agree = Jumper().fit(signals[..., :NUM_SIGNALS], (preds[:, :-1] == preds[:, -1:]).float())
    if target == "agree" or not labelled:
        return agree
    labels = feats.labels[:, None]
    no_loss = Jumper().fit(signals, ((preds[:, :-1] == labels) | (preds[:, -1:] != labels)).float())
    if target == "no_loss":
        return no_loss
    agree.budget = no_loss
    return agree
