"""Refusals and warnings (issue 15): never a silent wrong answer.

Every case runs the command line (`tgems.cli.main`) on the shipped embedded model (32 px images, fast):
labels it cannot read or tell apart, calibration data of another label set, one-class data, a calibration
set too small for the guarantee, a damaged checkpoint, a bad --tau. Each error is one line on stderr, a
non-zero exit, and no output file.
"""
import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from tgems.cli import main
from tgems.errors import TGEMError

DIGITS = ["zero", "one", "two", "three"]


def run_cli(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr); argparse exits are returned as codes too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err):
    assert rc not in (0, None), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("tgems: error:"), lines[0]
    return lines[0]


def _write_folder(root, classes, per_class, seed=0):
    """folder:ROOT with one sub-folder per class text (underscores for spaces) of random 32 px PNGs."""
    rng = np.random.default_rng(seed)
    for c in classes:
        sub = root / c.replace(" ", "_")
        sub.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(sub / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def backbone():
    from tgems.backbones import load_backbone

    return load_backbone("embedded")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The issue's case: a folder dataset of digit classes whose texts the embedded model cannot read."""
    return _write_folder(tmp_path_factory.mktemp("digits") / "digits", [f"the digit {d}" for d in DIGITS], 6)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    from tgems.data import load_dataset

    p = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(load_dataset("scenes:test:1").images[0]).save(p)
    return p


# ----------------------------------------------------------------------------- labels (library)


def test_identical_tokens_refused_whatever_the_spelling(backbone):
    from tgems.profiles import check_readable_labels

    with pytest.raises(TGEMError, match="'a red circle', 'A Red Circle' become the same tokens"):
        check_readable_labels(backbone, ["a red circle", "A Red Circle", "a blue star"])


def test_unknown_words_warned_when_the_label_stays_readable(backbone):
    from tgems.profiles import UnknownWordsWarning, check_readable_labels

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = check_readable_labels(backbone, ["a red circle", "a red dog"])
    assert emb.shape[0] == 2
    msgs = [str(w.message) for w in caught if issubclass(w.category, UnknownWordsWarning)]
    assert len(msgs) == 1 and "'dog'" in msgs[0] and "circle" not in msgs[0]


def test_label_of_unknown_words_and_articles_only_refused(backbone):
    from tgems.profiles import check_readable_labels

    with pytest.raises(TGEMError, match="'an airplane' is made only of unknown words.*'airplane'"):
        check_readable_labels(backbone, ["a red circle", "an airplane"])


def test_scenes_labels_are_readable(backbone):
    """The embedded model's own classes pass: no refusal, no unknown word (look-alike pairs only warn)."""
    from tgems.data.scenes import CLASSES, PROMPT_TEMPLATES
    from tgems.profiles import UnknownWordsWarning, check_readable_labels

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = check_readable_labels(backbone, list(CLASSES), PROMPT_TEMPLATES)
    assert emb.shape[0] == len(CLASSES)
    assert not [w for w in caught if issubclass(w.category, UnknownWordsWarning)]


def test_classifier_constructor_refuses_before_any_work(backbone):
    from tgems import EarlyExitClassifier

    with pytest.raises(TGEMError, match="the \\[UNK\\] \\[UNK\\]"):
        EarlyExitClassifier(backbone, "embedded:cls", ["the digit zero", "the digit one"])


# ----------------------------------------------------------------------------- labels (CLI)


def test_classify_labels_that_collide_after_tokenization(png, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "classify", "--labels", "the digit zero,the digit one", png,
                           "--json", tmp_path / "o.json")
    line = assert_one_line_error(rc, err)
    assert "'the digit zero', 'the digit one' become the same tokens ('the [UNK] [UNK]')" in line
    assert "'digit'" in line and "tgems vocab" in line
    assert out == "" and not (tmp_path / "o.json").exists()


def test_classify_names_unknown_words_in_a_warning(png, capsys):
    rc, out, err = run_cli(capsys, "classify", "--labels", "a red circle,a blue dog", png, "--quiet")
    assert rc == 0, err
    warn = [ln for ln in err.splitlines() if ln.startswith("tgems: warning:")]
    assert len(warn) == 1 and "'dog'" in warn[0], err
    assert len(out.strip().splitlines()) == 1


def test_vocab_lists_the_embedded_words(capsys):
    rc, out, err = run_cli(capsys, "vocab")
    assert rc == 0, err
    words = out.split()
    for w in ("red", "circle", "triangle", "left", "small", "a", "an"):
        assert w in words
    assert "digit" not in words and "[UNK]" not in words
    assert "word-level" in err


def test_digits_folder_refused_by_eval_fit_and_classify(digits, png, tmp_path, capsys):
    """End to end: the digits case of the issue is refused by every command, naming the unknown words."""
    runs = {
        "eval": ["eval", "--tgem", "embedded:cls", "--data", f"folder:{digits}", "--no-speed", "--quiet",
                 "--json", tmp_path / "eval.json"],
        "fit": ["fit", "--data", f"folder:{digits}", "--out", tmp_path / "fit", "--epochs", "1", "--quiet",
                "--json", tmp_path / "fit.json"],
        "classify": ["classify", "--labels", ",".join(f"the digit {d}" for d in DIGITS), png,
                     "--json", tmp_path / "classify.json"],
    }
    for cmd, argv in runs.items():
        rc, out, err = run_cli(capsys, *argv)
        line = assert_one_line_error(rc, err)
        assert "'digit'" in line and "'zero'" in line and "cannot read or tell apart" in line, (cmd, line)
        assert out == "", cmd
    assert not any(tmp_path.iterdir())
