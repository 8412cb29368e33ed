"""The in-memory dataset every reader returns."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image


@dataclass
class Dataset:
    """Labelled images with class texts.

    images: uint8 array (N, H, W, 3), or a list of RGB PIL images when sizes differ.
    labels: int64 (N,), indices into ``classes``.
    classes: class texts ("a red star"), the zero-shot label set.
    captions: optional free-text caption per image (for contrastive pretraining / T-GEM fit).
    difficulty: optional float32 (N,) in [0, 1], 0 = easy.
    heldout: optional bool (num_classes,), True for classes that are text-only (never seen in training).
    """

    name: str
    images: np.ndarray | list
    labels: np.ndarray
    classes: list[str]
    captions: list[str] | None = None
    difficulty: np.ndarray | None = None
    heldout: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, i: int) -> Image.Image:
        img = self.images[i]
        return img if isinstance(img, Image.Image) else Image.fromarray(img)

    def subset(self, idx) -> "Dataset":
        idx = np.asarray(idx, dtype=np.int64)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return replace(
            self,
            images=images,
            labels=self.labels[idx],
            captions=None if self.captions is None else [self.captions[i] for i in idx],
            difficulty=None if self.difficulty is None else self.difficulty[idx],
        )

    def sample_split(self) -> np.ndarray:
        """Per-image split name: "heldout" for text-only classes, else "seen"."""
        if self.heldout is None:
            return np.array(["seen"] * len(self), dtype=object)
        return np.where(self.heldout[self.labels], "heldout", "seen").astype(object)
