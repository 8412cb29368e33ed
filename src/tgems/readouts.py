"""Distilled readouts (issue 27): per candidate layer, an affine map from the unit readout z_l (and, in maps
fit since the mean-patch readouts, the unit mean-patch readout m_l beside it) to an estimate of the unit final
embedding z_L, fit label-free (ridge regression on cached features,
`tgems.training.readout_fit`). Scored against the raw class texts with the backbone's own zero-shot scale,
it is a second readout of layer l, independent of the T-GEM profiles; `ClassProfiles` mixes the two with
per-layer weights (`mix`), and the Jumper reads whether they agree (docs/design.md, "Distilled readouts")."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reads_patch(weight: torch.Tensor) -> bool:
    """Whether maps of this weight (n, D_in, D) read [unit z_l, unit m_l] (D_in = 2 D) or z_l alone."""
    return weight.shape[-2] == 2 * weight.shape[-1]


def map_input(z: torch.Tensor, patch: torch.Tensor | None, weight: torch.Tensor,
              what: str = "distilled readouts") -> torch.Tensor:
    """What the map reads: the unit readout, then the unit mean-patch readout where the map reads it (the
    retrieval maps of `tgems.retrieval` read the same; `what` names the maps in the refusal)."""
    x = F.normalize(z.float(), dim=-1)
    if not reads_patch(weight):
        return x
    if patch is None:
        from tgems.errors import TGEMError

        raise TGEMError(f"these {what} read the mean-patch readouts m_l, which were not given")
    return torch.cat([x, F.normalize(patch.float(), dim=-1)], dim=-1)


def distilled_embed(weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor,
                    patch: torch.Tensor | None = None) -> torch.Tensor:
    """(n, D) unit estimate of z_L from the layer's readouts z (n, D) (and mean-patch readouts (n, D)):
    normalise(map_input @ weight + bias)."""
    return F.normalize(map_input(z, patch, weight) @ weight + bias, dim=-1)


def distilled_flops(dim: int, scored: int, dim_in: int | None = None) -> float:
    """Per row and candidate layer: the affine map (2 D_in D + D), the normalisations (about 3 D_in + 3 D)
    and scoring against `scored` class texts (2 C D). The mean-patch readout itself is the backbone's
    (`flops_patch_readout`), counted by the profiles."""
    dim_in = dim if dim_in is None else dim_in
    return float(2 * dim_in * dim + 3 * dim_in + 4 * dim + 2 * scored * dim)


def readout_pair(t: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """(n, 2): whether the T-GEM and the distilled readout (their logits t, d over the same classes) pick the
    same top-1, and the distilled readout's top-1 probability; zeros without a distilled readout. Two of the
    Jumper's trajectory signals (`jumper.trajectory_signals`)."""
    if d is None:
        return torch.zeros(len(t), 2, device=t.device)
    return torch.stack([(t.argmax(1) == d.argmax(1)).float(), d.softmax(-1).max(1).values], dim=1)
