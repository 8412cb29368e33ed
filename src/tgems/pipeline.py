"""From names and options to a ready classifier, and classification of image files: what the command line,
batch jobs and integrations share, so each of them is one call."""
from __future__ import annotations

from pathlib import Path

from tgems.classifier import EarlyExitClassifier
from tgems.errors import TGEMError
from tgems.profiles import check_labels


def read_labels(labels: str | None = None, labels_file=None) -> list[str]:
    """Comma-separated class texts, or one per line in a file."""
    if labels_file:
        try:
            items = [ln.strip() for ln in Path(labels_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise TGEMError(f"cannot read labels file {labels_file}: {e.strerror}") from None
    else:
        items = [t.strip() for t in (labels or "").split(",") if t.strip()]
    return check_labels(items)


def build_classifier(model: str = "embedded", tgem: str = "embedded:cls", labels=None, classifier=None,
                     calib: str | None = None, budget: float | None = None, max_drop: float | None = None,
                     delta: float = 0.1, tau: float | None = None, label_free: bool = False, seed: int = 0,
                     device="cpu", dtype="float32", progress: bool = False, log=None) -> EarlyExitClassifier:
    """A saved classifier (`classifier` dir), or one built from a model, a T-GEM and labels, calibrated on
    `calib` for `budget` or `max_drop` (or given a hand-set `tau`)."""
    from tgems.backbones import load_backbone
    from tgems.data import load_dataset
    from tgems.tgem import read_tgem_config

    if classifier:
        if labels:
            raise TGEMError("--classifier already holds its labels; drop --labels")
        clf = EarlyExitClassifier.load(classifier, device=device, dtype=dtype)
    else:
        labels = check_labels(labels)
        read_tgem_config(tgem)
        clf = EarlyExitClassifier(load_backbone(model, device=device, dtype=dtype), tgem, labels)
    if budget is not None or max_drop is not None:
        if not calib:
            raise TGEMError("--budget / --max-drop need --calib SPEC (held-out images to calibrate on)")
        clf = clf.calibrate(load_dataset(calib, seed=seed), budget=budget, max_drop=max_drop, delta=delta,
                            use_labels=not label_free, progress=progress)
        if log:
            how = "label-free (agreement with the full model)" if not clf.calibration["labels_used"] else "on labels"
            log(f"calibrated {clf.goal} {how} on {clf.calibration['n_calib']} images: tau {clf.tau:.4f}, "
                f"{clf.calibration['calib_mean_layers']:.2f} mean layers")
    elif tau is not None:
        clf = clf.with_tau(tau)
    return clf


def classify_files(clf: EarlyExitClassifier, paths) -> tuple[list[dict], list[dict]]:
    """(records, failures): one record per readable image, one {path, reason} per unreadable one."""
    from tgems.data import read_image

    images, kept, failures = [], [], []
    for p in paths:
        try:
            images.append(read_image(p))
            kept.append(p)
        except TGEMError as e:
            failures.append({"path": str(p), "reason": str(e)})
    records = []
    if images:
        pred = clf.predict(images)
        for i, p in enumerate(kept):
            records.append({"path": str(p), "label": pred.labels[i], "probability": round(float(pred.probs[i].max()), 4),
                            "exit_layer": int(pred.exit_layers[i]), "flops_ratio": round(float(pred.flops_ratio[i]), 4)})
    return records, failures


def vocabulary(model: str = "embedded", device="cpu", dtype="float32") -> tuple[list[str] | None, str]:
    """(words, note): the words a word-level tokenizer knows (every other word reads as unknown), or
    (None, note) for a subword tokenizer, which reads any text. For `tgems vocab`."""
    from tgems.backbones import load_backbone
    from tgems.profiles import known_words

    bb = load_backbone(model, device=device, dtype=dtype)
    words = known_words(bb)
    if words is None:
        return None, f"{bb.name} has a subword tokenizer ({type(bb.tokenizer).__name__}): it reads any text"
    marks = [w for w in words if not any(ch.isalnum() for ch in w)]
    words = [w for w in words if w not in marks]
    return words, (f"{bb.name} has a word-level tokenizer of {len(words)} words (and the marks {' '.join(marks)}); "
                   f"any other word reads as {bb.tokenizer.unk_token}")
