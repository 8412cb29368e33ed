"""Hugging Face SiglipModel: no class token, so the readout of layer l is all its tokens through
post_layernorm and the attention-pooling head (what get_image_features does after the last block);
zero-shot scores are a sigmoid over logit_scale * cosine + logit_bias."""
from __future__ import annotations

from tgems.backbones import flops as _flops
from tgems.backbones.base import Backbone, features
from tgems.errors import TGEMError

# SiglipImageProcessor's defaults (IMAGENET_STANDARD_*): used when the checkpoint has no preprocessor config.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _square(value, what):
    """SigLIP configs may give sizes as (h, w); the engine's pixels are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise TGEMError(f"SigLIP {what} must be square, got {tuple(value)}")
        value = value[0]
    return int(value)


class SiglipBackbone(Backbone):
    family = "siglip"
    score_activation = "sigmoid"

    @classmethod
    def model_class(cls):
        from transformers import SiglipModel

        return SiglipModel

    def __init__(self, name, path, model, tokenizer, preprocessor, device, dtype):
        vc, tc = model.config.vision_config, model.config.text_config
        if not getattr(vc, "vision_use_head", True):
            # transformers' SiglipVisionModel then returns pooler_output=None: there are no image features.
            raise TGEMError(f"{name}: SigLIP vision tower without its pooling head (vision_use_head=False) "
                            f"has no image features to read out")
        projection = getattr(tc, "projection_size", None) or tc.hidden_size
        if projection != vc.hidden_size:
            raise TGEMError(f"{name}: SigLIP text projection ({projection}) does not match the image "
                            f"embedding width ({vc.hidden_size})")
        if tokenizer.pad_token is None:
            raise TGEMError(f"{name}: the SigLIP tokenizer has no pad token (texts are padded to max length)")
        image_size, patch = _square(vc.image_size, "image_size"), _square(vc.patch_size, "patch_size")
        # SiglipImageProcessor resizes straight to the model size (no centre crop) unless its config says otherwise.
        preprocessor = {"size": {"height": image_size, "width": image_size}, **(preprocessor or {})}
        super().__init__(name, path, model, tokenizer, preprocessor, device, dtype,
                         num_layers=vc.num_hidden_layers, width=vc.hidden_size, mlp_dim=vc.intermediate_size,
                         embed_dim=vc.hidden_size, image_size=image_size, patch_size=patch,
                         num_channels=getattr(vc, "num_channels", 3),
                         num_tokens=(image_size // patch) ** 2,
                         text_max_length=tc.max_position_embeddings,
                         mean=SIGLIP_MEAN, std=SIGLIP_STD)

    def vision_layers(self):
        return self.model.vision_model.encoder.layers

    def _embed(self, pixels):
        return self.model.vision_model.embeddings(pixels)

    def readout(self, h, l=None):
        vm = self.model.vision_model
        return vm.head(vm.post_layernorm(h))

    def patch_readout(self, h, l=None):
        return self.model.vision_model.post_layernorm(h.mean(1))  # no class token: the mean of all tokens

    def flops_patch_readout(self) -> float:
        return float(self.num_tokens * self.width)  # no projection

    def _image_features(self, pixels):
        return features(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts):
        # SigLIP pools the last position, so texts are padded to the length it was trained with.
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_max_length,
                             return_tensors="pt")
        inputs = {k: tok[k].to(self.device) for k in TEXT_INPUTS if k in tok}
        return features(self.model.get_text_features(**inputs))

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def logit_bias(self) -> float:
        return float(self.model.logit_bias.item())

    def flops_readout(self):
        return _flops.flops_attention_pool(self.num_tokens, self.width, self.mlp_dim)
