"""Layer-wise access to a Hugging Face CLIP model.

The early-exit engine needs the vision tower one block at a time (embed, block l,
readout of layer l) with results identical to the stock HF forward pass, so every
step calls the HF modules themselves. Results are computed under `torch.no_grad`
rather than `inference_mode`: cached features and text embeddings feed trainable
modules later, and inference tensors cannot be saved for backward.
"""
import hashlib
import json
import operator
import os
from pathlib import Path

import numpy as np
import torch

from tgems.backbones import flops as _flops
from tgems.errors import TGEMError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# Keys that change with where or how a config was saved, not with the model.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                        "_attn_implementation", "_attn_implementation_autoset", "architectures"}


def _first_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _offline():
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _embedded_dir():
    import tgems
    return Path(tgems.__file__).parent / "assets" / "embedded"


def _check_clip_dir(path):
    config = path / "config.json"
    if not config.is_file():
        raise TGEMError(f"{path} is not a CLIP checkpoint: no config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise TGEMError(f"{path} is not a CLIP checkpoint: unreadable config.json ({_first_line(exc)})") from exc
    if model_type != "clip":
        raise TGEMError(f"{path} is not a CLIP checkpoint: model_type is {model_type!r}, expected 'clip'")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise TGEMError(f"{path} is not a CLIP checkpoint: no weights ({', '.join(WEIGHT_FILES)})")


def _load_local(path, dtype):
    from transformers import AutoTokenizer, CLIPModel

    _check_clip_dir(path)
    try:
        model = CLIPModel.from_pretrained(path, dtype=dtype)
    except Exception as exc:
        raise TGEMError(f"{path} is not a CLIP checkpoint: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise TGEMError(f"{path}: cannot load the tokenizer: {_first_line(exc)}") from exc
    pre = path / "preprocessor_config.json"
    return model, tokenizer, (json.loads(pre.read_text()) if pre.is_file() else None), path


def _hub_reachable(timeout=3.0):
    """A quick connection test, so an unreachable hub fails at once instead of after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(name, dtype):
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import cached_file

    error = None
    for local_only in ([True] if _offline() or not _hub_reachable() else [True, False]):
        try:
            model = CLIPModel.from_pretrained(name, dtype=dtype, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            config = cached_file(name, "config.json", local_files_only=local_only)
            pre = cached_file(name, "preprocessor_config.json", local_files_only=local_only,
                              _raise_exceptions_for_missing_entries=False)
            pre = json.loads(Path(pre).read_text()) if pre else None
            return model, tokenizer, pre, Path(config).parent if config else None
        except Exception as exc:
            error = exc
    raise TGEMError(f"cannot load model '{name}': not a local directory and not reachable "
                    f"on the Hugging Face hub (offline?)") from error


def _as_dtype(dtype):
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TGEMError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def load_backbone(name_or_path, device="cpu", dtype=torch.float32):
    """Load a CLIP model: "embedded", a local HF directory, or a hub id (HF cache first)."""
    name = str(name_or_path)
    dtype = _as_dtype(dtype)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TGEMError(f"bad device {device!r}: {_first_line(exc)}") from exc
    if name == "embedded":
        path = _embedded_dir()
        if not (path / "config.json").is_file():
            raise TGEMError("the embedded default model is not shipped in this install "
                            "(run `tgems pretrain --preset embedded`)")
        loaded = _load_local(path, dtype)
    elif Path(name).expanduser().is_dir():
        loaded = _load_local(Path(name).expanduser(), dtype)
    else:
        loaded = _load_hub(name, dtype)
    model, tokenizer, pre, path = loaded
    model.to(device).eval().requires_grad_(False)
    return CLIPBackbone(name, path, model, tokenizer, pre, device, dtype)


def _parse_size(value, default):
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


def _tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPBackbone:
    """A frozen CLIP model with its vision tower exposed block by block."""

    def __init__(self, name, path, model, tokenizer, preprocessor, device, dtype):
        self.name, self.path, self.model, self.tokenizer = name, path, model, tokenizer
        self.device, self.dtype = torch.device(device), dtype
        vc = model.config.vision_config
        self.num_layers = vc.num_hidden_layers
        self.width = vc.hidden_size
        self.mlp_dim = vc.intermediate_size
        self.embed_dim = model.config.projection_dim
        self.image_size = vc.image_size
        self.patch_size = vc.patch_size
        self.num_channels = getattr(vc, "num_channels", 3)
        self.num_tokens = (self.image_size // self.patch_size) ** 2 + 1
        self.text_max_length = model.config.text_config.max_position_embeddings
        pre = preprocessor or {}
        self.resize_mode, self.resize_size = _parse_size(pre.get("size"), self.image_size)
        crop = _parse_size(pre.get("crop_size"), self.image_size)[1]
        self.crop_size = crop if isinstance(crop, tuple) else (crop, crop)
        self.image_mean = tuple(float(v) for v in pre.get("image_mean") or OPENAI_CLIP_MEAN)
        self.image_std = tuple(float(v) for v in pre.get("image_std") or OPENAI_CLIP_STD)
        std = torch.tensor(self.image_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.image_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale, self._offset = 1.0 / (255.0 * std), mean / std
        self._fingerprint = None

    def __repr__(self):
        return (f"CLIPBackbone({self.name!r}, L={self.num_layers}, width={self.width}, "
                f"image_size={self.image_size}, patch={self.patch_size}, D={self.embed_dim})")

    # ---- images -> pixels

    def _resize_target(self, h, w):
        """(h, w) after resizing, or None when no resize is needed (HF's rounding)."""
        if self.resize_mode == "exact":
            return None if (h, w) == self.resize_size else self.resize_size
        s = self.resize_size
        if min(h, w) == s:
            return None
        if w <= h:
            return int(s * h / w), s
        return s, int(s * w / h)

    def _crop(self, arr):
        """Center crop on the last-but-one two axes (..., H, W, 3), as HF's center_crop."""
        ch, cw = self.crop_size
        h, w = arr.shape[-3], arr.shape[-2]
        if h < ch or w < cw:
            raise TGEMError(f"image of {h}x{w} is smaller than the crop size {ch}x{cw}")
        top, left = (h - ch) // 2, (w - cw) // 2
        return arr[..., top:top + ch, left:left + cw, :]

    def _one_image(self, img):
        from PIL import Image

        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim not in (2, 3):
                raise TGEMError(f"image arrays must be uint8 HxWx3, got {img.dtype} {img.shape}")
            if img.ndim == 3 and img.shape[2] == 3 and self._resize_target(*img.shape[:2]) is None:
                return self._crop(img)
            img = Image.fromarray(img)
        if not isinstance(img, Image.Image):
            raise TGEMError(f"expected a PIL image or a uint8 array, got {type(img).__name__}")
        img = img.convert("RGB")
        target = self._resize_target(img.height, img.width)
        if target is not None:
            img = img.resize((target[1], target[0]), resample=Image.BICUBIC)
        return self._crop(np.asarray(img))

    def _normalize(self, arr):
        """uint8 (N, H, W, 3) -> normalized float32 (N, 3, H, W) on the device."""
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
        x = x.permute(0, 3, 1, 2).to(torch.float32).contiguous()
        return x.mul_(self._scale).sub_(self._offset)

    def preprocess(self, images):
        """PIL images or uint8 arrays -> normalized float32 pixels (N, 3, S, S) on the device."""
        from PIL import Image

        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise TGEMError(f"image batches must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
            if len(images) == 0:
                raise TGEMError("no images given")
            if self._resize_target(*images.shape[1:3]) is None:
                return self._normalize(self._crop(images))
        elif not isinstance(images, (list, tuple)):
            raise TGEMError(f"expected a list of images or a uint8 array, got {type(images).__name__}")
        if len(images) == 0:
            raise TGEMError("no images given")
        return self._normalize(np.stack([self._one_image(img) for img in images]))

    def check_pixels(self, pixels):
        """Refuse tensors the vision tower cannot take, with a clear message."""
        if not isinstance(pixels, torch.Tensor):
            raise TGEMError(f"pixels must be a torch tensor, got {type(pixels).__name__} (use preprocess)")
        if pixels.ndim != 4:
            raise TGEMError(f"pixels must be 4-D (B, 3, H, W), got shape {tuple(pixels.shape)}")
        if pixels.shape[1] != self.num_channels:
            raise TGEMError(f"pixels must have {self.num_channels} channels, got {pixels.shape[1]}")
        if pixels.shape[2] != self.image_size or pixels.shape[3] != self.image_size:
            raise TGEMError(f"pixels must be {self.image_size}x{self.image_size}, "
                            f"got {pixels.shape[2]}x{pixels.shape[3]}")
        if not pixels.is_floating_point():
            raise TGEMError(f"pixels must be a float tensor, got {pixels.dtype} (use preprocess)")

    # ---- the vision tower, step by step

    def _layer_index(self, l, what="layer"):
        try:
            if isinstance(l, bool):
                raise TypeError
            l = operator.index(l)
        except TypeError:
            raise TGEMError(f"{what} must be an integer in 1..{self.num_layers}, got {l!r}") from None
        if not 1 <= l <= self.num_layers:
            raise TGEMError(f"{what} must be in 1..{self.num_layers}, got {l}")
        return l

    def embed(self, pixels):
        """Patch + position embeddings and pre_layrnorm: h_0 (B, T, W)."""
        self.check_pixels(pixels)
        vm = self.model.vision_model
        return vm.pre_layrnorm(vm.embeddings(pixels.to(self.device, self.dtype)))

    def block(self, l, h, return_rates=False):
        """h_l from h_{l-1} through vision block l (1-based); optionally MLP activation rates (B, M)."""
        layer = self.model.vision_model.encoder.layers[self._layer_index(l) - 1]
        if not return_rates:
            return _tensor(layer(h, None))
        seen = {}

        def hook(module, inputs, output):
            seen["rates"] = (output > 0).to(torch.float32).mean(dim=1)

        handle = layer.mlp.fc1.register_forward_hook(hook)
        try:
            out = _tensor(layer(h, None))
        finally:
            handle.remove()
        return out, seen["rates"]

    def readout(self, h, l=None):
        """z_l = visual_projection(post_layernorm(class token)), not normalized. `l` is for callers' bookkeeping."""
        return self.model.visual_projection(self.model.vision_model.post_layernorm(h[:, 0]))

    @torch.no_grad()
    def encode_image(self, pixels, exit_layer=None):
        """Readout z_k (B, D) after block k; None or L is exactly get_image_features."""
        k = self.num_layers if exit_layer is None else self._layer_index(exit_layer, "exit_layer")
        self.check_pixels(pixels)
        if k == self.num_layers:
            return _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        h = self.embed(pixels)
        for l in range(1, k + 1):
            h = self.block(l, h)
        return self.readout(h, k)

    @torch.no_grad()
    def hidden_states(self, pixels, layers=None, rates=False, batch_size=None):
        """Readouts of several layers in one pass: {"layers", "z": (B, n, D)[, "rates": (B, n, M)]}.

        Used to cache per-layer features once for T-GEM training.
        """
        layers = sorted({self._layer_index(l) for l in layers}) if layers is not None \
            else list(range(1, self.num_layers + 1))
        if not layers:
            raise TGEMError("hidden_states needs at least one layer")
        self.check_pixels(pixels)
        wanted, zs, rs = set(layers), [], []
        step = batch_size or len(pixels)
        for start in range(0, len(pixels), step):
            h = self.embed(pixels[start:start + step])
            z_chunk, r_chunk = [], []
            for l in range(1, layers[-1] + 1):
                if rates and l in wanted:
                    h, r = self.block(l, h, return_rates=True)
                    r_chunk.append(r)
                else:
                    h = self.block(l, h)
                if l in wanted:
                    z_chunk.append(self.readout(h, l))
            zs.append(torch.stack(z_chunk, dim=1))
            if rates:
                rs.append(torch.stack(r_chunk, dim=1))
        out = {"layers": layers, "z": torch.cat(zs)}
        if rates:
            out["rates"] = torch.cat(rs)
        return out

    # ---- text

    @torch.no_grad()
    def encode_text(self, texts, batch_size=256):
        """Text embeddings (C, D), exactly get_text_features on the padded, truncated tokens."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TGEMError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise TGEMError("no texts given")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TGEMError(f"text {i} is not a string: {type(t).__name__}")
            if not t.strip():
                raise TGEMError(f"text {i} is empty")
        out = []
        for start in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                 max_length=self.text_max_length, return_tensors="pt")
            out.append(_features(self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device))))
        return torch.cat(out)

    # ---- compute and identity

    def flops_embed(self):
        return _flops.flops_embed(self.num_tokens, self.width, self.patch_size, self.num_channels)

    def flops_block(self):
        return _flops.flops_block(self.num_tokens, self.width, self.mlp_dim)

    def flops_readout(self):
        return _flops.flops_readout(self.width, self.embed_dim)

    def flops_full(self):
        return _flops.flops_full(self.num_tokens, self.width, self.mlp_dim, self.embed_dim,
                                 self.patch_size, self.num_layers, self.num_channels)

    def fingerprint(self):
        """Short sha256 of the config and weights, to refuse T-GEMs made for another backbone.

        Weights are hashed as float32, so the same checkpoint loaded in another float dtype
        that represents it exactly gives the same fingerprint.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            config = _strip(self.model.config.to_dict())
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            state = self.model.state_dict()
            for key in sorted(state):
                digest.update(key.encode())
                tensor = state[key].detach().to("cpu")
                if tensor.is_floating_point():
                    tensor = tensor.to(torch.float32)
                digest.update(tensor.contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE_CONFIG_KEYS}
    return obj
