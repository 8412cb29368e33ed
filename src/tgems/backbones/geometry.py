"""The geometric half of a backbone's preprocessing (resize, centre crop), as a small picklable value.

A backbone's `ImageTransform` applies it before normalising; batch jobs send it to their decoding
workers, so model-size uint8 arrays cross the process boundary rather than full images, and the
arrays are the very ones `backbone.preprocess` would make. No torch here: workers import this.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tgems.errors import TGEMError

RESAMPLE = ("bicubic", "bilinear", "nearest", "lanczos")


@dataclass(frozen=True)
class ImageGeometry:
    """resize_mode "shortest" (resize_size: int, the shortest edge) or "exact" (resize_size: (h, w)); then a
    centre crop to crop_size (h, w), as Hugging Face image processors do it."""

    resize_mode: str
    resize_size: object
    crop_size: tuple
    resample: str = "bicubic"

    def __post_init__(self):
        if self.resample not in RESAMPLE:
            raise TGEMError(f"unknown resample '{self.resample}' (use one of {', '.join(RESAMPLE)})")

    def resize_target(self, h, w):
        """(h, w) after resizing, or None when no resize is needed (HF's rounding)."""
        if self.resize_mode == "exact":
            return None if (h, w) == tuple(self.resize_size) else tuple(self.resize_size)
        s = self.resize_size
        if min(h, w) == s:
            return None
        if w <= h:
            return int(s * h / w), s
        return s, int(s * w / h)

    def crop(self, arr):
        """Centre crop on the axes (..., H, W, 3), as HF's center_crop."""
        ch, cw = self.crop_size
        h, w = arr.shape[-3], arr.shape[-2]
        if h < ch or w < cw:
            raise TGEMError(f"image of {h}x{w} is smaller than the crop size {ch}x{cw}")
        top, left = (h - ch) // 2, (w - cw) // 2
        return arr[..., top:top + ch, left:left + cw, :]

    def apply(self, img) -> np.ndarray:
        """A PIL image or a uint8 array -> the resized, cropped uint8 (H, W, 3) array the encoder reads."""
        from PIL import Image

        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim not in (2, 3):
                raise TGEMError(f"image arrays must be uint8 HxWx3, got {img.dtype} {img.shape}")
            if img.ndim == 3 and img.shape[2] == 3 and self.resize_target(*img.shape[:2]) is None:
                return self.crop(img)
            img = Image.fromarray(img)
        if not isinstance(img, Image.Image):
            raise TGEMError(f"expected a PIL image or a uint8 array, got {type(img).__name__}")
        from tgems.images import to_rgb

        img = to_rgb(img)
        target = self.resize_target(img.height, img.width)
        if target is not None:
            img = img.resize((target[1], target[0]), resample=getattr(Image, self.resample.upper()))
        return self.crop(np.asarray(img))
