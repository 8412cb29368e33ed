"""Training of the text-guided exit modules and the Jumper, and their checkpoint format.

Image and text encoders stay frozen: per-layer features are extracted once, training then touches
only that cache. The checkpoint is a directory with `tgem.safetensors` (tensors) and `tgem.json`
(configuration, training settings and the backbone's fingerprint).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tgems.errors import TGEMError
from tgems.features import LayerFeatures, extract_features
from tgems.jumper import NUM_SIGNALS, Jumper, calibrate_budget, exit_signals
from tgems.profiles import TGEM, ClassProfiles, class_embeddings

FORMAT_VERSION = 1


@dataclass
class FitSettings:
    space: str = "cls"
    layers: list[int] | None = None  # candidate layers; default every layer but the last
    hidden: int = 256
    epochs: int = 30
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-3
    caption_weight: float = 0.5
    lam: float = 0.0  # rate-based regularizer strength (0 = off)
    r_target: float = 0.4  # target expected fraction of layers run
    soft_tau: float | None = None  # confidence threshold of the soft exits; None: from the data (see fit_tgem)
    soft_k: float = 20.0  # sharpness of the soft exits
    jumper_fraction: float = 0.2  # part of the data held out of G_l training to fit the Jumper
    default_budget: float = 0.5  # the checkpoint's tau meets this budget on the Jumper's data
    jumper_target: str = "goal"  # what the Jumper's score estimates: see fit_jumper
    seed: int = 0


def default_templates(data_name: str) -> list[str]:
    if data_name.startswith("scenes"):
        from tgems.data.scenes import PROMPT_TEMPLATES

        return list(PROMPT_TEMPLATES)
    return ["{}", "a photo of {}", "a picture of {}"]


def final_scale(backbone) -> float:
    return float(backbone.model.logit_scale.exp().clamp(max=100).item())


def layer_probs(profiles: ClassProfiles, feats: LayerFeatures) -> torch.Tensor:
    """(N, n + 1, C) probabilities at every candidate layer and the last."""
    x = feats.space(profiles.space)
    return profiles.layer_logits(x, feats.z[:, -1]).softmax(-1)


def jumper_signals(probs: torch.Tensor, feats: LayerFeatures, layers: list[int]) -> torch.Tensor:
    """(N, n, S) exit signals at each candidate layer (the last layer needs none)."""
    out, prev_p, prev_z = [], None, None
    for j, l in enumerate(layers):
        z = feats.z[:, l - 1]
        out.append(exit_signals(probs[:, j], prev_p, z, prev_z))
        prev_p, prev_z = probs[:, j], z
    return torch.stack(out, 1)


JUMPER_TARGETS = ("goal", "agree", "no_loss")


def _check_jumper_target(target: str) -> None:
    if target not in JUMPER_TARGETS:
        raise TGEMError(f"unknown Jumper target '{target}' (choose from {', '.join(JUMPER_TARGETS)})")


def fit_jumper(profiles: ClassProfiles, feats: LayerFeatures, target: str = "goal") -> Jumper:
    """Fit the Jumper's per-layer logistic models. `agree` (DESIGN.md): s_l estimates P(the layer-l
    prediction equals the full model's), needs no labels. `no_loss`: s_l estimates P(exiting at l costs
    no accuracy against the full model), i.e. layer l is right or the full model is wrong too; it needs
    labels and spends the depth on images that more depth can still fix. `goal` (the default when labels
    are there): both, `agree` for max_drop goals (a bound on disagreement) and `no_loss` for budgets
    (best accuracy per layer); without labels it falls back to `agree`. The `agree` model reads the
    confidence signals only (the readout z_l did not help it); the `no_loss` model reads z_l too."""
    _check_jumper_target(target)
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


def _soft_exit_terms(logits, ce, final_ce, layers, num_layers, s: FitSettings):
    """Differentiable expected depth r(x) and exit-weighted loss from the soft exits."""
    conf = logits.softmax(-1).max(-1).values  # (B, n)
    e = torch.sigmoid(s.soft_k * (conf - s.soft_tau))
    stay = torch.cumprod(torch.cat([torch.ones_like(e[:, :1]), 1 - e], 1), 1)  # (B, n + 1)
    q = torch.cat([e * stay[:, :-1], stay[:, -1:]], 1)
    depth = torch.tensor(list(layers) + [num_layers], dtype=torch.float32) / num_layers
    r = (q * depth).sum(1)
    weighted = (q[:, :-1] * ce).sum(1) + q[:, -1] * final_ce
    return r, weighted


def _train_modules(tgem: TGEM, x, y, cap_idx, cap_text, class_text, final_ce, s: FitSettings, progress):
    layers = tgem.layers
    opt = torch.optim.AdamW(tgem.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    g = torch.Generator().manual_seed(s.seed)
    steps_per_epoch = max(1, math.ceil(len(y) / s.batch_size))
    total = s.epochs * steps_per_epoch
    # OneCycleLR divides by zero when pct_start * total_steps == 1 (10 steps in all with 0.1)
    pct_start = 0.1 if total != 10 else 0.2
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total, pct_start=pct_start)
    bar = tqdm(total=total, desc=f"fit T-GEM ({tgem.space})", disable=not progress, leave=False)
    history = []
    for epoch in range(s.epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(steps_per_epoch):
            b = perm[i * s.batch_size:(i + 1) * s.batch_size]
            xb = x[b].float()  # (B, n, F)
            if tgem.space == "rates":
                xb = xb - tgem.center[None]
            xb = F.normalize(xb, dim=-1)
            scale = tgem.log_scale.exp()[None, :, None]
            logits = scale * torch.einsum("bnf,ncf->bnc", xb, tgem.raw_profiles(class_text))
            ce = F.cross_entropy(logits.flatten(0, 1), y[b].repeat_interleave(len(layers)),
                                 reduction="none").view(len(b), -1)
            loss = ce.mean()
            if cap_text is not None and s.caption_weight > 0:
                cap_logits = scale * torch.einsum("bnf,nkf->bnk", xb, tgem.raw_profiles(cap_text[cap_idx[b]]))
                pos = (y[b][:, None] == y[b][None, :]).float()
                target = (pos / pos.sum(1, keepdim=True))[:, None].expand_as(cap_logits)
                loss = loss + s.caption_weight * -(target * cap_logits.log_softmax(-1)).sum(-1).mean()
            r, weighted = _soft_exit_terms(logits, ce, final_ce[b], layers, tgem.num_layers, s)
            loss = loss + weighted.mean()
            if s.lam > 0:
                loss = loss + s.lam * F.relu(r.mean() - s.r_target) ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        history.append({"epoch": epoch, "loss": round(loss.item(), 4), "expected_depth": round(r.mean().item(), 4)})
        bar.set_postfix(loss=f"{loss.item():.3f}", r=f"{r.mean().item():.3f}")
    bar.close()
    return history


def fit_tgem(backbone, data, settings: FitSettings | None = None, templates=None, feats: LayerFeatures | None = None,
             progress: bool = True):
    """Train T-GEMs (G_l for each candidate layer) and the Jumper on a captioned/labelled dataset.

    Returns (tgem, jumper, info). Only the classes present in `data` are used for training."""
    s = settings or FitSettings()
    L = backbone.num_layers
    layers = sorted(set(s.layers or range(1, L)))
    if not layers or layers[0] < 1 or layers[-1] >= L:
        raise TGEMError(f"candidate layers must lie in 1..{L - 1} (the last layer is always an exit)")
    s.layers = layers
    _check_jumper_target(s.jumper_target)
    if s.soft_tau is not None and not 0 < s.soft_tau < 1:
        raise TGEMError(f"soft_tau must lie in (0, 1), got {s.soft_tau}")
    templates = list(templates or default_templates(data.name))
    torch.manual_seed(s.seed)
    if feats is None:
        feats = extract_features(backbone, data, rates=s.space == "rates", progress=progress, desc="cache features")
    present = np.unique(data.labels)
    classes = [data.classes[i] for i in present]
    remap = torch.full((len(data.classes),), -1, dtype=torch.long)
    remap[torch.as_tensor(present)] = torch.arange(len(present))
    y_all = remap[feats.labels]
    class_text = class_embeddings(backbone, classes, templates)
    fscale = final_scale(backbone)

    rng = np.random.default_rng(s.seed)
    perm = rng.permutation(len(y_all))
    n_j = int(round(len(perm) * s.jumper_fraction))
    jump_idx, train_idx = np.sort(perm[:n_j]), np.sort(perm[n_j:])

    out_dim = backbone.embed_dim if s.space == "cls" else backbone.mlp_dim
    tgem = TGEM(layers, L, backbone.embed_dim, out_dim, s.space, s.hidden)
    x_all = feats.space(s.space)[:, [l - 1 for l in layers]]
    if s.space == "rates":
        tgem.center.copy_(x_all[train_idx].float().mean(0))
    final_logits = fscale * F.normalize(feats.z[:, -1], dim=-1) @ class_text.t()
    final_ce = F.cross_entropy(final_logits, y_all, reduction="none")
    if s.soft_tau is None:
        # where "confident" lies depends on the number of classes and the logit scale: take the full
        # model's median top-1 probability on the training images, so the soft exits (and with them
        # the regularizer) neither vanish nor fire everywhere
        ti = torch.as_tensor(train_idx)
        s.soft_tau = round(float(final_logits[ti].softmax(-1).max(-1).values.median()), 4)

    cap_idx = cap_text = None
    if data.captions is not None:
        uniq, inv = np.unique(np.asarray(data.captions, dtype=object).astype(str), return_inverse=True)
        cap_text = F.normalize(backbone.encode_text(list(uniq)).float(), dim=-1)
        cap_idx = torch.as_tensor(inv, dtype=torch.long)[torch.as_tensor(train_idx)]
    ti = torch.as_tensor(train_idx)
    history = _train_modules(tgem, x_all[ti], y_all[ti], cap_idx, cap_text, class_text, final_ce[ti], s, progress)
    tgem.eval()

    profiles = tgem.profiles(class_text, fscale)
    jfeats = feats.subset(jump_idx)
    jfeats.labels = y_all[torch.as_tensor(jump_idx)]
    jumper = fit_jumper(profiles, jfeats, s.jumper_target)
    probs = layer_probs(profiles, jfeats)
    preds = probs.argmax(-1)
    scores = jumper.for_goal("budget").scores(jumper_signals(probs, jfeats, layers))
    jumper.tau = calibrate_budget(scores, preds, layers + [L], L, s.default_budget)
    per_layer = [{"layer": l, "accuracy": round((preds[:, j] == jfeats.labels).float().mean().item(), 4),
                  "agreement": round((preds[:, j] == preds[:, -1]).float().mean().item(), 4)}
                 for j, l in enumerate(layers + [L])]
    info = {"settings": asdict(s), "templates": templates, "train_classes": classes, "history": history,
            "num_train": len(train_idx), "num_jumper": len(jump_idx), "per_layer_holdout": per_layer}
    return tgem, jumper, info


# ------------------------------------------------------------------ checkpoint


def save_tgem(path, tgem: TGEM, jumper: Jumper, backbone, info: dict, data_spec: str = "") -> Path:
    """Write atomically: a temporary directory renamed into place. Replaces an earlier checkpoint or an
    empty directory, never anything else."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / "tgem.json").is_file() or not any(path.iterdir()))):
        raise TGEMError(f"{path} exists and is not a T-GEM checkpoint; refusing to replace it")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous() for k, v in tgem.state_dict().items()}
    tensors.update(jumper.state())
    save_file(tensors, str(tmp / "tgem.safetensors"))
    config = {"format": FORMAT_VERSION, "backbone": backbone.name, "fingerprint": backbone.fingerprint(),
              "num_layers": tgem.num_layers, "layers": tgem.layers, "space": tgem.space,
              "embed_dim": tgem.embed_dim, "out_dim": tgem.out_dim, "hidden": tgem.hidden,
              "tau": jumper.tau, "data": data_spec, **info}
    (tmp / "tgem.json").write_text(json.dumps(config, indent=1))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_tgem_config(path) -> dict:
    path = Path(path)
    if not (path / "tgem.json").is_file() or not (path / "tgem.safetensors").is_file():
        raise TGEMError(f"{path} is not a T-GEM checkpoint (expected tgem.json and tgem.safetensors)")
    try:
        return json.loads((path / "tgem.json").read_text())
    except (OSError, ValueError) as e:
        raise TGEMError(f"cannot read {path / 'tgem.json'}: {e}") from None


def load_tgem(path, backbone) -> tuple[TGEM, Jumper, dict]:
    """Load a checkpoint, refusing one made for another backbone."""
    cfg = read_tgem_config(path)
    if cfg.get("fingerprint") != backbone.fingerprint():
        raise TGEMError(f"T-GEM checkpoint {path} was made for another backbone "
                        f"('{cfg.get('backbone')}', fingerprint {str(cfg.get('fingerprint'))[:12]}), "
                        f"not for '{backbone.name}' (fingerprint {backbone.fingerprint()[:12]})")
    tgem = TGEM(cfg["layers"], cfg["num_layers"], cfg["embed_dim"], cfg["out_dim"], cfg["space"], cfg["hidden"])
    tensors = load_file(str(Path(path) / "tgem.safetensors"))
    jumper = Jumper.from_state(tensors, cfg.get("tau", 2.0))
    tgem.load_state_dict(tensors)
    tgem.eval()
    return tgem, jumper, cfg
