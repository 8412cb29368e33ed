"""Zero-shot top-1 of a CLIPModel in training on scenes:testall, seen and held-out classes apart.

Used for pretraining learning curves (`tgems pretrain --eval-every`, `benchmarks/pretrain_sweep.py`);
it goes through the same backbone code as inference, so the figures match `zero_shot_layers`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tgems.backbones.hf_clip import CLIPBackbone
from tgems.profiles import class_embeddings


class ZeroShot:
    """Callable on (model, tokenizer): {"seen": top-1, "heldout": top-1} over the full test set."""

    def __init__(self, device: str = "cpu", data: str = "scenes:testall"):
        from tgems.data import load_dataset, scenes

        self.data = load_dataset(data)
        self.templates, self.device = scenes.PROMPT_TEMPLATES, device
        self.labels = torch.as_tensor(self.data.labels)
        self.split = self.data.sample_split()

    def __call__(self, model, tokenizer) -> dict:
        bb = CLIPBackbone("pretraining", None, model, tokenizer, None, self.device, torch.float32)
        text = class_embeddings(bb, self.data.classes, self.templates)
        img = torch.cat([bb.encode_image(bb.preprocess(self.data.images[i:i + 512]))
                         for i in range(0, len(self.data), 512)])
        preds = (F.normalize(img, dim=-1) @ text.t()).argmax(1).cpu()
        hit = (preds == self.labels).numpy()
        return {s: round(float(hit[self.split == s].mean()), 4) for s in ("seen", "heldout")}
