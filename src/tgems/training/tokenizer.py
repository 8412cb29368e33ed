"""Word-level CLIP tokenizer for small vocabularies (the embedded model), built with `tokenizers`."""
from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>"
SPECIALS = (PAD, UNK, BOS, EOS)


def build_word_tokenizer(words, max_length: int = 24) -> PreTrainedTokenizerFast:
    """Ids 0..3 are the specials (pad, unk, bos, eos); eos != 2 so HF CLIP pools at the first eos."""
    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for w in sorted(set(w.lower() for w in words) | set(",.!?;:'-")):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=max_length)
