"""Images -> normalised pixels, as Hugging Face image processors do it (resize, centre crop, scale, normalise).

The mean and std live here once; a checkpoint's preprocessor_config.json overrides them."""
from __future__ import annotations

import numpy as np
import torch

from tgems.backbones.geometry import ImageGeometry
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
        # resize and crop as a picklable value: what batch jobs' decoding workers apply
        self.geometry = ImageGeometry(self.resize_mode, self.resize_size, self.crop_size, "bicubic")

    def _constants(self, device):
        key = str(device)
        if key not in self._consts:
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._consts[key] = (1.0 / (255.0 * std), mean / std)
        return self._consts[key]

    def resize_target(self, h, w):
        return self.geometry.resize_target(h, w)

    def crop(self, arr):
        return self.geometry.crop(arr)

    def one_image(self, img):
        return self.geometry.apply(img)

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
