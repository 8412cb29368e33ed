"""The text-guided exit modules (G_l per candidate layer) and their checkpoint format.

A checkpoint is a directory: `tgem.safetensors` (the modules and the Jumper's weights) and `tgem.json`
(configuration, training settings, the backbone's fingerprint). See docs/design.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import tgems.artifacts as artifacts
from tgems.errors import TGEMError
from tgems.jumper import Jumper
from tgems.options import RECIPES, SPACES
from tgems.profiles import ClassProfiles, zero_shot_head

# 2: a `recipe` (issue 27); format 1 checkpoints load as "tgem". 3: `readout_patch`, distilled maps that read
# the mean-patch readouts too; format 2 ones read z_l alone. 4: an agreement model that may read the tail
# signals (jumper.tail_signals), wider than an older tgems computes; format 3 ones read the first 6 + D + 6
FORMAT_VERSION = artifacts.TGEM.format
RECIPE_BUFFERS = ("readout_weight", "readout_bias", "mix")  # what the distilled recipe adds to the modules
CONFIG, TENSORS = artifacts.TGEM.config, artifacts.TGEM.tensors


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
                 hidden: int = 256, recipe: str = "tgem", readout_patch: bool = False):
        super().__init__()
        if space not in SPACES:
            raise TGEMError(f"unknown feature space '{space}' (choose from {', '.join(SPACES)})")
        self.layers, self.num_layers, self.space = list(layers), num_layers, space
        self.embed_dim, self.out_dim, self.hidden = embed_dim, out_dim, hidden
        self.heads = nn.ModuleList(_Head(embed_dim, out_dim, space, hidden) for _ in self.layers)
        self.log_scale = nn.Parameter(torch.full((len(self.layers),), math.log(20.0)))
        self.register_buffer("center", torch.zeros(len(self.layers), out_dim))
        if recipe not in RECIPES:
            raise TGEMError(f"unknown exit recipe '{recipe}' (this tgems knows {', '.join(RECIPES)})")
        if recipe == "distilled" and space != "cls":
            raise TGEMError("distilled readouts map the readout z_l: they need the cls space")
        self.recipe, self.readout_patch = recipe, bool(readout_patch and recipe == "distilled")
        if recipe == "distilled":  # filled by training.readout_fit; see readouts.py
            n = len(self.layers)
            eye = torch.eye(embed_dim)
            if self.readout_patch:  # [unit z_l, unit m_l] -> z_L; initialised to read z_l alone
                eye = torch.cat([eye, torch.zeros(embed_dim, embed_dim)])
            self.register_buffer("readout_weight", eye.repeat(n, 1, 1))
            self.register_buffer("readout_bias", torch.zeros(n, embed_dim))
            self.register_buffer("mix", torch.tensor([[1.0, 0.0]]).repeat(n, 1))

    def raw_profiles(self, text: torch.Tensor) -> torch.Tensor:
        """(n, C, F) unit-norm (centred for rates) profiles of the text embeddings."""
        out = torch.stack([h(text) for h in self.heads], 0)
        if self.space == "rates":
            out = out - self.center[:, None]
        return F.normalize(out, dim=-1)

    def profiles(self, text: torch.Tensor, backbone) -> ClassProfiles:
        """Profiles of a label set (text: (C, D) class embeddings), on the backbone's device."""
        with torch.no_grad():
            text = text.float().cpu()
            distilled = {}
            if self.recipe == "distilled":
                distilled = {"readout_weight": self.readout_weight.clone(), "readout_bias": self.readout_bias.clone(),
                             "mix": self.mix.clone(),
                             "patch_flops": float(backbone.flops_patch_readout()) if self.readout_patch else 0.0}
            prof = ClassProfiles(self.space, self.layers, self.raw_profiles(text),
                                 self.center.clone() if self.space == "rates" else None,
                                 self.log_scale.exp().clone(), text, num_layers=self.num_layers,
                                 **zero_shot_head(backbone), **distilled)
        return prof.to(backbone.device)


def save_tgem(path, tgem: TGEM, jumper: Jumper, backbone, info: dict, data_spec: str = "") -> Path:
    """Write atomically (tgems.artifacts); replaces an earlier checkpoint or an empty directory, nothing else."""
    tensors = dict(tgem.state_dict())
    tensors.update(jumper.state())
    config = {"format": FORMAT_VERSION, "backbone": backbone.name, "family": backbone.family,
              "fingerprint": backbone.fingerprint(), "num_layers": tgem.num_layers, "layers": tgem.layers,
              "space": tgem.space, "embed_dim": tgem.embed_dim, "out_dim": tgem.out_dim, "hidden": tgem.hidden,
              "recipe": tgem.recipe, "readout_patch": tgem.readout_patch, "tau": jumper.tau, "data": data_spec, **info}
    return artifacts.write(path, artifacts.TGEM, config, tensors)


REQUIRED = ("layers", "num_layers", "embed_dim", "out_dim", "space", "hidden", "fingerprint")


def read_tgem_config(name_or_path) -> dict:
    """The checkpoint's configuration; a name ("embedded:cls") or a directory."""
    from tgems.pretrained import tgem_path

    return artifacts.read_config(tgem_path(name_or_path), artifacts.TGEM, REQUIRED)


load_tensors = artifacts.load_tensors


def load_tgem(name_or_path, backbone) -> tuple[TGEM, Jumper, dict]:
    """Load a checkpoint (a name such as "embedded:cls" or a directory), refusing one made for another backbone."""
    from tgems.pretrained import tgem_path

    path = tgem_path(name_or_path)
    cfg = read_tgem_config(path)
    artifacts.check_backbone(cfg, backbone, path, "T-GEM checkpoint")
    # checkpoints before format 2 have no recipe: T-GEM profiles only, as they were fit
    tgem = TGEM(cfg["layers"], cfg["num_layers"], cfg["embed_dim"], cfg["out_dim"], cfg["space"], cfg["hidden"],
                cfg.get("recipe", "tgem"), cfg.get("readout_patch", False))
    tensors = artifacts.read_tensors(path, artifacts.TGEM, cfg)
    try:
        jumper = Jumper.from_state(tensors, cfg.get("tau", 2.0))
        tgem.load_state_dict(tensors)
    except (KeyError, RuntimeError) as e:
        why = str(e).strip().splitlines()[0]
        raise TGEMError(f"{path / TENSORS} does not match {path / CONFIG}: {why}") from None
    tgem.eval()
    return tgem, jumper, cfg
