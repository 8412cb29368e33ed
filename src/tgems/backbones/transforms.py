"""Images -> normalised pixels, as Hugging Face image processors do it (resize, centre crop, scale, normalise).

The mean and std live here once; a checkpoint's preprocessor_config.json overrides them."""
from __future__ import annotations

import numpy as np
import torch

from tgems.errors import TGEMError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_size(value, default):
    """HF size field -> ("shortest", s) or ("exact", (h, w))."""
    if value is None:
        return ("shortest", default)
    if isinstance(value, (int, float)):
        return ("shortest", int(value))
    if isinstance(value, dict):
        if value.get("shortest_edge"):
            return ("shortest", int(value["shortest_edge"]))
        if value.get("height") and value.get("width"):
            return ("exact", (int(value["height"]), int(value["width"])))
    raise TGEMError(f"unsupported image size in preprocessor_config.json: {value!r}")


class ImageTransform:
    """PIL images or uint8 arrays -> float32 (N, 3, H, W) on a device, matching the checkpoint's processor."""

    def __init__(self, preprocessor: dict | None, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        pre = preprocessor or {}
        self.resize_mode, self.resize_size = parse_size(pre.get("size"), image_size)
        crop = parse_size(pre.get("crop_size"), image_size)[1]
        self.crop_size = crop if isinstance(crop, tuple) else (crop, crop)
        self.mean = tuple(float(v) for v in pre.get("image_mean") or mean)
        self.std = tuple(float(v) for v in pre.get("image_std") or std)
        self._consts = {}

    def _constants(self, device):
        key = str(device)
        if key not in self._consts:
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._consts[key] = (1.0 / (255.0 * std), mean / std)
        return self._consts[key]

    def resize_target(self, h, w):
        """(h, w) after resizing, or None when no resize is needed (HF's rounding)."""
        if self.resize_mode == "exact":
            return None if (h, w) == self.resize_size else self.resize_size
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

    def one_image(self, img):
        from PIL import Image

        from tgems.images import to_rgb

        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim not in (2, 3):
                raise TGEMError(f"image arrays must be uint8 HxWx3, got {img.dtype} {img.shape}")
            if img.ndim == 3 and img.shape[2] == 3 and self.resize_target(*img.shape[:2]) is None:
                return self.crop(img)
            img = Image.fromarray(img)
        if not isinstance(img, Image.Image):
            raise TGEMError(f"expected a PIL image or a uint8 array, got {type(img).__name__}")
        img = to_rgb(img)
        target = self.resize_target(img.height, img.width)
        if target is not None:
            img = img.resize((target[1], target[0]), resample=Image.BICUBIC)
        return self.crop(np.asarray(img))

    def normalize(self, arr, device):
        """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W) on the device."""
        scale, offset = self._constants(device)
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
        x = x.permute(0, 3, 1, 2).to(torch.float32).contiguous()
        return x.mul_(scale).sub_(offset)

    def __call__(self, images, device):
        from PIL import Image

        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise TGEMError(f"image batches must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
            if len(images) == 0:
                raise TGEMError("no images given")
            if self.resize_target(*images.shape[1:3]) is None:
                return self.normalize(self.crop(images), device)
        elif not isinstance(images, (list, tuple)):
            raise TGEMError(f"expected a list of images or a uint8 array, got {type(images).__name__}")
        if len(images) == 0:
            raise TGEMError("no images given")
        return self.normalize(np.stack([self.one_image(img) for img in images]), device)
