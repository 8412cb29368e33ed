"""Tiny random-init SigLIP checkpoints on disk, so SigLIP tests run offline in seconds.

`make_tiny_siglip(dir, ...)` writes a directory that `tgems.load_backbone` (and
`SiglipModel.from_pretrained` / `AutoTokenizer.from_pretrained`) load like any HF SigLIP
checkpoint: weights (safetensors), the word-level tokenizer of helpers.py and a
SiglipImageProcessor `preprocessor_config.json`.
"""
import math
from pathlib import Path

import torch

from helpers import WORDS, make_tokenizer


def make_tiny_siglip(path, *, layers=3, width=32, heads=2, mlp=None, patch=8, image_size=32,
                     text_layers=2, text_width=24, text_heads=2, max_length=16, seed=0, words=WORDS,
                     logit_scale=10.0, logit_bias=-2.0, preprocessor=True, image_mean=None, image_std=None):
    """Build, save and return the directory of a random-init SiglipModel.

    The text head projects to the vision width (SigLIP has no visual projection). logit_scale and
    logit_bias are set (random init zeroes them) so that scoring tests see both. preprocessor=False
    leaves out preprocessor_config.json; image_mean/image_std override SigLIP's 0.5 in it.
    """
    from transformers import SiglipConfig, SiglipModel
    try:
        from transformers.models.siglip.image_processing_pil_siglip import \
            SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(max_length, words)
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, projection_size=width,
                max_position_embeddings=max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=width, intermediate_size=mlp or 4 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, patch_size=patch, image_size=image_size)
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
        model.logit_bias.fill_(logit_bias)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if preprocessor:
        extra = {k: v for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v is not None}
        SiglipImageProcessor(size={"height": image_size, "width": image_size}, **extra).save_pretrained(path)
    return path
