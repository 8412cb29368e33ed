"""Per-layer class profiles: what an image of class c looks like at layer l, and how images are scored.

Two sources behind one object (`ClassProfiles`): text-guided (a T-GEM module G_l maps the class text
embedding to the profile, see tgem.py) and sample-based (mean feature of k labelled images per class).
Two feature spaces: `cls` (the readout z_l) and `rates` (MLP activation rates). The last layer scores
with the backbone's own zero-shot head, so never exiting early reproduces the full model exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tgems.errors import TGEMError

SPACES = ("cls", "rates")
DEFAULT_TEMPLATES = ("{}", "a photo of {}", "a picture of {}")


def default_templates(data_name: str) -> list[str]:
    """Prompt templates for a dataset: the scenes' own wording for scenes, CLIP's usual ones otherwise."""
    if data_name.startswith("scenes"):
        from tgems.data.scenes import PROMPT_TEMPLATES

        return list(PROMPT_TEMPLATES)
    return list(DEFAULT_TEMPLATES)


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
    """(C, D) normalised prompt-ensemble text embeddings (mean of normalised template embeddings), float32."""
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
    """Prototypes for one label set at each candidate layer (< L), plus the backbone's zero-shot head at L.

    protos: (n, C, F) unit-norm (after centring); center: (n, F) or None; scale: (n,);
    text: (C, D) unit-norm class text embeddings; final_scale / final_bias / activation: the backbone's
    zero-shot head (softmax over scale * cos for CLIP, sigmoid of scale * cos + bias for SigLIP).
    All tensors are float32 on one device (`to`).
    """

    space: str
    layers: list[int]
    protos: torch.Tensor
    center: torch.Tensor | None
    scale: torch.Tensor
    text: torch.Tensor
    final_scale: float
    num_layers: int
    final_bias: float = 0.0
    activation: str = "softmax"

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    @property
    def exit_layers(self) -> list[int]:
        """Candidate layers then the last layer: the columns of every per-layer prediction table."""
        return list(self.layers) + [self.num_layers]

    @property
    def device(self) -> torch.device:
        return self.text.device

    def to(self, device) -> "ClassProfiles":
        move = (lambda t: None if t is None else t.to(device=device, dtype=torch.float32))
        return replace(self, protos=move(self.protos), center=move(self.center), scale=move(self.scale),
                       text=move(self.text))

    def logits(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Logits at candidate index j (j == len(layers) is the last layer, x then the readout z_L)."""
        if j == len(self.layers):
            return _score(x, self.text, None, self.final_scale) + self.final_bias
        return _score(x, self.protos[j], None if self.center is None else self.center[j], self.scale[j])

    def probs(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities at candidate index j: softmax over the label set, except at the last layer of
        a sigmoid-scored backbone, whose per-class probabilities are its own."""
        logits = self.logits(j, x)
        if j == len(self.layers) and self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits.softmax(-1)

    def layer_logits(self, feats, final_z: torch.Tensor) -> torch.Tensor:
        """(N, n + 1, C) logits on cached features (feats: (N, L, F) of this space)."""
        out = [self.logits(j, feats[:, l - 1]) for j, l in enumerate(self.layers)]
        out.append(self.logits(len(self.layers), final_z))
        return torch.stack(out, 1)

    def scoring_flops(self) -> float:
        """Per row and candidate layer: scoring against C prototypes."""
        f = self.protos.shape[-1] if len(self.layers) else self.text.shape[-1]
        return float(2 * self.num_classes * f)

    def state(self) -> dict:
        out = {"profiles.protos": self.protos, "profiles.scale": self.scale, "profiles.text": self.text}
        if self.center is not None:
            out["profiles.center"] = self.center
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def config(self) -> dict:
        return {"space": self.space, "layers": list(self.layers), "num_layers": self.num_layers,
                "final_scale": self.final_scale, "final_bias": self.final_bias, "activation": self.activation}

    @classmethod
    def from_state(cls, tensors: dict, config: dict) -> "ClassProfiles":
        return cls(config["space"], list(config["layers"]), tensors["profiles.protos"], tensors.get("profiles.center"),
                   tensors["profiles.scale"], tensors["profiles.text"], float(config["final_scale"]),
                   int(config["num_layers"]), float(config.get("final_bias", 0.0)), config.get("activation", "softmax"))


def zero_shot_head(backbone) -> dict:
    """The backbone's zero-shot head as ClassProfiles fields."""
    return {"final_scale": backbone.logit_scale(), "final_bias": backbone.logit_bias(),
            "activation": backbone.score_activation}


def layer_probs(profiles: ClassProfiles, feats) -> torch.Tensor:
    """(N, n + 1, C) probabilities at every candidate layer and the last, on cached features."""
    x = feats.space(profiles.space)
    out = [profiles.probs(j, x[:, l - 1]) for j, l in enumerate(profiles.layers)]
    out.append(profiles.probs(len(profiles.layers), feats.z[:, -1]))
    return torch.stack(out, 1)


def sample_profiles(feats, labels: torch.Tensor, num_classes: int, text: torch.Tensor, layers: list[int],
                    num_layers: int, head: dict, space: str = "cls", k: int = 16, seed: int = 0,
                    scale: float = 30.0) -> ClassProfiles:
    """k-shot profiles: mean feature of (at most) k images per class; classes with no image fall back to
    the text embedding for `cls` and are unreachable (zero prototype) for `rates`. `head`: zero_shot_head."""
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
                         text.cpu(), num_layers=num_layers, **head)
