"""Classification of image files and the tokenizer's vocabulary, for the command line (a classifier is built
from a `tgems.spec.PredictorSpec`)."""
from __future__ import annotations

from tgems.errors import TGEMError


def classify_files(clf, paths, batch_size: int = 256) -> tuple[list[dict], list[dict]]:
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
        pred = clf.predict(images, batch_size=batch_size)
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
