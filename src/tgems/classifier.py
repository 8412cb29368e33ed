"""EarlyExitClassifier: zero-shot classification that stops the image encoder per image.

scikit-learn vocabulary: build it from a backbone, T-GEM modules (a checkpoint name or path) or k-shot
samples, and a label set; `calibrate` returns a calibrated copy (a compute budget or a maximum accuracy
drop); `predict` runs the engine, so the compute saving is real; `save` / `load` keep the calibrated state.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tgems.artifacts as artifacts
from tgems.calibration import (ALWAYS_EXIT, NEVER_EXIT, calibrate_budget, calibrate_max_drop, check_tau, min_calibration_size,
                               simulate)
from tgems.engine import run_early_exit
from tgems.errors import TGEMError
from tgems.features import LayerFeatures, extract_features
from tgems.jumper import Jumper, jumper_signals
from tgems.policies import JumperPolicy
from tgems.profiles import ClassProfiles, check_readable_labels, layer_probs
from tgems.options import DELTA
from tgems.tgem import TGEM, load_tgem

FORMAT_VERSION = artifacts.CLASSIFIER.format  # 2: the backbone's source, a content hash; 3: distilled readouts in the
# profiles; 4: distilled maps that read the mean-patch readouts (profiles.patch_flops); 5: an agreement model
# that may read the tail signals (jumper.tail_signals)
CONFIG, TENSORS = artifacts.CLASSIFIER.config, artifacts.CLASSIFIER.tensors
LABEL_COST_LIMIT = 0.05  # scoring the label set may add this share of plain CLIP's FLOPs before a warning


class LabelSetCostWarning(UserWarning):
    """Scoring the label set at every candidate layer costs more than the exits can save."""


@dataclass
class Prediction:
    labels: list[str]
    indices: np.ndarray
    probs: np.ndarray  # (N, C) class probabilities at the exit layer
    exit_layers: np.ndarray
    flops: np.ndarray
    flops_ratio: np.ndarray  # per image, vs the full encoder
    embeddings: np.ndarray | None = None  # (N, D) the readout z at each image's exit layer
    label_cost: dict | None = None  # what scoring the label set costs (EarlyExitClassifier.label_cost)

    @property
    def mean_layers(self) -> float:
        return float(self.exit_layers.mean())


def _norm_text(t: str) -> str:
    return " ".join(t.lower().split())


def _modules_hash(tgem: TGEM) -> str:
    """A hash of the exit modules' stored weights (float32 bytes): what computed profiles are made from."""
    h = hashlib.sha256()
    for k, v in sorted(tgem.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class EarlyExitClassifier:
    """Early-exit zero-shot classifier over a label set.

    `tgem`: a shipped name ("embedded:cls"), a checkpoint directory, or TGEM modules (then give `jumper`).
    Without `calibrate`, the checkpoint's threshold applies (a budget of 0.5 on its own held-out images)."""

    def __init__(self, backbone, tgem: TGEM | str | None, labels, templates=None, jumper: Jumper | None = None,
                 profiles: ClassProfiles | None = None, calibration: dict | None = None):
        self.backbone = backbone
        self.config = {}
        if isinstance(tgem, TGEM):
            self.config = {"space": tgem.space}  # what a save can tell of modules that came without a checkpoint
        elif tgem is not None:
            tgem, jumper, self.config = load_tgem(tgem, backbone)
        if jumper is None:
            raise TGEMError("an early-exit classifier needs a Jumper (load a T-GEM checkpoint, or give jumper=)")
        self.templates = list(templates or self.config.get("templates") or ["{}"])
        self.labels = list(labels)
        # what the profiles are made from, for the job fingerprint: the stored module weights when they are
        # computed here (their values move in the last bit with the thread count), else the profiles themselves
        self.profile_source = None
        if profiles is None:
            if tgem is None:
                raise TGEMError("give T-GEM modules (or a checkpoint name or path) or sample-based profiles")
            profiles = tgem.profiles(check_readable_labels(backbone, self.labels, self.templates), backbone)
            self.profile_source = _modules_hash(tgem)
        if profiles.num_classes != len(self.labels):
            raise TGEMError(f"profiles have {profiles.num_classes} classes for {len(self.labels)} labels")
        self.profiles = profiles.to(backbone.device)
        self.jumper = jumper.to(backbone.device)
        self.calibration = dict(calibration or {"goal": "budget", "tau": float(jumper.tau), "source": "checkpoint",
                                                "budget": self.config.get("settings", {}).get("default_budget")})
        self.calibration["tau"] = check_tau(self.calibration["tau"])
        self._label_cost = self._scoring_cost()
        if self._label_cost["costly"]:
            warnings.warn(self._label_cost["message"], LabelSetCostWarning, stacklevel=2)

    def label_cost(self) -> dict:
        """What scoring this label set costs (see `_scoring_cost`); also `Prediction.label_cost`."""
        return dict(self._label_cost)

    def _scoring_cost(self) -> dict:
        """What scoring this label set at the candidate layers costs, in the engine's one FLOPs count: the
        FLOPs ratio of an image that runs to the last layer, and the first candidate layer (before the last)
        from which an exit costs at least plain CLIP (the encoder and one scoring of the labels,
        `engine.full_flops`), so exits there save nothing. `costly` when an image run to the end costs more than
        LABEL_COST_LIMIT above plain CLIP."""
        from tgems.engine import exit_flops, full_flops
        from tgems.jumper import exit_head_flops, exit_head_flops_by_layer

        L, layers = self.backbone.num_layers, self.profiles.exit_layers
        by_layer = exit_head_flops_by_layer(self.profiles) if self.profiles.shortlist else None
        ratios = (exit_flops(self.backbone, torch.as_tensor(layers), layers, exit_head_flops(self.profiles), by_layer)
                  / full_flops(self.backbone, len(self.labels))).tolist()
        full_depth = ratios[-1]
        break_even = next((l for l, r in zip(layers[:-1], ratios) if r >= 1.0), None)
        out = {"num_classes": len(self.labels), "shortlist": self.profiles.shortlist,
               "full_depth_flops_ratio": round(full_depth, 4), "break_even_layer": break_even,
               "costly": full_depth > 1.0 + LABEL_COST_LIMIT}
        if out["costly"]:
            short = (f" (a shortlist of {self.profiles.shortlist} classes between full scorings)"
                     if self.profiles.shortlist else "")
            out["message"] = (f"scoring {len(self.labels)} labels at every candidate layer{short} makes an image that "
                              f"runs to layer {L} cost {full_depth:.2f} x plain CLIP"
                              + (f", and an exit from layer {break_even} on saves nothing" if break_even else "")
                              + ": the label set costs more than early exits save (use fewer labels)")
        return out

    def __repr__(self):
        return (f"EarlyExitClassifier({len(self.labels)} labels, space={self.profiles.space}, "
                f"goal={self.goal}, tau={self.tau:.4f}, backbone={self.backbone.name!r})")

    @property
    def text(self) -> torch.Tensor:
        return self.profiles.text

    @property
    def goal(self) -> str:
        return self.calibration["goal"]

    @property
    def tau(self) -> float:
        return self.calibration["tau"]

    # ----------------------------------------------------------- calibration on cached features

    def features(self, data_or_feats, progress: bool = False) -> LayerFeatures:
        if isinstance(data_or_feats, LayerFeatures):
            return data_or_feats
        return extract_features(self.backbone, data_or_feats, rates=self.profiles.space == "rates",
                                progress=progress, desc="calibration features")

    def match_labels(self, feats: LayerFeatures, allow_uncovered: bool = False) -> torch.Tensor:
        """The images' labels as indices into this classifier's labels, matched by class text (case and
        spacing aside), never by position. Images of classes outside the label set are an error, and so is
        a label without images unless `allow_uncovered` (e.g. text-only classes by design)."""
        if feats.classes is None:
            raise TGEMError("the calibration features carry no class texts; extract them from a dataset")
        index = {_norm_text(t): i for i, t in enumerate(self.labels)}
        present = sorted(set(feats.labels[feats.labels >= 0].tolist()))
        outside = [feats.classes[c] for c in present if _norm_text(feats.classes[c]) not in index]
        hint = "; or calibrate label-free (agreement with the full model: use_labels=False / --label-free)"
        if outside:
            names = ", ".join(f"'{t}'" for t in outside[:4]) + (f" and {len(outside) - 4} more" if len(outside) > 4 else "")
            raise TGEMError(f"the calibration data has images of {len(outside)} class(es) outside the label set "
                            f"({names}){hint}")
        covered = {_norm_text(feats.classes[c]) for c in present}
        missing = [t for t in self.labels if _norm_text(t) not in covered]
        if missing and not allow_uncovered:
            names = ", ".join(f"'{t}'" for t in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise TGEMError(f"the calibration data has no image of {len(missing)} of the {len(self.labels)} labels "
                            f"({names}){hint}")
        remap = torch.tensor([index.get(_norm_text(t), -1) for t in feats.classes] + [-1], dtype=torch.long)
        return remap[feats.labels]

    def layer_predictions(self, feats: LayerFeatures, goal: str | None = None):
        """(scores (N, n), predictions (N, n + 1)) on cached features (CPU); scores of the Jumper model that
        serves `goal` ("budget" or "max_drop"; default: this classifier's goal)."""
        profiles = self.profiles.to("cpu")
        probs, pairs = layer_probs(profiles, feats, pairs=True)
        jumper = self.jumper.for_goal(goal or self.goal).to("cpu")
        return jumper.scores(jumper_signals(probs, feats, profiles.layers, profiles.text, pairs)), probs.argmax(-1)

    def calibrate(self, data, budget: float | None = None, max_drop: float | None = None, delta: float = DELTA,
                  use_labels: bool = True, allow_uncovered: bool = False,
                  progress: bool = False) -> "EarlyExitClassifier":
        """A copy calibrated on held-out images (a Dataset or its LayerFeatures): for a compute budget (mean
        executed layers / L, best accuracy under it), or for a maximum disagreement with the full model
        `max_drop` holding with probability >= 1 - delta. `use_labels=False` calibrates on agreement with the
        full model, for images of any classes. This classifier is left as it is."""
        if (budget is None) == (max_drop is None):
            raise TGEMError("calibrate needs exactly one of budget= or max_drop=")
        if budget is not None and not 0 < budget <= 1:
            raise TGEMError(f"budget must lie in (0, 1], got {budget}")
        if max_drop is not None and not (0 < max_drop < 1 and 0 < delta < 1):
            raise TGEMError("max_drop and delta must lie in (0, 1)")
        feats = self.features(data, progress)
        labels = None
        if use_labels and (feats.labels >= 0).all():
            labels = self.match_labels(feats, allow_uncovered)
        goal = "budget" if budget is not None else "max_drop"
        scores, preds = self.layer_predictions(feats, goal)
        layers, L = self.profiles.exit_layers, self.backbone.num_layers
        if budget is not None:
            tau = calibrate_budget(scores, preds, layers, L, budget, labels)
            reachable = float(simulate(scores, preds, layers, ALWAYS_EXIT)[1].float().mean()) / L
            if reachable > budget + 1e-9:
                warnings.warn(f"budget {budget:g} is not reachable on this data: the earliest exits already cost "
                              f"{reachable:.3f} (every image at its first candidate layer); calibrated for that",
                              stacklevel=2)
            info = {"goal": "budget", "budget": budget, "reachable_budget": reachable}
        else:
            need = min_calibration_size(max_drop, delta)
            if len(feats) < need:
                raise TGEMError(f"{len(feats)} calibration images cannot certify max_drop {max_drop} at delta "
                                f"{delta}: Learn-then-Test needs at least {need} (with zero disagreements)")
            tau, lt = calibrate_max_drop(scores, preds, layers, max_drop, delta)
            info = {"goal": "max_drop", "max_drop": max_drop, "delta": delta, **lt}
        p, d = simulate(scores, preds, layers, tau)
        info.update(tau=tau, source="calibrate", labels_used=labels is not None, n_calib=len(feats),
                    calib_mean_layers=float(d.float().mean()),
                    calib_agreement=float((p == preds[:, -1]).float().mean()))
        if labels is not None:  # the labels are known: say when the full model is at chance on them
            from tgems.chance import chance_check, warn_if_near_chance

            info["full_model"] = chance_check(int((preds[:, -1] == labels).sum()), len(labels), len(self.labels))
            info["degenerate"] = info["full_model"]["degenerate"]
            warn_if_near_chance(info["full_model"], "the full model's accuracy on the calibration labels")
        return self._with(info)

    def with_tau(self, tau: float) -> "EarlyExitClassifier":
        """A copy with a hand-set threshold (0 exits at the first candidate, 2 never exits early)."""
        return self._with({"goal": self.goal, "tau": check_tau(tau), "source": "user"})

    def _with(self, calibration: dict) -> "EarlyExitClassifier":
        out = copy.copy(self)
        out.calibration = dict(calibration)
        return out

    def simulate(self, feats: LayerFeatures, tau: float | None = None):
        """Exit decisions on cached features (identical to the engine's): (predictions, exit layers)."""
        scores, preds = self.layer_predictions(feats)
        return simulate(scores, preds, self.profiles.exit_layers, self.tau if tau is None else tau)

    # ----------------------------------------------------------- prediction on the engine

    def policy(self, tau: float | None = None, profiles: ClassProfiles | None = None) -> JumperPolicy:
        """The exit policy: this classifier's Jumper for its goal, at `tau` (default: its own), over `profiles`
        (default: its own; another label set's, made by the same T-GEM modules)."""
        return JumperPolicy(self.profiles if profiles is None else profiles, self.jumper.for_goal(self.goal),
                            self.tau if tau is None else tau)

    def meets_goal(self, budget: float | None = None, max_drop: float | None = None) -> bool:
        """Whether this classifier was calibrated for the goal asked (a budget or a max drop; none: any)."""
        cal = self.calibration

        def same(a, b):
            return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)

        if budget is not None and not (cal.get("goal") == "budget" and same(cal.get("budget"), budget)):
            return False
        return max_drop is None or (cal.get("goal") == "max_drop" and same(cal.get("max_drop"), max_drop))

    def goal_text(self) -> str:
        """The goal it holds, in words: "budget 0.5", "max_drop 0.02 (delta 0.1)" or the threshold's source."""
        cal = self.calibration
        if cal.get("goal") == "budget" and cal.get("budget") is not None:
            return f"budget {cal['budget']}"
        if cal.get("goal") == "max_drop" and cal.get("max_drop") is not None:
            return f"max_drop {cal['max_drop']} (delta {cal.get('delta')})"
        return f"no goal (tau {cal.get('tau')} from its {cal.get('source', 'checkpoint')})"

    def predict(self, images, batch_size: int = 256) -> Prediction:
        """PIL images, uint8 arrays or preprocessed pixels -> labels, probabilities, exit layers, FLOPs."""
        pixels = images if isinstance(images, torch.Tensor) else self.backbone.preprocess(images)
        res = run_early_exit(self.backbone, pixels, self.policy(), batch_size=batch_size)
        probs = res.outputs.float().cpu()
        idx = probs.argmax(1).numpy()
        flops = res.flops.numpy()
        return Prediction([self.labels[i] for i in idx], idx, probs.numpy(), res.exit_layers.numpy(), flops,
                          flops / res.full_flops, res.features.float().cpu().numpy(), self.label_cost())

    # ----------------------------------------------------------- persistence

    def save(self, path) -> Path:
        """A directory with classifier.safetensors (profiles, Jumper) and classifier.json (labels, templates,
        calibration, the backbone's name, source and fingerprint, a hash over labels and tensors); written
        atomically. A backbone in a local directory is recorded by its absolute path and its path relative to
        the classifier, so a project moved as a whole still loads."""
        tensors = {**self.profiles.state(), **self.jumper.state()}
        config = {"format": FORMAT_VERSION, "kind": "tgems-classifier", "backbone": self.backbone.name,
                  "backbone_source": backbone_source(self.backbone, path),
                  "family": self.backbone.family, "fingerprint": self.backbone.fingerprint(),
                  "labels": self.labels, "templates": self.templates, "profiles": self.profiles.config(),
                  "calibration": self.calibration, "tgem": {k: self.config[k] for k in ("space", "data", "settings")
                                                            if k in self.config},
                  "content": content_hash(self.labels, self.templates, tensors)}
        if self.profile_source is not None:
            config["profile_source"] = self.profile_source
        return artifacts.write(path, artifacts.CLASSIFIER, config, tensors)

    @classmethod
    def load(cls, path, backbone=None, device="cpu", dtype="float32") -> "EarlyExitClassifier":
        """Load a saved classifier. Without `backbone`, the one it was saved with is found: a shipped name, a
        hub id, its absolute path, or its path relative to the classifier's directory. A given `backbone` must
        be the one it was saved for (same fingerprint)."""
        path = Path(path).expanduser()
        cfg = artifacts.read_config(path, artifacts.CLASSIFIER, ("labels", "profiles", "calibration"))
        labels, prof_cfg, calibration = cfg["labels"], cfg["profiles"], cfg["calibration"]
        if backbone is None:
            backbone = _find_backbone(path, cfg, device, dtype)
        artifacts.check_backbone(cfg, backbone, path, "classifier")
        tensors = artifacts.read_tensors(path, artifacts.CLASSIFIER, cfg)
        if "content" in cfg and cfg["content"] != content_hash(labels, cfg.get("templates"), tensors):
            raise TGEMError(f"{path / CONFIG}: its labels or templates do not match the class profiles saved in "
                            f"{TENSORS} (edited by hand?); calibrate a classifier for the new label texts instead")
        try:
            jumper = Jumper.from_state(tensors, calibration.get("tau", NEVER_EXIT))
            profiles = ClassProfiles.from_state(tensors, prof_cfg)
        except KeyError as e:
            raise TGEMError(f"{path / TENSORS} is damaged: missing {e}") from None
        clf = cls(backbone, None, labels, cfg.get("templates"), jumper=jumper, profiles=profiles,
                  calibration=calibration)
        clf.config = cfg.get("tgem", {})
        clf.profile_source = cfg.get("profile_source")
        return clf


def content_hash(labels, templates, tensors: dict) -> str:
    """sha256 over the label texts, templates and tensors: a label edited in the JSON no longer matches."""
    h = hashlib.sha256(json.dumps({"labels": list(labels), "templates": list(templates or [])}).encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def backbone_source(backbone, saved_at) -> dict:
    """Where a backbone comes from, so a saved classifier can find it again: a shipped name, a hub id, or a
    local directory (absolute, and relative to the directory the classifier is saved to)."""
    from tgems.pretrained import model_path

    name = str(backbone.name)
    try:
        shipped = model_path(name) is not None
    except TGEMError:
        shipped = False
    if shipped:
        return {"kind": "shipped", "name": name}
    if getattr(backbone, "path", None) is None:
        return {"kind": "hub", "name": name}
    where = Path(backbone.path).expanduser().absolute()
    return {"kind": "path", "path": str(where),
            "relative": os.path.relpath(where, Path(saved_at).expanduser().absolute())}


def _find_backbone(path: Path, cfg: dict, device, dtype):
    """The backbone a saved classifier names (see backbone_source); one line asking for it when not found."""
    from tgems.backbones import load_backbone

    name = str(cfg.get("backbone"))
    src = cfg.get("backbone_source") or {}
    if src.get("kind") in ("shipped", "hub"):
        return load_backbone(src["name"], device=device, dtype=dtype)
    if src.get("kind") == "path":
        tried = [Path(src["path"]), path / src.get("relative", src["path"])]
    else:  # format 1: the name as typed, a shipped name, a hub id or a path from where it was saved
        from tgems.pretrained import model_path

        if model_path(name) is not None or not (name.startswith((".", "/", "~")) or Path(name).exists()
                                                or (path / name).exists()):
            return load_backbone(name, device=device, dtype=dtype)
        tried = [Path(name).expanduser(), path / name]
    for where in tried:
        if where.is_dir():
            return load_backbone(str(where), device=device, dtype=dtype)
    raise TGEMError(f"classifier {path} was saved for the backbone at {tried[0]} (fingerprint "
                    f"{str(cfg.get('fingerprint'))[:12]}), which is not there (nor at {tried[1]}); give it with "
                    f"--model DIR (backbone= in Python)")
