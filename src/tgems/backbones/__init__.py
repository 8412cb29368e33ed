"""Layer-wise access to image-text models. `load_backbone` reads a checkpoint's `model_type` and builds the
family registered for it; a new family is one file and one line in BACKBONES.

torch is imported on first use, not here: decoding workers unpickle `geometry.ImageGeometry` (the resize and
crop a backbone wants) and stay free of it."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tgems.errors import TGEMError
from tgems.options import DTYPES

if TYPE_CHECKING:
    import torch

    from tgems.backbones.base import Backbone

BACKBONES = {
    "clip": "tgems.backbones.hf_clip:CLIPBackbone",
    "siglip": "tgems.backbones.hf_siglip:SiglipBackbone",
}


def backbone_class(model_type: str):
    if model_type not in BACKBONES:
        raise TGEMError(f"unsupported model_type {model_type!r} (supported: {', '.join(BACKBONES)})")
    module, _, cls = BACKBONES[model_type].partition(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(name):
    if name == "Backbone":
        from tgems.backbones.base import Backbone

        return Backbone
    raise AttributeError(f"module 'tgems.backbones' has no attribute '{name}'")


def as_dtype(dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TGEMError(f"dtype must be a floating torch dtype ({', '.join(DTYPES)}), got {dtype!r}")
    return dtype


def as_device(device) -> torch.device:
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TGEMError(f"bad device {device!r}: {str(exc).splitlines()[0]}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TGEMError(f"device {device} asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TGEMError(f"device {device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def load_backbone(name_or_path, device="cpu", dtype="float32") -> Backbone:
    """Load a model: "embedded", a local HF directory, or a hub id (HF cache first).

    The weights are read in float32 and fingerprinted before the cast to `dtype`, so T-GEMs,
    classifiers and indexes saved in one dtype load in any other."""
    import torch

    from tgems.backbones.base import weights_fingerprint
    from tgems.backbones.hub import check_weights, load_parts, resolve

    name = str(name_or_path)
    dtype, device = as_dtype(dtype), as_device(device)
    source, path, config = resolve(name)
    where = path if path is not None else name
    model_type = config.get("model_type")
    if model_type not in BACKBONES:
        raise TGEMError(f"{where} is not a supported checkpoint: model_type is {model_type!r} "
                        f"(supported: {', '.join(BACKBONES)})")
    if path is not None:
        check_weights(path)
    cls = backbone_class(model_type)
    model, tokenizer, pre, path = load_parts(source, path, cls.model_class(), torch.float32)
    fingerprint = weights_fingerprint(model)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    backbone = cls(name, path, model, tokenizer, pre, device, dtype)
    backbone._fingerprint = fingerprint
    return backbone


__all__ = ["Backbone", "BACKBONES", "load_backbone", "backbone_class", "as_dtype", "as_device"]
