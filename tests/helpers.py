"""Tiny random-init CLIP checkpoints on disk, so tests run offline in seconds.

`make_tiny_clip(dir, ...)` writes a directory that `tgems.load_backbone` (and
`CLIPModel.from_pretrained` / `AutoTokenizer.from_pretrained`) load like any HF
CLIP checkpoint: weights (safetensors), a word-level tokenizer and a
`preprocessor_config.json`.
"""
from pathlib import Path

import torch

WORDS = (
    "a an the of in on with and photo picture image small large big tiny blurry bright dark "
    "red green blue yellow orange purple white black gray pink brown "
    "circle square triangle star ring cross stripe stripes dot dots line lines shape shapes "
    "background object scene sky sea grass sand snow night day "
    "airplane automobile car bird cat deer dog frog horse ship truck "
    "apple fish flower tree house road person face boat "
    "one two three four five left right top bottom center"
).split()
SPECIALS = ["[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>"]


def make_tokenizer(max_length=16, words=WORDS):
    """A word-level fast tokenizer (lowercase, whitespace split, bos/eos added) that AutoTokenizer reloads offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="[PAD]", unk_token="[UNK]", model_max_length=max_length,
    )


def make_tiny_clip(path, *, layers=4, width=32, heads=2, mlp=None, patch=8, image_size=32,
                   projection=16, text_layers=2, text_width=32, text_heads=2, max_length=16,
                   resize=None, seed=0, words=WORDS):
    """Build, save and return the directory of a random-init CLIPModel.

    `resize` sets the preprocessor's shortest-edge size (default: image_size, i.e. no resize
    for images already at the model size); the crop is always image_size.
    """
    from transformers import CLIPConfig, CLIPModel
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(max_length, words)
    text = dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=text_heads,
                max_position_embeddings=max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=width, intermediate_size=mlp or 4 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, patch_size=patch, image_size=image_size)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": resize or image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    """tgems.cli.main(argv) -> (exit code, stdout, stderr); argparse exits are returned as codes too."""
    from tgems.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: --version, usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err):
    """A failed command: non-zero exit, no traceback, exactly one `tgems: error:` line on stderr."""
    assert rc not in (0, None), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("tgems: error:"), lines[0]
    return lines[0]
