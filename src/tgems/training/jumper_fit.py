"""Fitting the Jumper: per-layer logistic models on cached features (was `Jumper.fit` and `fit_jumper` in
tgems.jumper, which now holds only what inference needs), and k-shot classifiers from sample profiles."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tgems.errors import TGEMError
from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, Jumper, jumper_signals
from tgems.profiles import ClassProfiles, layer_probs

JUMPER_TARGETS = ("goal", "agree", "no_loss")


def fit_logistic(signals: torch.Tensor, target: torch.Tensor, l2: float = 1e-3, steps: int = 200,
                 standardize: bool = False) -> Jumper:
    """signals (N, n, S), target (N, n) in {0, 1}: fit every layer's logistic model by L-BFGS.
    `standardize`: fit (and penalise) on signals scaled to unit variance over all layers, then fold the
    scaling into the weights, so scoring reads the raw signals as before."""
    n = signals.shape[1]
    x = signals.float()
    y = target.float()
    if standardize:
        mu, sd = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-3)
        x = (x - mu) / sd
    w = torch.zeros(n, x.shape[2], requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logit = (x * w[None]).sum(-1) + b[None]
        loss = F.binary_cross_entropy_with_logits(logit, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight, bias = w.detach(), b.detach()
    if standardize:
        weight = weight / sd
        bias = bias - (weight * mu).sum(-1)
    return Jumper(weight, bias)


def check_jumper_target(target: str) -> None:
    if target not in JUMPER_TARGETS:
        raise TGEMError(f"unknown Jumper target '{target}' (choose from {', '.join(JUMPER_TARGETS)})")


def _training_set(profiles: ClassProfiles, feats) -> tuple[torch.Tensor, torch.Tensor]:
    """(signals (N, n, S), predictions (N, n + 1)) of one set of exit modules on cached features."""
    profiles = profiles.to("cpu")
    probs = layer_probs(profiles, feats)
    return jumper_signals(probs, feats, profiles.layers, profiles.text), probs.argmax(-1)


def _fit_on(signals: torch.Tensor, target: torch.Tensor, cols: torch.Tensor) -> Jumper:
    """A Jumper fit on standardised signal columns `cols`, zero weights on the others."""
    fit = fit_logistic(signals[..., cols], target.float(), standardize=True)
    weight = torch.zeros(fit.weight.shape[0], signals.shape[-1])
    weight[:, cols] = fit.weight
    return Jumper(weight, fit.bias)


def fit_jumper(profiles: ClassProfiles, feats, target: str = "goal", cross: list[ClassProfiles] = ()) -> Jumper:
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
    not transfer to text-only classes (docs/design.md)."""
    check_jumper_target(target)
    signals, preds = _training_set(profiles, feats)
    labelled = bool((feats.labels >= 0).all())
    if target == "no_loss" and not labelled:
        raise TGEMError("the no_loss Jumper target needs labelled images")
    width = signals.shape[-1]
    readable = torch.cat([torch.arange(NUM_SIGNALS), torch.arange(width - NUM_SET_SIGNALS, width)])
    agree = None
    if target != "no_loss":
        agree = _fit_on(signals, preds[:, :-1] == preds[:, -1:], readable)
    if target == "agree" or not labelled:
        return agree
    if cross:
        sets = [(signals, preds)] + [_training_set(p, feats) for p in cross]
        signals, preds = torch.cat([x for x, _ in sets]), torch.cat([p for _, p in sets])
    labels = feats.labels.repeat(len(cross) + 1)[:, None]
    no_loss = _fit_on(signals, (preds[:, :-1] == labels) | (preds[:, -1:] != labels),
                      torch.arange(width) if cross else readable)
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
