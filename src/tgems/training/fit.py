"""Training of the text-guided exit modules and the Jumper (see docs/design.md).

Image and text encoders stay frozen: per-layer features are extracted once, training then touches
only that cache. The result is saved with `tgems.tgem.save_tgem`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tgems.calibration import calibrate_budget
from tgems.errors import TGEMError
from tgems.features import LayerFeatures, extract_features
from tgems.jumper import jumper_signals
from tgems.training.jumper_fit import check_jumper_target, fit_jumper
from tgems.profiles import check_readable_labels, default_templates, layer_probs
from tgems.tgem import TGEM


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
    cross_fit: bool = True  # the budget Jumper also learns from two half-class T-GEMs (see fit_tgem)
    seed: int = 0


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


def _train_modules(tgem: TGEM, x, y, cap_idx, cap_text, class_text, final_ce, s: FitSettings, progress, desc):
    layers = tgem.layers
    opt = torch.optim.AdamW(tgem.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    g = torch.Generator().manual_seed(s.seed)
    steps_per_epoch = max(1, math.ceil(len(y) / s.batch_size))
    total = s.epochs * steps_per_epoch
    # OneCycleLR divides by zero when pct_start * total_steps == 1 (10 steps in all with 0.1)
    pct_start = 0.1 if total != 10 else 0.2
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total, pct_start=pct_start)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
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


def _fit_modules(backbone, x, y, class_text, final_logits, cap_idx, cap_text, s: FitSettings, progress,
                 seed: int, desc: str):
    """G_l for every candidate layer, trained on readouts x (N, n, F) with labels y indexing class_text.
    Returns (tgem, settings with soft_tau filled in, history)."""
    final_ce = F.cross_entropy(final_logits, y, reduction="none")
    if s.soft_tau is None:
        # where "confident" lies depends on the number of classes and the logit scale: take the full
        # model's median top-1 probability on the training images, so the soft exits (and with them
        # the regularizer) neither vanish nor fire everywhere
        s = replace(s, soft_tau=round(float(final_logits.softmax(-1).max(-1).values.median()), 4))
    torch.manual_seed(seed)
    out_dim = backbone.embed_dim if s.space == "cls" else backbone.mlp_dim
    tgem = TGEM(s.layers, backbone.num_layers, backbone.embed_dim, out_dim, s.space, s.hidden)
    if s.space == "rates":
        tgem.center.copy_(x.float().mean(0))
    history = _train_modules(tgem, x, y, cap_idx, cap_text, class_text, final_ce, replace(s, seed=seed), progress,
                             desc)
    tgem.eval()
    return tgem, s, history


def class_halves(num_classes: int, seed: int) -> list[np.ndarray]:
    """Two disjoint, sorted halves of the class indices 0 .. num_classes - 1 (a seeded shuffle)."""
    perm = np.random.default_rng(seed + 1).permutation(num_classes)
    return [np.sort(perm[:num_classes // 2]), np.sort(perm[num_classes // 2:])]


def cross_fit_halves(train_labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray] | None:
    """The class halves for cross-fitting, or None when it cannot run: fewer than 4 classes, or a class
    without training images (all of its images went to the Jumper's share), which would leave a half-model
    with a class it never trained on."""
    if num_classes < 4 or len(np.unique(train_labels)) < num_classes:
        return None
    return class_halves(num_classes, seed)


def _check_full_model(final_logits, y, near_chance: str) -> dict:
    from tgems.chance import chance_check, chance_message, warn_if_near_chance

    if near_chance not in ("warn", "refuse"):
        raise TGEMError(f"near_chance must be 'warn' or 'refuse', got {near_chance!r}")
    what = "the full model's zero-shot accuracy"
    check = chance_check(int((final_logits.argmax(-1) == y).sum()), len(y), final_logits.shape[1])
    if check["degenerate"] and near_chance == "refuse":
        raise TGEMError(f"{chance_message(check, what)}; nothing fitted (--accept-degenerate fits anyway)")
    warn_if_near_chance(check, what)
    return check


def fit_tgem(backbone, data, settings: FitSettings | None = None, templates=None, feats: LayerFeatures | None = None,
             progress: bool = True, near_chance: str = "warn"):
    """Train T-GEMs (G_l for each candidate layer) and the Jumper on a captioned/labelled dataset.

    The Jumper is fit on images held out of G_l's training (`jumper_fraction`). With `cross_fit` (the
    default, a budget Jumper, and at least 4 classes, each with training images), two more T-GEMs are trained, each on the images of
    one half of the classes; the budget Jumper learns from the held-out images scored by the main modules
    and by each half-model on all classes, so half of its examples come from classes that model knows only
    by their text, as a label set never seen in fitting is at inference (docs/design.md). This costs about
    one more module fit. Returns (tgem, jumper, info). Only the classes present in `data` are used.

    The full model's zero-shot accuracy on the labels is checked before any training
    (`tgems.chance`): at or near chance, `near_chance="warn"` warns and records it
    (info["degenerate"]), "refuse" raises a TGEMError instead (what `tgems fit` does unless
    --accept-degenerate)."""
    L = backbone.num_layers
    s = settings or FitSettings()
    layers = sorted(set(s.layers or range(1, L)))
    if not layers or layers[0] < 1 or layers[-1] >= L:
        raise TGEMError(f"candidate layers must lie in 1..{L - 1} (the last layer is always an exit)")
    s = replace(s, layers=layers)  # the caller's settings stay as given
    given_soft_tau = s.soft_tau
    check_jumper_target(s.jumper_target)
    if s.soft_tau is not None and not 0 < s.soft_tau < 1:
        raise TGEMError(f"soft_tau must lie in (0, 1), got {s.soft_tau}")
    templates = list(templates or default_templates(data.name))
    present = np.unique(data.labels)
    if len(present) < 2:
        raise TGEMError(f"{data.name} has images of {len(present)} class(es): fitting T-GEMs needs at least two "
                        f"(a one-class problem has nothing to decide)")
    classes = [data.classes[i] for i in present]
    class_text = check_readable_labels(backbone, classes, templates).cpu()  # refused before any work
    if feats is None:
        feats = extract_features(backbone, data, rates=s.space == "rates", progress=progress, desc="cache features")
    remap = torch.full((len(data.classes),), -1, dtype=torch.long)
    remap[torch.as_tensor(present)] = torch.arange(len(present))
    y_all = remap[feats.labels]

    rng = np.random.default_rng(s.seed)
    perm = rng.permutation(len(y_all))
    n_j = int(round(len(perm) * s.jumper_fraction))
    jump_idx, train_idx = np.sort(perm[:n_j]), np.sort(perm[n_j:])
    ti = torch.as_tensor(train_idx)

    x_all = feats.space(s.space)[:, [l - 1 for l in layers]]
    final_logits = backbone.zero_shot_logits(feats.z[:, -1], class_text).cpu()
    full_check = _check_full_model(final_logits, y_all, near_chance)
    cap_idx = cap_text = None
    if data.captions is not None:
        uniq, inv = np.unique(np.asarray(data.captions, dtype=object).astype(str), return_inverse=True)
        cap_text = F.normalize(backbone.encode_text(list(uniq)).float().cpu(), dim=-1)
        cap_idx = torch.as_tensor(inv, dtype=torch.long)
    tgem, s, history = _fit_modules(backbone, x_all[ti], y_all[ti], class_text, final_logits[ti],
                                    None if cap_idx is None else cap_idx[ti], cap_text, s, progress, s.seed,
                                    f"fit T-GEM ({s.space})")

    profiles = tgem.profiles(class_text, backbone).to("cpu")
    jfeats = feats.subset(jump_idx)
    jfeats.labels = y_all[torch.as_tensor(jump_idx)]
    cross, cross_info = [], None
    halves = cross_fit_halves(y_all[ti].numpy(), len(present), s.seed)
    if s.cross_fit and s.jumper_target != "agree" and halves is not None:
        cross_info = []
        for h, half in enumerate(halves):
            hi = ti[torch.as_tensor(np.isin(y_all[ti].numpy(), half))]
            hmap = torch.full((len(present),), -1, dtype=torch.long)
            hmap[torch.as_tensor(half)] = torch.arange(len(half))
            h_text = class_text[torch.as_tensor(half)]
            h_tgem, _, h_hist = _fit_modules(backbone, x_all[hi], hmap[y_all[hi]], h_text,
                                             final_logits[hi][:, torch.as_tensor(half)],
                                             None if cap_idx is None else cap_idx[hi], cap_text,
                                             replace(s, soft_tau=given_soft_tau), progress, s.seed + 1 + h,
                                             f"cross-fit T-GEM {h + 1}/2 ({s.space})")
            cross.append(h_tgem.profiles(class_text, backbone).to("cpu"))
            cross_info.append({"classes": [classes[i] for i in half], "num_train": len(hi),
                               "final_loss": h_hist[-1]["loss"] if h_hist else None})
    jumper = fit_jumper(profiles, jfeats, s.jumper_target, cross=cross)
    probs = layer_probs(profiles, jfeats)
    preds = probs.argmax(-1)
    scores = jumper.for_goal("budget").scores(jumper_signals(probs, jfeats, layers, profiles.text))
    jumper.tau = calibrate_budget(scores, preds, profiles.exit_layers, L, s.default_budget)
    per_layer = [{"layer": l, "accuracy": round((preds[:, j] == jfeats.labels).float().mean().item(), 4),
                  "agreement": round((preds[:, j] == preds[:, -1]).float().mean().item(), 4)}
                 for j, l in enumerate(profiles.exit_layers)]
    info = {"settings": asdict(s), "templates": templates, "train_classes": classes, "history": history,
            "num_train": len(train_idx), "num_jumper": len(jump_idx), "per_layer_holdout": per_layer,
            "cross_fit": cross_info, "full_model": full_check, "degenerate": full_check["degenerate"]}
    if s.cross_fit and s.jumper_target != "agree" and halves is None:
        info["cross_fit_skipped"] = ("fewer than 4 classes, or a class without training images: the budget Jumper "
                                     "was fit on the main modules only")
    return tgem, jumper, info


def fit_and_save(model: str, data: str, out, settings: FitSettings | None = None, n: int | None = None,
                 device="cpu", dtype="float32", progress: bool = True, near_chance: str = "warn") -> dict:
    """`tgems fit`: load the model and data by name, fit, save the checkpoint; returns the fit's info."""
    import time

    from tgems.backbones import load_backbone
    from tgems.data import load_dataset
    from tgems.tgem import save_tgem

    s = settings or FitSettings()
    bb = load_backbone(model, device=device, dtype=dtype)
    ds = load_dataset(data, n=n, seed=s.seed)
    t0 = time.time()
    tgem, jumper, info = fit_tgem(bb, ds, s, progress=progress, near_chance=near_chance)
    info["fit_seconds"] = round(time.time() - t0, 1)
    save_tgem(out, tgem, jumper, bb, info, data_spec=data)
    return info
