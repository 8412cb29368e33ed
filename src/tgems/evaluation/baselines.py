"""Baselines T-GEMs are compared with: per-layer linear probes with confidence exits
(BranchyNet / Shallow-Deep Networks style), static truncation and the oracle exit."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tgems.calibration import NEVER_EXIT, calibrate_budget
from tgems.features import LayerFeatures
from tgems.profiles import ClassProfiles


def fit_probes(feats: LayerFeatures, layers: list[int], num_classes: int, epochs: int = 60, lr: float = 0.05,
               weight_decay: float = 1e-4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on the normalised readout z_l of every candidate layer, trained
    jointly (one weight tensor per layer); classes absent from the training data are never predicted."""
    torch.manual_seed(seed)
    x = F.normalize(feats.z[:, [l - 1 for l in layers]], dim=-1)  # (N, n, D)
    y = feats.labels
    n, D = len(layers), x.shape[-1]
    w = torch.zeros(n, D, num_classes, requires_grad=True)
    b = torch.zeros(n, num_classes, requires_grad=True)
    absent = torch.ones(num_classes, dtype=torch.bool)
    absent[y.unique()] = False
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(1024):
            logits = torch.einsum("bnd,ndc->bnc", x[idx], w) + b[None]
            logits = logits.masked_fill(absent, -1e4)
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat_interleave(n))
            opt.zero_grad()
            loss.backward()
            opt.step()
    bias = b.detach().masked_fill(absent, -1e4)
    return w.detach(), bias


class ProbeExits:
    """Exit at the first candidate layer whose probe's top-1 probability reaches tau; full CLIP at L."""

    def __init__(self, weight, bias, profiles: ClassProfiles):
        """`profiles` supply the candidate layers and the backbone's zero-shot head at the last layer."""
        self.w, self.b, self.profiles = weight, bias, profiles.to("cpu")
        self.layers, self.num_layers = list(profiles.layers), profiles.num_layers
        self.tau = NEVER_EXIT

    @property
    def exit_layers(self) -> list[int]:
        return self.profiles.exit_layers

    def probs(self, j: int, z: torch.Tensor) -> torch.Tensor:
        if j == len(self.layers):
            return self.profiles.probs(j, z.cpu())
        return (F.normalize(z.float().cpu(), dim=-1) @ self.w[j] + self.b[j]).softmax(-1)

    def layer_predictions(self, feats: LayerFeatures):
        probs = [self.probs(j, feats.z[:, l - 1]) for j, l in enumerate(self.layers)]
        probs.append(self.probs(len(self.layers), feats.z[:, -1]))
        p = torch.stack(probs, 1)
        return p[:, :-1].max(-1).values, p.argmax(-1)

    def calibrate_budget(self, feats: LayerFeatures, budget: float):
        scores, preds = self.layer_predictions(feats)
        self.tau = calibrate_budget(scores, preds, self.exit_layers, self.num_layers, budget, feats.labels)
        return self

    # engine policy interface
    @property
    def candidate_layers(self):
        return self.layers

    @property
    def num_classes(self) -> int:
        return self.profiles.num_classes

    @property
    def head_flops(self) -> float:
        return float(2 * self.w.shape[1] * self.w.shape[2])

    def decide(self, layer, z, rows, rates=None):
        j = self.layers.index(layer) if layer in self.layers else len(self.layers)
        p = self.probs(j, z)
        if j == len(self.layers):
            return torch.ones(len(rows), dtype=torch.bool), p
        return p.max(1).values >= self.tau, p


def oracle_depth(layer_preds: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """First layer from which the prediction equals the full model's and stays equal.
    layer_preds (N, n + 1) with the last column the full model."""
    agree = layer_preds == layer_preds[:, -1:]
    stays = torch.flip(torch.cumprod(torch.flip(agree.int(), [1]), 1), [1]).bool()
    first = stays.int().argmax(1)
    return torch.as_tensor(layers, dtype=torch.long)[first]
