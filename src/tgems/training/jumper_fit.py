"""Fitting the Jumper: per-layer logistic models on cached features (was `Jumper.fit` and `fit_jumper` in
tgems.jumper, which now holds only what inference needs), and k-shot classifiers from sample profiles."""
from __future__ import annotations

import numpy as np
import torch

from tgems.errors import TGEMError
from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, NUM_TAIL_SIGNALS, NUM_TRAJ_SIGNALS, Jumper, jumper_signals
from tgems.profiles import ClassProfiles, layer_probs
from tgems.training.logistic import fit_logistic  # deterministic across thread counts (issue 30.11)
from tgems.training.settings import JUMPER_TARGETS
from tgems.training.spill import by_blocks, release, spilled_empty


def check_jumper_target(target: str) -> None:
    if target not in JUMPER_TARGETS:
        raise TGEMError(f"unknown Jumper target '{target}' (choose from {', '.join(JUMPER_TARGETS)})")


_ROWS = 1024  # rows per pass of training_signals (memory, not results)


def training_signals(profile_sets: list[ClassProfiles], feats) -> tuple[torch.Tensor, torch.Tensor]:
    """(signals (K N, n, S), predictions (K N, n + 1)) of K sets of exit modules on the same N images, set
    after set in one buffer. `feats`: anything with `len` and `subset(rows) -> LayerFeatures` (in-memory
    features, or a view of a cache on disk); it is read `_ROWS` rows at a time, so only those rows' features
    are in memory besides the signals."""
    n_rows, signals, preds = len(feats), None, None
    for k, profiles in enumerate(profile_sets):
        profiles = profiles.to("cpu")
        for a in range(0, n_rows, _ROWS):
            part = feats.subset(np.arange(a, min(n_rows, a + _ROWS)))
            probs, pairs = layer_probs(profiles, part, pairs=True)
            sig = jumper_signals(probs, part, profiles.layers, profiles.text, pairs)
            if signals is None:
                shape = (len(profile_sets) * n_rows, *sig.shape[1:])
                signals = (spilled_empty(shape, sig.numpy().dtype) if getattr(feats, "spill", False)
                           else torch.empty(shape, dtype=sig.dtype))  # spilled: on disk (docs/fit.md, memory)
                preds = torch.empty((len(profile_sets) * n_rows, probs.shape[1]), dtype=torch.long)
            signals[k * n_rows + a:k * n_rows + a + len(sig)] = sig
            release(signals[k * n_rows + a:k * n_rows + a + len(sig)])
            preds[k * n_rows + a:k * n_rows + a + len(sig)] = probs.argmax(-1)
    return signals, preds


def _fit_on(signals: torch.Tensor, target: torch.Tensor, cols: torch.Tensor, width: int) -> Jumper:
    """A Jumper fit on standardised signal columns `cols`, zero weights on the others of the first `width`
    (it reads the first `weight.shape[-1]` signals: a model that reads no tail signal is as wide as before
    they existed, and scores bit for bit as it did)."""
    prefix = bool((cols == torch.arange(len(cols))).all())  # the first signals: a view, no copy
    fit = fit_logistic(signals[..., :len(cols)] if prefix else by_blocks(lambda b: b[..., cols], signals),
                       target.float(), standardize=True)
    weight = torch.zeros(fit.weight.shape[0], width)
    weight[:, cols] = fit.weight
    return Jumper(weight, fit.bias)


def fit_jumper(profiles: ClassProfiles, feats, target: str = "goal", cross: list[ClassProfiles] = (),
               trajectory: bool = True) -> Jumper:
    """Fit the Jumper's per-layer logistic models on cached features (labels index the profiles' classes).

    `agree`: s_l estimates P(the layer-l prediction equals the full model's), needs no labels. `no_loss`:
    s_l estimates P(exiting at l costs no accuracy against the full model), i.e. layer l is right or the
    full model is wrong too; it needs labels and spends the depth on images that more depth can still fix.
    `goal` (the default): both, `agree` for max_drop goals (a bound on disagreement) and `no_loss` for
    budgets; without labels it falls back to `agree`. Both read the confidence and label-set signals, fit
    on standardised signals. `cross`: profiles of the same classes from cross-fitted modules (each trained
    on part of the classes, see `training.fit.fit_tgem`); the no-loss model then learns from these images
    scored by every set of modules, and reads z_l too. Otherwise z_l weights are zero: fit on the modules'
    own classes only, a readout-based model learned which images of those classes settle early, and did
    not transfer to text-only classes (docs/design.md). The agreement model also reads the tail signals
    (`jumper.tail_signals`: its max_drop thresholds sit near certainty); the budget models do not.
    `trajectory`: also read the trajectory signals (`jumper.trajectory_signals`, and the tail signal made
    from one); without, their weights are zero."""
    check_jumper_target(target)
    labelled = bool((feats.labels >= 0).all())
    if target == "no_loss" and not labelled:
        raise TGEMError("the no_loss Jumper target needs labelled images")
    sets = [profiles] + (list(cross) if labelled and target != "agree" else [])
    signals, preds = training_signals(sets, feats)
    n_rows = len(feats)
    width = signals.shape[-1] - NUM_TAIL_SIGNALS  # the budget models read no tail signal
    last = width if trajectory else width - NUM_TRAJ_SIGNALS  # without: zero weights on the trajectory signals
    readable = torch.cat([torch.arange(NUM_SIGNALS), torch.arange(width - NUM_SET_SIGNALS - NUM_TRAJ_SIGNALS, last)])
    agree = None
    if target != "no_loss":
        tail = torch.arange(width, width + NUM_TAIL_SIGNALS - (0 if trajectory else 1))  # the last: the readout pair's
        agree = _fit_on(signals[:n_rows], preds[:n_rows, :-1] == preds[:n_rows, -1:], torch.cat([readable, tail]),
                        signals.shape[-1])
    if target == "agree" or not labelled:
        return agree
    labels = feats.labels.repeat(len(sets))[:, None]
    every = torch.arange(width if trajectory else width - NUM_TRAJ_SIGNALS)
    no_loss = _fit_on(signals, (preds[:, :-1] == labels) | (preds[:, -1:] != labels), every if cross else readable,
                      width)
    if target == "no_loss":
        return no_loss
    agree.budget = no_loss
    return agree


def from_samples(backbone, data, labels=None, k: int = 16, space: str = "cls", templates=None, layers=None,
                 seed: int = 0, feats=None, jumper_feats=None, progress: bool = False):
    """An EarlyExitClassifier with sample-based profiles (k images per class of `data`); the Jumper is fit on
    `jumper_feats` (default `data`'s features). Uncalibrated, it never exits early."""
    from tgems.calibration import NEVER_EXIT
    from tgems.classifier import EarlyExitClassifier
    from tgems.features import extract_features
    from tgems.profiles import check_readable_labels, sample_profiles, zero_shot_head

    labels = list(labels or data.classes)
    text = check_readable_labels(backbone, labels, templates or ["{}"])
    feats = feats or extract_features(backbone, data, rates=space == "rates", progress=progress)
    L = backbone.num_layers
    layers = list(layers or range(1, L))
    prof = sample_profiles(feats.space(space), feats.labels, len(labels), text, layers, L,
                           zero_shot_head(backbone), space, k, seed)
    jumper = fit_jumper(prof, jumper_feats if jumper_feats is not None else feats)
    return EarlyExitClassifier(backbone, None, labels, templates, jumper=jumper, profiles=prof,
                               calibration={"goal": "budget", "tau": NEVER_EXIT, "source": "uncalibrated"})
