"""Procedural scenes (tgems.data.scenes) and the word-level tokenizer (tgems.training.tokenizer)."""
import numpy as np
import pytest

from tgems.data import scenes
from tgems.errors import TGEMError
from tgems.training.tokenizer import build_word_tokenizer

COLOURS = set(scenes.COLOUR_NAMES)
SHAPES = set(scenes.SHAPES)
WHERE_WORDS = {"top", "middle", "bottom", "left", "center", "right"}


def _same(a, b):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.difficulty, b.difficulty)
    assert a.captions == b.captions


def _class_words(label):
    art, colour, shape = scenes.CLASSES[label].split()
    assert art == "a"
    return colour, shape


@pytest.fixture(scope="module")
def train300():
    return scenes.generate("train", 0, 300, seed=0)


# ------------------------------------------------------------------ determinism / slicing

@pytest.mark.parametrize("split", ["train", "heldout"])
def test_generate_is_deterministic(split):
    _same(scenes.generate(split, 5, 24, seed=3), scenes.generate(split, 5, 24, seed=3))


def test_seed_changes_the_samples():
    a, b = scenes.generate("train", 0, 24, seed=0), scenes.generate("train", 0, 24, seed=1)
    assert not np.array_equal(a.images, b.images)
    assert a.captions != b.captions
    # each image differs, not just one of them
    assert all(not np.array_equal(x, y) for x, y in zip(a.images, b.images))


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_slices_agree_with_a_bigger_generation(split):
    big = scenes.generate(split, 0, 60, seed=2)
    _same(scenes.generate(split, 17, 20, seed=2), big.subset(np.arange(17, 37)))
    for i in (0, 13, 59):
        _same(scenes.generate(split, i, 1, seed=2), big.subset([i]))


def test_splits_are_different_streams():
    a, b = scenes.generate("calib", 0, 16), scenes.generate("test", 0, 16)
    assert not np.array_equal(a.images, b.images)


def test_dataset_fields(train300):
    d = train300
    assert d.images.dtype == np.uint8 and d.images.shape == (300, 32, 32, 3)
    assert d.labels.dtype == np.int64 and d.labels.shape == (300,)
    assert len(d.captions) == 300 and all(isinstance(c, str) and c for c in d.captions)
    assert d.classes == list(scenes.CLASSES)
    assert d.heldout.dtype == bool and np.array_equal(d.heldout, scenes.HELDOUT)
    assert d.meta["split"] == "train" and d.meta["seed"] == 0
    # images are not blank and not all alike
    assert d.images.std() > 10
    assert len({img.tobytes() for img in d.images}) == 300


def test_difficulty_range(train300):
    diff = train300.difficulty
    assert diff.dtype == np.float32
    assert np.all((diff >= 0) & (diff <= 1))
    assert diff.min() < 0.25 and diff.max() > 0.6


def test_unknown_split_raises():
    with pytest.raises(TGEMError, match="unknown scenes split"):
        scenes.generate("validation", 0, 4)
    with pytest.raises(TGEMError, match="unknown scenes split"):
        scenes.load_split("nope")


# ------------------------------------------------------------------ classes and held-out split

def test_class_inventory():
    assert len(scenes.CLASSES) >= 64 and len(set(scenes.CLASSES)) == len(scenes.CLASSES)
    assert scenes.HELDOUT.dtype == bool and scenes.HELDOUT.shape == (len(scenes.CLASSES),)
    assert scenes.HELDOUT.sum() >= 12
    np.testing.assert_array_equal(np.sort(np.concatenate([scenes.SEEN_CLASSES, scenes.HELDOUT_CLASSES])),
                                  np.arange(len(scenes.CLASSES)))
    assert not scenes.HELDOUT[scenes.SEEN_CLASSES].any() and scenes.HELDOUT[scenes.HELDOUT_CLASSES].all()
    for c in scenes.CLASSES:
        _, colour, shape = c.split()
        assert colour in COLOURS and shape in SHAPES
    seen = [_class_words(k) for k in scenes.SEEN_CLASSES]
    assert {c for c, _ in seen} == COLOURS
    assert {s for _, s in seen} == SHAPES
    # every held-out class is a new combination of a seen colour and a seen shape
    for k in scenes.HELDOUT_CLASSES:
        colour, shape = _class_words(k)
        assert colour in {c for c, _ in seen} and shape in {s for _, s in seen}
    assert {"train", "calib", "test", "heldout", "testall"} <= set(scenes.SPLITS)


def test_heldout_never_in_seen_splits():
    train = scenes.generate("train", 0, 3000, seed=0)
    assert not scenes.HELDOUT[train.labels].any()
    # labels cycle over the seen classes: balanced and complete
    counts = np.bincount(train.labels[: 52 * 10], minlength=len(scenes.CLASSES))
    assert set(counts[scenes.SEEN_CLASSES]) == {10}
    for split in ("calib", "test"):
        d = scenes.generate(split, 0, 300, seed=1)
        assert not scenes.HELDOUT[d.labels].any()
        assert set(np.unique(d.labels)) == set(scenes.SEEN_CLASSES)


def test_heldout_split_only_has_heldout_classes():
    d = scenes.generate("heldout", 0, 240, seed=0)
    assert scenes.HELDOUT[d.labels].all()
    assert set(np.unique(d.labels)) == set(scenes.HELDOUT_CLASSES)
    assert np.array_equal(d.sample_split(), np.array(["heldout"] * len(d), dtype=object))


def test_testall_is_test_then_heldout():
    # the default-size split (>= 2000 images) generates fine
    d = scenes.load_split("testall")
    assert len(d) >= 2000 and d.name == "scenes:testall" and d.meta["split"] == "testall"
    t_head, h_head = scenes.generate("test", 0, 8), scenes.generate("heldout", 0, 8)
    n_heldout = int(scenes.HELDOUT[d.labels].sum())
    n_seen = len(d) - n_heldout
    assert n_seen >= 2000 and n_heldout > 0
    assert not scenes.HELDOUT[d.labels[:n_seen]].any() and scenes.HELDOUT[d.labels[n_seen:]].all()
    _same(d.subset(np.arange(8)), t_head)
    _same(d.subset(np.arange(n_seen, n_seen + 8)), h_head)
    _same(d.subset(np.arange(n_seen - 3, n_seen)), scenes.generate("test", n_seen - 3, 3))
    _same(d.subset(np.arange(len(d) - 3, len(d))), scenes.generate("heldout", n_heldout - 3, 3))


def test_testall_with_n():
    d = scenes.load_split("testall", n=100, seed=4)
    assert len(d) == 100
    n_seen = int((~scenes.HELDOUT[d.labels]).sum())
    assert 0 < n_seen < 100
    _same(d.subset(np.arange(n_seen)), scenes.generate("test", 0, n_seen, seed=4))
    _same(d.subset(np.arange(n_seen, 100)), scenes.generate("heldout", 0, 100 - n_seen, seed=4))


def test_load_split_sizes():
    assert len(scenes.load_split("calib", n=7)) == 7
    _same(scenes.load_split("train", n=5, seed=2), scenes.generate("train", 0, 5, seed=2))


# ------------------------------------------------------------------ captions and vocabulary

def test_captions_name_the_label(train300):
    for caption, label in zip(train300.captions, train300.labels):
        colour, shape = _class_words(label)
        words = caption.split()
        assert colour in words and shape in words, (caption, scenes.CLASSES[label])
        # no other colour or shape word (distractors are never named)
        assert set(words) & COLOURS == {colour}, caption
        assert set(words) & SHAPES == {shape}, caption


def test_captions_vary(train300):
    words = {w for c in train300.captions for w in c.split()}
    assert set(scenes.SIZE_WORDS) <= words
    assert WHERE_WORDS - {"middle"} <= words
    assert len(set(train300.captions)) > 150
    # several templates are used
    assert sum(c.startswith("a picture of") for c in train300.captions) > 0
    assert sum("there is" in c for c in train300.captions) > 0


def _all_texts(captions):
    texts = list(captions) + list(scenes.CLASSES)
    texts += [t.format(c) for t in scenes.PROMPT_TEMPLATES for c in scenes.CLASSES]
    return texts


def test_every_word_is_in_the_vocabulary(train300):
    vocab = set(scenes.vocabulary())
    assert vocab == set(scenes.vocabulary())  # deterministic
    missing = {w for t in _all_texts(train300.captions) for w in t.split()} - vocab
    assert not missing
    heldout = scenes.generate("heldout", 0, 100)
    assert not {w for c in heldout.captions for w in c.split()} - vocab


def test_no_unknown_tokens(train300):
    tok = build_word_tokenizer(scenes.vocabulary())
    texts = _all_texts(train300.captions)
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert all(len(row) == len(t.split()) + 2 for row, t in zip(ids, texts))
    assert max(len(row) for row in ids) <= tok.model_max_length


# ------------------------------------------------------------------ tokenizer

@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(scenes.vocabulary(), max_length=12)


def test_tokenizer_specials(tok):
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.model_max_length == 12
    ids = tok("A Red STAR")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) == 5
    assert ids == tok("a red star")["input_ids"]  # lower-cased
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "star"]
    assert tok("a red zebra")["input_ids"][3] == tok.unk_token_id
    # punctuation is split off and known
    assert tok("a red star.")["input_ids"][-2] == tok.convert_tokens_to_ids(".")
    assert tok.unk_token_id not in tok("a red, star!")["input_ids"]


def test_tokenizer_padding_and_truncation(tok):
    b = tok(["a red star", "a picture of a large blue circle"], padding=True, return_tensors="pt")
    ids, mask = b["input_ids"], b["attention_mask"]
    assert ids.shape == (2, 9) and mask.shape == (2, 9)
    assert ids[0, 5:].tolist() == [0] * 4 and mask[0].tolist() == [1] * 5 + [0] * 4
    assert mask[1].tolist() == [1] * 9
    assert ids[:, 0].tolist() == [2, 2]
    assert ids[0, 4] == 3 and ids[1, 8] == 3
    long = tok(" ".join(["red"] * 30), truncation=True, max_length=12)["input_ids"]
    assert len(long) == 12 and long[0] == 2 and long[-1] == 3


def test_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["a red star", "there is an image of a small pink heart", "a picture of a zebra.", "the end"]
    assert again(texts, padding=True)["input_ids"] == tok(texts, padding=True)["input_ids"]
    assert again(texts, padding=True)["attention_mask"] == tok(texts, padding=True)["attention_mask"]
    assert (again.pad_token_id, again.unk_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2, 3)
    assert len(again) == len(tok)
    assert again.model_max_length == 12
