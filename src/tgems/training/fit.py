"""Training of the text-guided exit modules and the Jumper (see docs/design.md).

Image and text encoders stay frozen: per-layer features are extracted once, training then touches
only that cache. The result is saved with `tgems.tgem.save_tgem`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tgems.calibration import calibrate_budget
from tgems.errors import TGEMError
from tgems.features import LayerFeatures, extract_features
from tgems.profiles import check_readable_labels, default_templates
from tgems.tgem import RECIPE_BUFFERS, TGEM
from tgems.training.jumper_fit import check_jumper_target, fit_jumper, training_signals
from tgems.heap import trim as trim_heap
from tgems.training.spill import by_blocks
from tgems.training.readout_fit import fit_mix, fit_readouts
from tgems.training.settings import FIT_WORKERS, FitSettings, recipe_for


def _soft_exit_terms(logits, ce, final_ce, layers, num_layers, s: FitSettings):
    """Differentiable expected depth r(x) and exit-weighted loss from the soft exits."""
    conf = logits.softmax(-1).max(-1).values  # (B, n)
    e = torch.sigmoid(s.soft_k * (conf - s.soft_tau))
    stay = torch.cumprod(torch.cat([torch.ones_like(e[:, :1]), 1 - e], 1), 1)  # (B, n + 1)
    q = torch.cat([e * stay[:, :-1], stay[:, -1:]], 1)
    depth = torch.tensor(list(layers) + [num_layers], dtype=torch.float32, device=logits.device) / num_layers
    r = (q * depth).sum(1)
    weighted = (q[:, :-1] * ce).sum(1) + q[:, -1] * final_ce
    return r, weighted


@dataclass
class _Targets:
    """What the exit modules are trained against (docs/fit.md).

    `labels`: the class texts (`class_text`, (C, D)), row r of the features has class `y[r]`; with
    captions too, the caption-contrastive term reads `caption_emb`. `captions`: each image's own caption,
    scored against the other captions of its batch (equal captions, by `caption_key`, count as positives)."""

    mode: str
    y: torch.Tensor | None = None
    class_text: torch.Tensor | None = None
    caption_emb: Callable | None = None  # rows -> (B, D) unit caption embeddings
    caption_key: Callable | None = None  # rows -> (B,) int64, equal for equal captions


def _soft_targets(keys: torch.Tensor) -> torch.Tensor:
    pos = (keys[:, None] == keys[None, :]).float()
    return pos / pos.sum(1, keepdim=True)


def _batch_loss(backbone, tgem: TGEM, store, gi, t: _Targets, s: FitSettings, dev):
    """(loss, expected depth r) of one batch of rows `gi`, read from the feature store."""
    layers = tgem.layers
    xb = store.take(gi, tgem.space, layers).to(dev)  # (B, n, F)
    if tgem.space == "rates":
        xb = xb - tgem.center[None]
    xb = F.normalize(xb, dim=-1)
    scale = tgem.log_scale.exp()[None, :, None]
    z_last = store.final_z(gi).to(dev)
    if t.mode == "labels":
        yb = t.y[torch.as_tensor(gi)].to(dev)
        class_text = t.class_text.to(dev)
        logits = scale * torch.einsum("bnf,ncf->bnc", xb, tgem.raw_profiles(class_text))
        ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat_interleave(len(layers)),
                             reduction="none").view(len(gi), -1)
        final_ce = F.cross_entropy(backbone.zero_shot_logits(z_last, class_text).to(dev), yb, reduction="none")
        loss = ce.mean()
        if t.caption_emb is not None and s.caption_weight > 0:
            cap_logits = scale * torch.einsum("bnf,nkf->bnk", xb, tgem.raw_profiles(t.caption_emb(gi).to(dev)))
            target = _soft_targets(yb)[:, None].expand_as(cap_logits)
            loss = loss + s.caption_weight * -(target * cap_logits.log_softmax(-1)).sum(-1).mean()
    else:
        text = t.caption_emb(gi).to(dev)
        target = _soft_targets(t.caption_key(gi).to(dev))
        logits = scale * torch.einsum("bnf,nkf->bnk", xb, tgem.raw_profiles(text))
        ce = -(target[:, None] * logits.log_softmax(-1)).sum(-1)  # (B, n)
        final_ce = -(target * backbone.zero_shot_logits(z_last, text).to(dev).log_softmax(-1)).sum(-1)
        loss = ce.mean()
    r, weighted = _soft_exit_terms(logits, ce, final_ce, layers, tgem.num_layers, s)
    loss = loss + weighted.mean()
    if s.lam > 0:
        loss = loss + s.lam * F.relu(r.mean() - s.r_target) ** 2
    return loss, r


def _train_modules(backbone, tgem: TGEM, store, rows: np.ndarray, t: _Targets, s: FitSettings, progress, desc,
                   dev):
    """AdamW over minibatches of `rows` read from the store (in memory or on disk) in a seeded order."""
    opt = torch.optim.AdamW(tgem.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    g = torch.Generator().manual_seed(s.seed)
    steps_per_epoch = max(1, math.ceil(len(rows) / s.batch_size))
    total = s.epochs * steps_per_epoch
    # OneCycleLR divides by zero when pct_start * total_steps == 1 (10 steps in all with 0.1)
    pct_start = 0.1 if total != 10 else 0.2
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total, pct_start=pct_start)
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    history = []
    for epoch in range(s.epochs):
        perm = torch.randperm(len(rows), generator=g)
        for i in range(steps_per_epoch):
            gi = rows[perm[i * s.batch_size:(i + 1) * s.batch_size].numpy()]
            loss, r = _batch_loss(backbone, tgem, store, gi, t, s, dev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            trim_heap()  # without it the resident set crept up with the steps (docs/fit.md, memory)
            bar.update(1)
        history.append({"epoch": epoch, "loss": round(loss.item(), 4), "expected_depth": round(r.mean().item(), 4)})
        bar.set_postfix(loss=f"{loss.item():.3f}", r=f"{r.mean().item():.3f}")
    bar.close()
    return history


_CHUNK = 4096  # rows per pass of the statistics below (memory, not results)
_MIX_ROWS = 1024  # the Jumper's images in memory at once while the mixing weights' inputs are scored
_CHUNK_VALUES = 1 << 23  # feature values per pass of _mean_features (64 MB in float64)


def _final_confidence(backbone, store, rows: np.ndarray, t: _Targets, batch_size: int) -> torch.Tensor:
    """The full model's top-1 probability on `rows`: over the class texts, or (captions) over the captions of
    consecutive groups of `batch_size` rows, as a training batch scores them."""
    out, step = [], _CHUNK if t.mode == "labels" else batch_size
    for a in range(0, len(rows), step):
        gi = rows[a:a + step]
        text = t.class_text if t.mode == "labels" else t.caption_emb(gi)
        out.append(backbone.zero_shot_logits(store.final_z(gi), text).cpu().softmax(-1).max(-1).values)
    return torch.cat(out)


def _mean_features(store, rows: np.ndarray, space: str, layers) -> torch.Tensor:
    """(n, F) mean of the features of `rows` at `layers`, summed chunk by chunk in float64."""
    total, step = None, max(1, _CHUNK_VALUES // (len(layers) * store.take(rows[:1], space, layers).shape[-1]))
    for a in range(0, len(rows), step):
        part = store.take(rows[a:a + step], space, layers).double().sum(0)
        total = part if total is None else total + part
    return (total / len(rows)).float()


def _fit_modules(backbone, store, rows: np.ndarray, t: _Targets, s: FitSettings, progress, seed: int, desc: str,
                 dev="cpu", memo: dict | None = None):
    """G_l for every candidate layer, trained on the feature rows `rows` against targets `t`, then the recipe's
    distilled readouts. Returns (tgem on the CPU, settings with soft_tau filled in, history). `memo` (a
    benchmark's: trained modules by `desc`) reuses modules trained by an earlier fit of the same data and
    seed: the recipe does not change how G_l train, so ablations of the recipe train them once."""
    out_dim = backbone.embed_dim if s.space == "cls" else backbone.mlp_dim
    if memo is not None and desc in memo:
        trained, soft_tau, history = memo[desc]
        s = replace(s, soft_tau=soft_tau)
        tgem = TGEM(s.layers, backbone.num_layers, backbone.embed_dim, out_dim, s.space, s.hidden, s.recipe,
                    s.readout_patch)
        tgem.load_state_dict({k: v for k, v in trained.state_dict().items() if k not in RECIPE_BUFFERS}, strict=False)
    else:
        if s.soft_tau is None:
            # where "confident" lies depends on the number of classes and the logit scale: take the full
            # model's median top-1 probability on the training images, so the soft exits (and with them
            # the regularizer) neither vanish nor fire everywhere
            s = replace(s, soft_tau=round(float(_final_confidence(backbone, store, rows, t, s.batch_size).median()), 4))
        torch.manual_seed(seed)
        tgem = TGEM(s.layers, backbone.num_layers, backbone.embed_dim, out_dim, s.space, s.hidden, s.recipe,
                    s.readout_patch)
        if s.space == "rates":
            tgem.center.copy_(_mean_features(store, rows, s.space, s.layers))
        tgem.to(dev)
        history = _train_modules(backbone, tgem, store, rows, t, replace(s, seed=seed), progress, desc, dev)
        tgem.to("cpu").eval()
        if memo is not None:
            memo[desc] = (tgem, s.soft_tau, history)
    if tgem.recipe == "distilled":
        w, b = fit_readouts(store, rows, s.layers, s.readout_l2, patch=tgem.readout_patch)
        tgem.readout_weight.copy_(w)
        tgem.readout_bias.copy_(b)
    return tgem, s, history


def _set_mix(tgem: TGEM, main_text, store, jfeats, cross: list, halves, backbone, maps: str = "half") -> None:
    """Fit the distilled recipe's per-layer mixing weights (training.readout_fit.fit_mix) and set them in the
    main modules and the cross-fitted ones: on the Jumper's images scored by the half-models that never saw
    their classes when there are cross-fitted ones, else by the main modules. `maps="main"` (an ablation)
    scores the distilled side with the main maps, fit on every training class, instead of the half-maps."""
    main = tgem.profiles(main_text, backbone).to("cpu")
    profile_sets = [main]
    if cross:
        profile_sets = [h.profiles(main_text, backbone).to("cpu") for h in cross]
        if maps == "main":
            profile_sets = [replace(p, readout_weight=main.readout_weight, readout_bias=main.readout_bias)
                            for p in profile_sets]
    n = len(tgem.layers)
    got = [[[] for _ in range(n)] for _ in profile_sets]  # per set and layer: (t, d, full probs) of each block
    for a in range(0, len(jfeats), _MIX_ROWS):  # a block of the Jumper's images in memory at a time
        feats = jfeats.subset(np.arange(a, min(len(jfeats), a + _MIX_ROWS)))
        full = main.probs(n, feats.z[:, -1])
        keeps = [torch.as_tensor(~np.isin(feats.labels.numpy(), half)) for half in halves] if cross else \
            [torch.ones(len(feats), dtype=torch.bool)]
        for k, (prof, keep) in enumerate(zip(profile_sets, keeps)):
            for j, l in enumerate(tgem.layers):
                m = None if feats.patch is None else feats.patch[keep, l - 1]  # caches made before it lack it
                got[k][j].append((*prof.parts(j, feats.z[keep, l - 1], patch=m), full[keep]))
    parts = [tuple(torch.cat([x[i] for k in range(len(got)) for x in got[k][j]]) for i in range(3))
             for j in range(n)]
    mix = fit_mix(parts)
    for m in [tgem] + list(cross):
        m.mix.copy_(mix)


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


def _check_full_model(backbone, store, rows: np.ndarray, t: _Targets, near_chance: str) -> dict | None:
    """The full model's zero-shot accuracy on the labels (`tgems.chance`), before any training: at or near
    chance `near_chance="warn"` warns and records it, "refuse" raises (what `tgems fit` does unless
    --accept-degenerate). None for caption targets (no label set to be at chance on)."""
    from tgems.chance import chance_check, chance_message, warn_if_near_chance

    if near_chance not in ("warn", "refuse"):
        raise TGEMError(f"near_chance must be 'warn' or 'refuse', got {near_chance!r}")
    if t.mode != "labels":
        return None
    hits = 0
    for a in range(0, len(rows), _CHUNK):
        gi = rows[a:a + _CHUNK]
        hits += int((backbone.zero_shot_logits(store.final_z(gi), t.class_text).cpu().argmax(-1)
                     == t.y[torch.as_tensor(gi)]).sum())
    what = "the full model's zero-shot accuracy"
    check = chance_check(hits, len(rows), len(t.class_text))
    if check["degenerate"] and near_chance == "refuse":
        raise TGEMError(f"{chance_message(check, what)}; nothing fitted (--accept-degenerate fits anyway)")
    warn_if_near_chance(check, what)
    return check


def _checked_settings(backbone, settings: FitSettings | None) -> FitSettings:
    L = backbone.num_layers
    s = settings or FitSettings()
    layers = sorted(set(s.layers or range(1, L)))
    if not layers or layers[0] < 1 or layers[-1] >= L:
        raise TGEMError(f"candidate layers must lie in 1..{L - 1} (the last layer is always an exit)")
    check_jumper_target(s.jumper_target)
    from tgems.options import RECIPES

    recipe = s.recipe or recipe_for(s.space)
    if recipe not in RECIPES:
        raise TGEMError(f"unknown exit recipe '{recipe}' (choose from {', '.join(RECIPES)})")
    if recipe == "distilled" and s.space != "cls":
        raise TGEMError("the distilled recipe maps the readout z_l: it needs --space cls (rates: --recipe tgem)")
    s = replace(s, recipe=recipe, trajectory=recipe == "distilled" if s.trajectory is None else bool(s.trajectory))
    if s.soft_tau is not None and not 0 < s.soft_tau < 1:
        raise TGEMError(f"soft_tau must lie in (0, 1), got {s.soft_tau}")
    if s.mix_maps not in ("half", "main"):
        raise TGEMError(f"mix_maps must be 'half' or 'main', got {s.mix_maps!r}")
    if s.jumper_max < 1 or s.caption_set < 2:
        raise TGEMError(f"jumper_max must be >= 1 and caption_set >= 2, got {s.jumper_max} and {s.caption_set}")
    return replace(s, layers=layers)  # the caller's settings stay as given


def fit_tgem(backbone, data, settings: FitSettings | None = None, templates=None, feats: LayerFeatures | None = None,
             progress: bool = True, device="cpu", near_chance: str = "warn", memo: dict | None = None):
    """Train T-GEMs (G_l for each candidate layer) and the Jumper on a captioned/labelled dataset in memory.

    The Jumper is fit on images held out of G_l's training (`jumper_fraction`, at most `jumper_max`). With
    `cross_fit` (the default, a budget Jumper, and at least 4 classes, each with training images), two more
    T-GEMs are trained, each on the images of one half of the classes; the budget Jumper learns from the
    held-out images scored by the main modules and by each half-model on all classes, so half of its
    examples come from classes that model knows only by their text, as a label set never seen in fitting is
    at inference (docs/design.md). This costs about one more module fit. Returns (tgem, jumper, info). Only
    the classes present in `data` are used. `device`: where the modules train. `memo`: see `_fit_modules`."""
    s = _checked_settings(backbone, settings)
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
    t = _Targets("labels", y=remap[feats.labels], class_text=class_text)
    if data.captions is not None:
        uniq, inv = np.unique(np.asarray(data.captions, dtype=object).astype(str), return_inverse=True)
        cap_text = F.normalize(backbone.encode_text(list(uniq)).float().cpu(), dim=-1)
        cap_idx = torch.as_tensor(inv, dtype=torch.long)
        t.caption_emb = lambda rows: cap_text[cap_idx[torch.as_tensor(rows)]]
        t.caption_key = lambda rows: cap_idx[torch.as_tensor(rows)]
    return _fit(backbone, feats, np.arange(len(feats)), t, classes, s, templates, progress, device, near_chance, memo)


def fit_tgem_cached(backbone, cache, settings: FitSettings | None = None, templates=None, progress: bool = True,
                    device="cpu", data_name: str = "", near_chance: str = "warn"):
    """`fit_tgem` on a feature cache on disk (`tgems.features.FeatureCache`), read in minibatches.

    Targets (docs/fit.md): the class labels when every image has one (captions, when every image has one
    too, add the caption-contrastive term); otherwise each image's own caption, and images without one
    are left out and counted. Returns (tgem, jumper, info); info["skipped"] counts what was left out."""
    s = _checked_settings(backbone, settings)
    templates = list(templates or default_templates(data_name))
    labels = cache.labels
    left_out = {}
    if len(labels) and (labels >= 0).all():
        if len(cache.classes) < 2:
            raise TGEMError(f"{data_name or cache.root} has images of {len(cache.classes)} class(es): fitting T-GEMs "
                            f"needs at least two (or captions on every image)")
        class_text = check_readable_labels(backbone, cache.classes, templates).cpu()
        t = _Targets("labels", y=torch.as_tensor(labels), class_text=class_text)
        if cache.has_caption.all():
            t.caption_emb, t.caption_key = cache.text, cache.caption_keys
        rows, classes = np.arange(len(labels)), list(cache.classes)
    else:
        rows = np.flatnonzero(cache.has_caption)
        if len(rows) < len(labels):
            left_out["no caption (not every image has a label, so the fit trains on captions)"] = \
                len(labels) - len(rows)
        keys = cache.caption_keys(rows) if len(rows) else torch.zeros(0, dtype=torch.long)
        if len(torch.unique(keys)) < 2:
            raise TGEMError(f"{data_name or cache.root}: fitting T-GEMs needs class labels on every image or at "
                            f"least two different captions ({len(rows)} captioned images of {len(labels)})")
        t = _Targets("captions", caption_emb=cache.text, caption_key=cache.caption_keys)
        classes = None
    tgem, jumper, info = _fit(backbone, cache, rows, t, classes, s, templates, progress, device, near_chance)
    info["fit_left_out"] = left_out
    return tgem, jumper, info


class _Rows:
    """Rows `rows` of a feature store, read only when `subset` asks (the Jumper's images: what is in memory
    at once is one chunk of them, not all; docs/fit.md)."""

    spill = True  # their signals go to disk (training.spill): the Jumper's memory stays flat in jumper_max

    def __init__(self, store, rows: np.ndarray):
        self.store, self.rows, self.labels = store, np.asarray(rows), None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx) -> LayerFeatures:
        part = self.store.subset(self.rows[np.asarray(idx)])
        if self.labels is not None:
            part.labels = self.labels[torch.as_tensor(np.asarray(idx), dtype=torch.long)]
        return part


def _fit(backbone, store, usable: np.ndarray, t: _Targets, classes, s: FitSettings, templates, progress, device,
         near_chance: str = "warn", memo: dict | None = None):
    """The fit shared by both feature stores: seeded Jumper / training split, modules, cross-fit, Jumper, tau."""
    full_check = _check_full_model(backbone, store, usable, t, near_chance)
    L = backbone.num_layers
    given_soft_tau = s.soft_tau
    rng = np.random.default_rng(s.seed)
    perm = rng.permutation(len(usable))
    cap = s.jumper_max if t.mode == "labels" else min(s.jumper_max, s.caption_set)
    n_j = min(int(round(len(perm) * s.jumper_fraction)), cap)
    jump_idx, train_idx = np.sort(usable[perm[:n_j]]), np.sort(usable[perm[n_j:]])
    tgem, s, history = _fit_modules(backbone, store, train_idx, t, s, progress, s.seed, f"fit T-GEM ({s.space})",
                                    device, memo)
    jfeats = _Rows(store, jump_idx)
    cross, cross_info, halves = [], None, None
    if t.mode == "labels":
        jfeats.labels = t.y[torch.as_tensor(jump_idx)]
        profiles = tgem.profiles(t.class_text, backbone).to("cpu")
        num_classes = len(t.class_text)
        halves = cross_fit_halves(t.y[torch.as_tensor(train_idx)].numpy(), num_classes, s.seed)
    else:
        # the Jumper's label set: the captions of its own images (caption retrieval among them)
        _, first, inv = np.unique(t.caption_key(jump_idx).numpy(), return_index=True, return_inverse=True)
        jfeats.labels = torch.as_tensor(inv.reshape(-1), dtype=torch.long)
        profiles = tgem.profiles(F.normalize(t.caption_emb(jump_idx[first]).float(), dim=-1), backbone).to("cpu")
    cross_tgems = []
    if s.cross_fit and s.jumper_target != "agree" and halves is not None:
        cross_info = []
        for h, half in enumerate(halves):
            hi = train_idx[np.isin(t.y[torch.as_tensor(train_idx)].numpy(), half)]
            hmap = torch.full((num_classes,), -1, dtype=torch.long)
            hmap[torch.as_tensor(half)] = torch.arange(len(half))
            t_half = replace(t, y=hmap[t.y], class_text=t.class_text[torch.as_tensor(half)])
            h_tgem, _, h_hist = _fit_modules(backbone, store, hi, t_half, replace(s, soft_tau=given_soft_tau),
                                             progress, s.seed + 1 + h, f"cross-fit T-GEM {h + 1}/2 ({s.space})",
                                             device, memo)
            cross_tgems.append(h_tgem)
            cross_info.append({"classes": [classes[i] for i in half], "num_train": len(hi),
                               "final_loss": h_hist[-1]["loss"] if h_hist else None})
    if tgem.recipe == "distilled" and s.readout_mix:
        _set_mix(tgem, profiles.text, store, jfeats, cross_tgems, halves, backbone, s.mix_maps)
        profiles = tgem.profiles(profiles.text, backbone).to("cpu")
    cross = [h.profiles(t.class_text, backbone).to("cpu") for h in cross_tgems]
    jumper = fit_jumper(profiles, jfeats, s.jumper_target, cross=cross, trajectory=s.trajectory)
    signals, preds = training_signals([profiles], jfeats)
    scores = by_blocks(jumper.for_goal("budget").scores, signals)
    del signals
    jumper.tau = calibrate_budget(scores, preds, profiles.exit_layers, L, s.default_budget)
    per_layer = [{"layer": l, "accuracy": round((preds[:, j] == jfeats.labels).float().mean().item(), 4),
                  "agreement": round((preds[:, j] == preds[:, -1]).float().mean().item(), 4)}
                 for j, l in enumerate(profiles.exit_layers)]
    info = {"settings": asdict(s), "templates": templates, "targets": t.mode, "train_classes": classes,
            "history": history, "num_train": len(train_idx), "num_jumper": len(jump_idx),
            "per_layer_holdout": per_layer, "cross_fit": cross_info}
    if full_check is not None:
        info["full_model"], info["degenerate"] = full_check, full_check["degenerate"]
    if s.cross_fit and s.jumper_target != "agree" and halves is None:
        info["cross_fit_skipped"] = (
            "fewer than 4 classes, or a class without training images: the budget Jumper was fit on the main "
            "modules only" if t.mode == "labels" else
            "captions: the Jumper's captions are unseen by the modules already (each is text-only to them)")
    return tgem, jumper, info


def fit_and_save(model: str, data: str, out, settings: FitSettings | None = None, n: int | None = None,
                 device="cpu", dtype="float32", progress: bool = True, cache=None, max_images: int | None = None,
                 workers: int | None = None, near_chance: str = "warn") -> dict:
    """`tgems fit`: load the model and data by name, fit, save the checkpoint; returns the fit's info.

    Streamed data (folder:, webdataset:, parquet:) go through a feature cache on disk: `cache` keeps it
    (and resumes or reuses it), otherwise a temporary one beside `out` is removed at the end."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from tgems.backbones import load_backbone
    from tgems.tgem import save_tgem
    from tgems.training.feature_cache import is_stream_spec, open_cache, summarize_skipped

    s = settings or FitSettings()
    stream = is_stream_spec(data)
    if stream and n is not None:
        raise TGEMError("--n picks images of the built-in datasets; streamed data (folder:, webdataset:, parquet:) "
                        "take --max-images")
    if not stream and (cache is not None or max_images is not None):
        raise TGEMError(f"--cache and --max-images are for streamed data (folder:, webdataset:, parquet:), not "
                        f"'{data}'")
    if stream:
        from tgems.training.captions import split_text_options

        split_text_options(data)
    bb = load_backbone(model, device=device, dtype=dtype)
    t0 = time.time()
    if not stream:
        from tgems.data import load_dataset

        ds = load_dataset(data, n=n, seed=s.seed)
        tgem, jumper, info = fit_tgem(bb, ds, s, progress=progress, device=device, near_chance=near_chance)
    else:
        _checked_settings(bb, s)
        tmp = None
        if cache is None:
            base = Path(out).expanduser().absolute().parent
            while not base.exists():
                base = base.parent
            tmp = tempfile.mkdtemp(prefix=".tgems-fit-cache-", dir=base)
        try:
            store, summary = open_cache(bb, data, cache or tmp, rates=s.space == "rates", max_images=max_images,
                                        workers=FIT_WORKERS if workers is None else workers,
                                        progress=progress)
            t1 = time.time()
            tgem, jumper, info = fit_tgem_cached(bb, store, s, progress=progress, device=device, data_name=data,
                                                 near_chance=near_chance)
            info["train_seconds"] = round(time.time() - t1, 1)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        skipped = summarize_skipped(store.skipped())
        for reason, k in info.pop("fit_left_out").items():
            skipped["reasons"][reason] = k
            skipped["count"] += k
        info["skipped"] = skipped
        info["cache"] = {k: summary[k] for k in ("images", "shards", "encoded", "extract_seconds",
                                                 "images_per_second")} | {"path": None if tmp else str(cache)}
    info["fit_seconds"] = round(time.time() - t0, 1)
    save_tgem(out, tgem, jumper, bb, info, data_spec=data)
    return info
