"""Distilled readouts (issue 27): per candidate layer, an affine map from the unit readout z_l to an estimate
of the unit final embedding z_L, fit label-free (ridge regression on cached features,
`tgems.training.readout_fit`). Scored against the raw class texts with the backbone's own zero-shot scale,
it is a second readout of layer l, independent of the T-GEM profiles; `ClassProfiles` mixes the two with
per-layer weights (`mix`), and the Jumper reads whether they agree (docs/design.md, "Distilled readouts")."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distilled_embed(weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(n, D) unit estimate of z_L from the layer's readouts z (n, D): normalise(unit(z) @ weight + bias)."""
    return F.normalize(F.normalize(z.float(), dim=-1) @ weight + bias, dim=-1)


def distilled_flops(dim: int, scored: int) -> float:
    """Per row and candidate layer: the affine map (2 D^2 + D), two normalisations (about 6 D) and scoring
    against `scored` class texts (2 C D)."""
    return float(2 * dim * dim + 7 * dim + 2 * scored * dim)


def readout_pair(t: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """(n, 2): whether the T-GEM and the distilled readout (their logits t, d over the same classes) pick the
    same top-1, and the distilled readout's top-1 probability; zeros without a distilled readout. Two of the
    Jumper's trajectory signals (`jumper.trajectory_signals`)."""
    if d is None:
        return torch.zeros(len(t), 2, device=t.device)
    return torch.stack([(t.argmax(1) == d.argmax(1)).float(), d.softmax(-1).max(1).values], dim=1)
