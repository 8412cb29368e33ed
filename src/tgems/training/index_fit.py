"""Training of the label-free exit rule of the retrieval index (see `tgems.retrieval`).

On the frozen per-layer feature cache (`tgems.features.extract_features`): the maps M_l are trained to
estimate the unit final embedding z_L from z_l (cosine loss; optionally a caption-contrastive term),
then on images held out of that training the scorer (one logistic model per layer, a `Jumper`) is
fit to estimate cos(M_l(z_l), z_L). No class label is used anywhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tgems.errors import TGEMError
from tgems.features import LayerFeatures, extract_features
from tgems.jumper import Jumper
from tgems.retrieval import NUM_INDEX_SIGNALS, IndexMaps, IndexModel, calibrate_index, layer_signals, \
    write_index_model
from tgems.training.settings import IndexFitSettings


def _train_maps(maps: IndexMaps, x, patch, target, cap_idx, cap_text, logit_scale, s: IndexFitSettings, progress):
    opt = torch.optim.AdamW(maps.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    g = torch.Generator().manual_seed(s.seed)
    steps = max(1, math.ceil(len(x) / s.batch_size))
    total = s.epochs * steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total,
                                                pct_start=0.1 if total != 10 else 0.2)
    history = []
    bar = tqdm(total=total, desc="fit index maps", disable=not progress, leave=False)
    for epoch in range(s.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(steps):
            b = perm[i * s.batch_size:(i + 1) * s.batch_size]
            est = maps.all(x[b], None if patch is None else patch[b])  # (B, n, D)
            loss = (1 - (est * target[b][:, None]).sum(-1)).mean()
            if cap_text is not None and s.caption_weight > 0:
                logits = logit_scale * torch.einsum("bnd,kd->bnk", est, cap_text[cap_idx[b]])
                same = (cap_idx[b][:, None] == cap_idx[b][None, :]).float()
                tgt = (same / same.sum(1, keepdim=True))[:, None].expand_as(logits)
                loss = loss + s.caption_weight * -(tgt * logits.log_softmax(-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        history.append({"epoch": epoch, "loss": round(loss.item(), 5)})
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return history


def scorer_inputs(maps: IndexMaps, z: torch.Tensor, patch: torch.Tensor | None = None):
    """(signals (N, n, S), targets (N, n)): the scorer's inputs and cos(M_l(z_l), z_L) clipped to [0, 1]."""
    est = maps.estimates(z, patch)
    final = F.normalize(z[:, -1].float(), dim=-1)
    signals = torch.stack([sig for _, sig in layer_signals(maps.layers, z, est)], 1)
    return signals, (est * final[:, None]).sum(-1).clamp(0, 1)


def fit_scorer(signals: torch.Tensor, cos: torch.Tensor, ridge: float = 1e-4) -> Jumper:
    """Per layer, ridge regression of logit(cos(M_l(z_l), z_L)) on the signals (closed form, float64), stored
    as a `Jumper` so that its score sigmoid(w.x + b) is the estimated cosine itself, comparable across layers.

    Why not the Jumper's own logistic fit on soft targets: with targets packed near 1 its loss is nearly flat
    and the L2 term wins; its scores barely varied within a layer (std 0.003 against a true std of 0.06 at
    layer 6 of the embedded model), so one tau sent almost every image out at the same layer, i.e. static
    truncation. In logit space the spread is kept."""
    y = torch.logit(cos.double().clamp(1e-3, 1 - 1e-3))
    n, k, S = signals.shape
    weight, bias = torch.zeros(k, S), torch.zeros(k)
    for j in range(k):
        x = signals[:, j].double()
        mu = x.mean(0)
        xc = x - mu
        w = torch.linalg.solve(xc.T @ xc + ridge * n * torch.eye(S, dtype=torch.float64), xc.T @ (y[:, j] - y[:, j].mean()))
        weight[j], bias[j] = w.float(), float(y[:, j].mean() - mu @ w)
    return Jumper(weight, bias)


def fit_index_model(backbone, data=None, settings: IndexFitSettings | None = None,
                    feats: LayerFeatures | None = None, progress: bool = True) -> tuple[IndexModel, dict]:
    """Train the maps and the scorer on a dataset (captions only for the optional caption term).
    Deterministic given `settings.seed` (and one torch thread count)."""
    s = settings or IndexFitSettings()
    L = backbone.num_layers
    layers = sorted(set(s.layers or range(1, L)))
    if not layers or layers[0] < 1 or layers[-1] >= L:
        raise TGEMError(f"candidate layers must lie in 1..{L - 1} (the last layer is always an exit)")
    if not 0 < s.scorer_fraction < 1:
        raise TGEMError(f"scorer_fraction must lie in (0, 1), got {s.scorer_fraction}")
    s.layers = layers
    if feats is None:
        if data is None:
            raise TGEMError("give training images (data) or their cached features (feats)")
        feats = extract_features(backbone, data, progress=progress, desc="cache features")
    z = feats.z.float()
    patch = None
    if s.readout_patch:
        if feats.patch is None:
            raise TGEMError("these features hold no mean-patch readouts: extract them again, or fit with "
                            "--no-readout-patch")
        patch = feats.patch.float()
    if len(z) < 8:
        raise TGEMError(f"fitting the index maps needs at least 8 images, got {len(z)}")
    torch.manual_seed(s.seed)
    perm = np.random.default_rng(s.seed).permutation(len(z))
    n_s = max(1, int(round(len(z) * s.scorer_fraction)))
    score_idx, train_idx = torch.as_tensor(np.sort(perm[:n_s])), torch.as_tensor(np.sort(perm[n_s:]))
    maps = IndexMaps(layers, L, backbone.embed_dim, s.hidden, patch=s.readout_patch)
    cand = [l - 1 for l in layers]
    x = z[train_idx][:, cand]
    xp = None if patch is None else patch[train_idx][:, cand]
    target = F.normalize(z[train_idx, -1], dim=-1)
    cap_idx = cap_text = None
    if s.caption_weight > 0:
        if data is None or data.captions is None:
            raise TGEMError("the caption term needs a dataset with captions")
        uniq, inv = np.unique(np.asarray(data.captions, dtype=object).astype(str), return_inverse=True)
        cap_text = F.normalize(backbone.encode_text(list(uniq)).float(), dim=-1)
        cap_idx = torch.as_tensor(inv, dtype=torch.long)[train_idx]
    scale = backbone.logit_scale()
    history = _train_maps(maps, x, xp, target, cap_idx, cap_text, scale, s, progress)
    maps.eval()
    p_score = None if patch is None else patch[score_idx]
    sig, tgt = scorer_inputs(maps, z[score_idx], p_score)
    scorer = fit_scorer(sig, tgt, s.scorer_ridge)
    model = IndexModel(maps, scorer, backbone.fingerprint(),
                       {"patch_flops": float(backbone.flops_patch_readout()) if s.readout_patch else 0.0})
    tau, cal = calibrate_index(model, z[score_idx], budget=s.default_budget, patch=p_score)
    model.config["tau"] = tau
    est = model.layer_estimates(z[score_idx], p_score)
    per_layer = [{"layer": l, "cos_to_final": round(float((est[:, j] * est[:, -1]).sum(-1).mean()), 4),
                  "plain_readout_cos": round(float((F.normalize(z[score_idx, l - 1], dim=-1) * est[:, -1]).sum(-1)
                                                   .mean()), 4)}
                 for j, l in enumerate(layers)]
    info = {"settings": asdict(s), "num_train": len(train_idx), "num_scorer": len(score_idx), "history": history,
            "per_layer_holdout": per_layer, "default_calibration": cal,
            "num_signals": NUM_INDEX_SIGNALS + backbone.embed_dim}
    return model, info


def save_index_model(path, model: IndexModel, backbone, info: dict | None = None, data_spec: str = ""):
    """Atomic write (safetensors + JSON, the backbone's fingerprint inside)."""
    return write_index_model(path, model, backbone, {"data": data_spec, **(info or {})})


def fit_and_save_index(model: str, data: str, out, settings: IndexFitSettings | None = None, n: int | None = None,
                       device="cpu", dtype="float32", progress: bool = True) -> dict:
    """`tgems index-fit`: retrieval maps and scorer for a backbone (the shipped ones fit only the embedded
    model), trained on images named by a spec: a built-in dataset, or a folder of any layout, webdataset
    shards or parquet (a seeded random sample of `n` items: `tgems.indexing.sample_images`). No label is
    used. Returns the fit's info."""
    import time

    from tgems.backbones import load_backbone
    from tgems.indexing import sample_images

    s = settings or IndexFitSettings()
    bb = load_backbone(model, device=device, dtype=dtype)
    ds = sample_images(data, n, s.seed)
    t0 = time.time()
    index_model, info = fit_index_model(bb, ds, s, progress=progress)
    info["fit_seconds"] = round(time.time() - t0, 1)
    info["images"] = len(ds)
    save_index_model(out, index_model, bb, info, data_spec=data)
    return info
