"""The backbone contract: everything the engine, profiles, fitting and evaluation may use of an image-text
model, and nothing else. A family (hf_clip.py, hf_siglip.py) implements the abstract steps; the shared
parts (preprocessing, input checks, per-layer passes, text batching, FLOPs, fingerprint) live here.

Results are computed under `torch.no_grad` rather than `inference_mode`: cached features and text
embeddings feed trainable modules later, and inference tensors cannot be saved for backward.
"""
from __future__ import annotations

import hashlib
import json
import operator
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from tgems.backbones import flops as _flops
from tgems.backbones.transforms import ImageTransform
from tgems.errors import TGEMError

# Keys that change with where or how a config was saved, not with the model.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                        "_attn_implementation", "_attn_implementation_autoset", "architectures"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE_CONFIG_KEYS}
    return obj


class Backbone(ABC):
    """A frozen dual encoder whose vision tower runs one block at a time.

    Dimensions: num_layers (L), width, mlp_dim, embed_dim (joint space D), image_size, patch_size,
    num_channels, num_tokens. Placement: device, dtype. Identity: name, path, fingerprint().
    Steps: embed(pixels) -> h_0; block(l, h) -> h_l; readout(h, l) -> z_l in the joint space.
    Scoring: zero_shot_logits(image_embeds, text_embeds) and score_activation ("softmax" or "sigmoid").
    """

    family: str = ""
    score_activation: str = "softmax"

    def __init__(self, name, path, model, tokenizer, preprocessor, device, dtype, *, num_layers, width, mlp_dim,
                 embed_dim, image_size, patch_size, num_channels, num_tokens, text_max_length, mean, std):
        self.name, self.path, self.model, self.tokenizer = name, path, model, tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.num_layers, self.width, self.mlp_dim, self.embed_dim = num_layers, width, mlp_dim, embed_dim
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.num_tokens, self.text_max_length = num_tokens, text_max_length
        self.transform = ImageTransform(preprocessor, image_size, mean, std)
        self._fingerprint = None

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, L={self.num_layers}, width={self.width}, "
                f"image_size={self.image_size}, patch={self.patch_size}, D={self.embed_dim}, "
                f"device={self.device}, dtype={self.dtype})")

    # ---- what a family provides

    @abstractmethod
    def vision_layers(self):
        """The ModuleList of vision blocks (each with `.mlp.fc1`, for activation rates)."""

    @abstractmethod
    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """h_0 from pixels already on the device and in the dtype."""

    @abstractmethod
    def readout(self, h: torch.Tensor, l: int | None = None) -> torch.Tensor:
        """z_l (B, D) from the tokens h_l: the family's pooling and projection, not normalised."""

    @abstractmethod
    def patch_readout(self, h: torch.Tensor, l: int | None = None) -> torch.Tensor:
        """m_l (B, D) from the tokens h_l: the mean of the patch tokens through the same pooling and
        projection; the distilled readouts read it beside z_l (an early class token is still immature)."""

    def flops_patch_readout(self) -> float:
        return float(_flops.flops_patch_readout(self.num_tokens, self.width, self.embed_dim))

    @abstractmethod
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The stock full forward (get_image_features)."""

    @abstractmethod
    def _text_features(self, texts: list[str]) -> torch.Tensor:
        """The stock text forward (get_text_features) of one batch of texts."""

    @abstractmethod
    def logit_scale(self) -> float:
        """The model's zero-shot temperature (exp of its learned log scale)."""

    def logit_bias(self) -> float:
        return 0.0

    def flops_readout(self) -> float:
        return _flops.flops_readout(self.width, self.embed_dim)

    # ---- images -> pixels

    def preprocess(self, images) -> torch.Tensor:
        """PIL images or uint8 arrays -> normalised float32 pixels (N, 3, S, S) on the device."""
        return self.transform(images, self.device)

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

    def layer_index(self, l, what="layer") -> int:
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
        """h_0 (B, T, W): the input to block 1."""
        self.check_pixels(pixels)
        return self._embed(pixels.to(self.device, self.dtype))

    def block(self, l, h, return_rates=False):
        """h_l from h_{l-1} through vision block l (1-based); optionally MLP activation rates (B, M): the
        fraction of tokens on which each neuron's pre-activation is positive."""
        layer = self.vision_layers()[self.layer_index(l) - 1]
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

    @torch.no_grad()
    def encode_image(self, pixels, exit_layer=None):
        """Readout z_k (B, D) after block k; None or L is exactly the stock image features."""
        k = self.num_layers if exit_layer is None else self.layer_index(exit_layer, "exit_layer")
        self.check_pixels(pixels)
        if k == self.num_layers:
            return self._image_features(pixels.to(self.device, self.dtype))
        h = self.embed(pixels)
        for l in range(1, k + 1):
            h = self.block(l, h)
        return self.readout(h, k)

    @torch.no_grad()
    def hidden_states(self, pixels, layers=None, rates=False, batch_size=None, patch=False):
        """Readouts of several layers in one pass: {"layers", "z": (B, n, D)[, "rates": (B, n, M)]
        [, "patch": (B, n, D), the mean-patch readouts m_l]}."""
        layers = sorted({self.layer_index(l) for l in layers}) if layers is not None \
            else list(range(1, self.num_layers + 1))
        if not layers:
            raise TGEMError("hidden_states needs at least one layer")
        self.check_pixels(pixels)
        wanted, zs, rs, ms = set(layers), [], [], []
        step = batch_size or len(pixels)
        for start in range(0, len(pixels), step):
            h = self.embed(pixels[start:start + step])
            z_chunk, r_chunk, m_chunk = [], [], []
            for l in range(1, layers[-1] + 1):
                if rates and l in wanted:
                    h, r = self.block(l, h, return_rates=True)
                    r_chunk.append(r)
                else:
                    h = self.block(l, h)
                if l in wanted:
                    z_chunk.append(self.readout(h, l))
                    if patch:
                        m_chunk.append(self.patch_readout(h, l))
            zs.append(torch.stack(z_chunk, dim=1))
            if patch:
                ms.append(torch.stack(m_chunk, dim=1))
            if rates:
                rs.append(torch.stack(r_chunk, dim=1))
        out = {"layers": layers, "z": torch.cat(zs)}
        if rates:
            out["rates"] = torch.cat(rs)
        if patch:
            out["patch"] = torch.cat(ms)
        return out

    # ---- text

    def token_ids(self, texts) -> list[list[int]]:
        """The token ids each text becomes (truncated as encode_text truncates them)."""
        return [self.tokenizer(t, truncation=True, max_length=self.text_max_length)["input_ids"] for t in texts]

    @torch.no_grad()
    def encode_text(self, texts, batch_size=256):
        """Text embeddings (C, D), exactly the stock text features."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TGEMError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise TGEMError("no texts given")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TGEMError(f"text {i} is not a string: {type(t).__name__}")
            if not t.strip():
                raise TGEMError(f"text {i} is empty")
        return torch.cat([self._text_features(list(texts[s:s + batch_size]))
                          for s in range(0, len(texts), batch_size)])

    # ---- scoring

    def zero_shot_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(N, C) logits: scale * cosine (+ bias), in float32."""
        img = F.normalize(image_embeds.float(), dim=-1)
        txt = F.normalize(text_embeds.float(), dim=-1).to(img.device)
        return self.logit_scale() * img @ txt.t() + self.logit_bias()

    # ---- compute and identity

    def flops_embed(self):
        return _flops.flops_embed(self.num_tokens, self.width, self.patch_size, self.num_channels,
                                  (self.image_size // self.patch_size) ** 2)

    def flops_block(self):
        return _flops.flops_block(self.num_tokens, self.width, self.mlp_dim)

    def flops_full(self):
        return self.flops_embed() + self.num_layers * self.flops_block() + self.flops_readout()

    def fingerprint(self) -> str:
        """Short sha256 of the config and the float32 weights, to refuse T-GEMs made for another backbone.

        load_backbone computes it before the cast to the run dtype, so a checkpoint has one identity
        in float32, float16 and bfloat16 alike; a backbone built by hand hashes its model as it is."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint


def weights_fingerprint(model) -> str:
    """The fingerprint of a model's config and weights, the floating ones hashed as float32."""
    digest = hashlib.sha256()
    config = _strip(model.config.to_dict())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    state = model.state_dict()
    for key in sorted(state):
        digest.update(key.encode())
        tensor = state[key].detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def features(out):
    """get_*_features returns a tensor or (transformers 5) an output with pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
