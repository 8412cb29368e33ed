"""Per-layer class profiles: what an image of class c looks like at layer l.

Two sources behind one object (`ClassProfiles`): text-guided (T-GEM: a small module G_l maps the
text embedding t_c to the profile, so new label sets need only text) and sample-based (mean feature
of k labelled images per class). Two feature spaces: `cls` (the readout z_l) and `rates` (MLP
activation rates). The last layer always scores with full CLIP zero-shot, so never exiting early
reproduces the full model exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tgems.errors import TGEMError
from tgems.jumper import NUM_SIGNALS

SPACES = ("cls", "rates")


def check_labels(labels) -> list[str]:
    labels = list(labels) if labels is not None else []
    if not labels:
        raise TGEMError("the label list is empty")
    if any(not isinstance(t, str) or not t.strip() for t in labels):
        raise TGEMError("every label must be a non-empty string")
    seen = set()
    dups = sorted({t for t in labels if t in seen or seen.add(t)})
    if dups:
        raise TGEMError(f"duplicate labels: {', '.join(dups)}")
    return labels


def class_embeddings(backbone, labels, templates=("{}",)) -> torch.Tensor:
    """(C, D) normalised prompt-ensemble text embeddings (mean of normalised template embeddings)."""
    labels = check_labels(labels)
    templates = list(templates) or ["{}"]
    texts = [t.format(c) for c in labels for t in templates]
    emb = F.normalize(backbone.encode_text(texts).float(), dim=-1).view(len(labels), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def _score(x: torch.Tensor, protos: torch.Tensor, center: torch.Tensor | None, scale) -> torch.Tensor:
    if center is not None:
        x = x - center
    return scale * F.normalize(x.float(), dim=-1) @ protos.t()


@dataclass
class ClassProfiles:
    """Prototypes for one label set at each candidate layer (< L), plus full CLIP at L.

    protos: (n, C, F) unit-norm (after centring); center: (n, F) or None; scale: (n,);
    text: (C, D) unit-norm class text embeddings; final_scale: CLIP's logit scale.
    """

    space: str
    layers: list[int]
    protos: torch.Tensor
    center: torch.Tensor | None
    scale: torch.Tensor
    text: torch.Tensor
    final_scale: float
    num_layers: int

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    def logits(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Logits at candidate index j (j == len(layers) is the last layer, x then the readout z_L)."""
        if j == len(self.layers):
            return _score(x, self.text, None, self.final_scale)
        return _score(x, self.protos[j], None if self.center is None else self.center[j], self.scale[j])

    def layer_logits(self, feats, final_z: torch.Tensor) -> torch.Tensor:
        """(N, n + 1, C) logits on cached features (feats: (N, L, F) of this space)."""
        out = [self.logits(j, feats[:, l - 1]) for j, l in enumerate(self.layers)]
        out.append(self.logits(len(self.layers), final_z))
        return torch.stack(out, 1)

    def head_flops(self) -> float:
        """Per row and candidate layer: scoring against C prototypes plus the Jumper's signals (about 10
        per class) and its logistic model over them and the readout z_l (2 per input)."""
        f = self.protos.shape[-1] if len(self.layers) else self.text.shape[-1]
        return float(2 * self.num_classes * f + 10 * self.num_classes + 2 * (NUM_SIGNALS + self.text.shape[-1]))


# ------------------------------------------------------------------ text-guided exit modules


class _Head(nn.Module):
    """G_l: residual MLP (cls) or sigmoid MLP (rates) from the text embedding to the layer-l profile."""

    def __init__(self, embed_dim: int, out_dim: int, space: str, hidden: int):
        super().__init__()
        self.space = space
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            self.net = nn.Sequential(nn.Linear(embed_dim, out_dim))
        if space == "cls":
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t + self.net(t) if self.space == "cls" else torch.sigmoid(self.net(t))


class TGEM(nn.Module):
    """The text-guided exit modules of one backbone: G_l and a temperature for each candidate layer."""

    def __init__(self, layers: list[int], num_layers: int, embed_dim: int, out_dim: int, space: str = "cls",
                 hidden: int = 256):
        super().__init__()
        if space not in SPACES:
            raise TGEMError(f"unknown feature space '{space}' (choose from {', '.join(SPACES)})")
        self.layers, self.num_layers, self.space = list(layers), num_layers, space
        self.embed_dim, self.out_dim, self.hidden = embed_dim, out_dim, hidden
        self.heads = nn.ModuleList(_Head(embed_dim, out_dim, space, hidden) for _ in self.layers)
        self.log_scale = nn.Parameter(torch.full((len(self.layers),), math.log(20.0)))
        self.register_buffer("center", torch.zeros(len(self.layers), out_dim))

    def raw_profiles(self, text: torch.Tensor) -> torch.Tensor:
        """(n, C, F) unit-norm (centred for rates) profiles of the text embeddings."""
        out = torch.stack([h(text) for h in self.heads], 0)
        if self.space == "rates":
            out = out - self.center[:, None]
        return F.normalize(out, dim=-1)

    def profiles(self, text: torch.Tensor, final_scale: float) -> ClassProfiles:
        with torch.no_grad():
            return ClassProfiles(self.space, self.layers, self.raw_profiles(text), self.center.clone()
                                 if self.space == "rates" else None, self.log_scale.exp().clone(), text,
                                 final_scale, self.num_layers)


def sample_profiles(feats, labels: torch.Tensor, num_classes: int, text: torch.Tensor, layers: list[int],
                    num_layers: int, final_scale: float, space: str = "cls", k: int = 16, seed: int = 0,
                    scale: float = 30.0) -> ClassProfiles:
    """k-shot profiles: mean feature of (at most) k images per class; classes with no image fall back to
    the text embedding for `cls` and are unreachable (zero prototype) for `rates`."""
    g = torch.Generator().manual_seed(seed)
    n, Fdim = len(layers), feats.shape[-1]
    center = None
    if space == "rates":
        center = torch.stack([feats[:, l - 1].float().mean(0) for l in layers])
    protos = torch.zeros(n, num_classes, Fdim)
    for c in range(num_classes):
        idx = torch.nonzero(labels == c)[:, 0]
        if len(idx) == 0:
            if space == "cls":
                protos[:, c] = text[c]
            continue
        idx = idx[torch.randperm(len(idx), generator=g)[:k]]
        for j, l in enumerate(layers):
            x = feats[idx, l - 1].float()
            if space == "rates":
                x = x - center[j]
            protos[j, c] = F.normalize(x, dim=-1).mean(0)
    return ClassProfiles(space, list(layers), F.normalize(protos, dim=-1), center, torch.full((n,), scale),
                         text, final_scale, num_layers)
