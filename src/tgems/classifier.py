"""EarlyExitClassifier: zero-shot classification that stops the image encoder per image.

scikit-learn vocabulary: build it from a backbone, T-GEM modules (or k-shot samples) and a label
set, `calibrate` the Jumper's threshold for a budget or a maximum accuracy drop, then `predict`.
Prediction runs on the engine, so the compute saving is real.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tgems.engine import run_early_exit
from tgems.errors import TGEMError
from tgems.features import RATES_DTYPE, LayerFeatures, extract_features
from tgems.fit import final_scale, fit_jumper, jumper_signals, layer_probs, load_tgem
from tgems.jumper import Jumper, calibrate_budget, calibrate_max_drop, exit_signals, simulate
from tgems.profiles import TGEM, ClassProfiles, class_embeddings, sample_profiles


@dataclass
class Prediction:
    labels: list[str]
    indices: np.ndarray
    probs: np.ndarray  # (N, C)
    exit_layers: np.ndarray
    flops: np.ndarray
    flops_ratio: np.ndarray  # per image, vs the full encoder

    @property
    def mean_layers(self) -> float:
        return float(self.exit_layers.mean())


class _JumperPolicy:
    """Engine exit policy: class profiles + Jumper at each candidate layer, full CLIP at L."""

    def __init__(self, profiles: ClassProfiles, jumper: Jumper, tau: float):
        self.p, self.jumper, self.tau = profiles, jumper, tau
        self.candidate_layers = list(profiles.layers)
        self.needs_rates = profiles.space == "rates"
        self.head_flops = profiles.head_flops()
        self._index = {l: j for j, l in enumerate(profiles.layers)}

    def start(self, batch_size: int):
        self.prev_p = torch.zeros(batch_size, self.p.num_classes)
        self.prev_z = None

    def decide(self, layer, z, rows, rates=None):
        if layer not in self._index:  # the last layer: full CLIP
            return torch.ones(len(rows), dtype=torch.bool), self.p.logits(len(self.p.layers), z).softmax(-1)
        j = self._index[layer]
        x = rates.to(RATES_DTYPE).float() if self.p.space == "rates" else z  # as in the feature cache
        probs = self.p.logits(j, x).softmax(-1)
        if j == 0:
            sig = exit_signals(probs, None, z, None)
            self.prev_z = torch.zeros(len(self.prev_p), z.shape[1])
        else:
            sig = exit_signals(probs, self.prev_p[rows], z, self.prev_z[rows])
        self.prev_p[rows] = probs
        self.prev_z[rows] = z.float()
        exit_now = self.jumper.score(j, sig) >= self.tau
        return exit_now, probs


class EarlyExitClassifier:
    """Early-exit zero-shot classifier over a label set."""

    def __init__(self, backbone, tgem: TGEM | str | None, labels, templates=None, jumper: Jumper | None = None,
                 profiles: ClassProfiles | None = None):
        self.backbone = backbone
        self.config = {}
        if isinstance(tgem, (str, bytes)) or hasattr(tgem, "__fspath__"):
            tgem, jumper, self.config = load_tgem(tgem, backbone)
        self.templates = list(templates or self.config.get("templates") or ["{}"])
        self.labels = list(labels)
        self.text = class_embeddings(backbone, self.labels, self.templates)
        if profiles is None:
            if tgem is None:
                raise TGEMError("give T-GEM modules (or a checkpoint path) or sample-based profiles")
            profiles = tgem.profiles(self.text, final_scale(backbone))
        self.profiles = profiles
        self.jumper = jumper
        self.tau = jumper.tau if jumper is not None else 2.0
        self.goal = "budget"  # the checkpoint's tau meets a budget; `calibrate` sets the goal
        self.calibration: dict = {}

    @classmethod
    def from_samples(cls, backbone, data, labels=None, k: int = 16, space: str = "cls", templates=None,
                     layers=None, seed: int = 0, feats: LayerFeatures | None = None, progress: bool = False):
        """Sample-based profiles (k images per class of `data`); the Jumper is then fit on `data` too."""
        labels = list(labels or data.classes)
        feats = feats or extract_features(backbone, data, rates=space == "rates", progress=progress)
        text = class_embeddings(backbone, labels, templates or ["{}"])
        L = backbone.num_layers
        layers = list(layers or range(1, L))
        prof = sample_profiles(feats.space(space), feats.labels, len(labels), text, layers, L,
                               final_scale(backbone), space, k, seed)
        clf = cls(backbone, None, labels, templates, profiles=prof)
        clf.jumper = fit_jumper(prof, feats)
        return clf

    # ----------------------------------------------------------- calibration on cached features

    def _cached(self, data_or_feats) -> LayerFeatures:
        if isinstance(data_or_feats, LayerFeatures):
            return data_or_feats
        return extract_features(self.backbone, data_or_feats, rates=self.profiles.space == "rates",
                                progress=False)

    def layer_predictions(self, feats: LayerFeatures, goal: str | None = None):
        """(scores (N, n), predictions (N, n + 1)) on cached features; scores of the Jumper model that
        serves `goal` ("budget" or "max_drop"; default: the goal of the last calibration)."""
        probs = layer_probs(self.profiles, feats)
        jumper = self.jumper.for_goal(goal or self.goal)
        return jumper.scores(jumper_signals(probs, feats, self.profiles.layers)), probs.argmax(-1)

    def calibrate(self, data, budget: float | None = None, max_drop: float | None = None, delta: float = 0.1,
                  use_labels: bool = True) -> "EarlyExitClassifier":
        """Set the Jumper's threshold on held-out images: a compute budget (mean executed layers / L) or a
        maximum disagreement with the full model `max_drop` holding with probability >= 1 - delta."""
        if (budget is None) == (max_drop is None):
            raise TGEMError("calibrate needs exactly one of budget= or max_drop=")
        if budget is not None and not 0 < budget <= 1:
            raise TGEMError(f"budget must lie in (0, 1], got {budget}")
        if max_drop is not None and not (0 < max_drop < 1 and 0 < delta < 1):
            raise TGEMError("max_drop and delta must lie in (0, 1)")
        feats = self._cached(data)
        self.goal = "budget" if budget is not None else "max_drop"
        scores, preds = self.layer_predictions(feats)
        L = self.backbone.num_layers
        if budget is not None:
            labels = feats.labels if use_labels and (feats.labels >= 0).all() else None
            self.tau = calibrate_budget(scores, preds, self.profiles.layers + [L], L, budget, labels)
            self.calibration = {"goal": "budget", "budget": budget}
        else:
            self.tau, info = calibrate_max_drop(scores, preds, self.profiles.layers + [L], max_drop, delta)
            self.calibration = {"goal": "max_drop", "max_drop": max_drop, "delta": delta, **info}
        p, d = simulate(scores, preds, self.profiles.layers + [L], self.tau)
        self.calibration.update(tau=self.tau, calib_mean_layers=float(d.float().mean()),
                                calib_agreement=float((p == preds[:, -1]).float().mean()))
        return self

    def simulate(self, feats: LayerFeatures, tau: float | None = None):
        """Exit decisions on cached features (identical to the engine's): (predictions, exit layers)."""
        scores, preds = self.layer_predictions(feats)
        return simulate(scores, preds, self.profiles.layers + [self.backbone.num_layers],
                        self.tau if tau is None else tau)

    # ----------------------------------------------------------- prediction on the engine

    def policy(self, tau: float | None = None) -> _JumperPolicy:
        return _JumperPolicy(self.profiles, self.jumper.for_goal(self.goal), self.tau if tau is None else tau)

    def predict(self, images, batch_size: int = 256) -> Prediction:
        pixels = images if isinstance(images, torch.Tensor) else self.backbone.preprocess(images)
        res = run_early_exit(self.backbone, pixels, self.policy(), batch_size=batch_size)
        probs = res.outputs.float()
        idx = probs.argmax(1).numpy()
        flops = res.flops.numpy()
        return Prediction([self.labels[i] for i in idx], idx, probs.numpy(), res.exit_layers.numpy(), flops,
                          flops / self.backbone.flops_full())
