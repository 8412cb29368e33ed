"""Hugging Face CLIPModel: the readout of layer l is the class token through post_layernorm and the visual
projection ("logit lens"); zero-shot scores are a softmax over logit_scale * cosine."""
from __future__ import annotations

from tgems.backbones.base import Backbone, features
from tgems.backbones.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


class CLIPBackbone(Backbone):
    family = "clip"
    score_activation = "softmax"

    @classmethod
    def model_class(cls):
        from transformers import CLIPModel

        return CLIPModel

    def __init__(self, name, path, model, tokenizer, preprocessor, device, dtype):
        vc = model.config.vision_config
        super().__init__(name, path, model, tokenizer, preprocessor, device, dtype,
                         num_layers=vc.num_hidden_layers, width=vc.hidden_size, mlp_dim=vc.intermediate_size,
                         embed_dim=model.config.projection_dim, image_size=vc.image_size,
                         patch_size=vc.patch_size, num_channels=getattr(vc, "num_channels", 3),
                         num_tokens=(vc.image_size // vc.patch_size) ** 2 + 1,
                         text_max_length=model.config.text_config.max_position_embeddings,
                         mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)

    def vision_layers(self):
        return self.model.vision_model.encoder.layers

    def _embed(self, pixels):
        vm = self.model.vision_model
        return vm.pre_layrnorm(vm.embeddings(pixels))

    def readout(self, h, l=None):
        return self.model.visual_projection(self.model.vision_model.post_layernorm(h[:, 0]))

    def patch_readout(self, h, l=None):
        return self.model.visual_projection(self.model.vision_model.post_layernorm(h[:, 1:].mean(1)))

    def _image_features(self, pixels):
        return features(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts):
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.text_max_length,
                             return_tensors="pt")
        return features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                     attention_mask=tok["attention_mask"].to(self.device)))

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100).item())
