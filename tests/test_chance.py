"""Accuracy at chance is said loudly (issue 23.4): readable labels that do not describe the images make
`fit` refuse (unless --accept-degenerate), `eval` exit non-zero after writing its report, `calibrate` with
labels warn and record it; `search` with words the model cannot read warns or refuses, as classify does."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

import tgems
from tgems.errors import TGEMError
from tgems.chance import NearChanceWarning, binomial_tail, chance_check
from helpers import assert_one_line_error, run_cli

CLASSES = ["a red circle", "a blue star", "a green heart", "a yellow square", "a purple ring",
           "a orange cross", "a pink crescent", "a cyan triangle", "a red star", "a blue circle"]


def _mislabelled_folder(root, per_class=20, seed=0):
    """folder:ROOT of scenes images filed under class folders drawn at random, not by what they show:
    readable labels that do not describe the images (the issue's digits in colour-shape folders)."""
    data = tgems.load_dataset(f"scenes:test:{per_class * len(CLASSES)}", seed=seed)
    folder = np.random.default_rng(seed).permutation(np.arange(len(data)) % len(CLASSES))
    for i, c in enumerate(folder):
        sub = root / CLASSES[c].replace(" ", "_")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i]).save(sub / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def mislabelled(tmp_path_factory):
    return _mislabelled_folder(tmp_path_factory.mktemp("chance") / "photos")


def test_binomial_tail_is_exact():
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in [(0, 10, 0.3), (3, 10, 0.1), (180, 1797, 0.1), (200, 1797, 0.145), (8, 8, 0.525), (11, 10, 0.5)]:
        assert binomial_tail(k, n, p) == pytest.approx(float(stats.binom.sf(k - 1, n, p)), rel=1e-6, abs=1e-12)


def test_chance_check_of_the_issue_and_of_a_working_model():
    issue = chance_check(180, 1797, 10)  # sklearn digits under colour-shape labels: 10.0 % at layer 12
    assert issue["degenerate"] and issue["chance"] == 0.1 and issue["near_chance"] == pytest.approx(0.145)
    assert not chance_check(1200, 1797, 10)["degenerate"]
    assert chance_check(9, 60, 64)["degenerate"] is False  # 15 % on 64 classes is far above 1.6 %
    assert chance_check(2, 120, 64)["degenerate"]  # the tiny test CLIP: 1.7 %
    assert chance_check(0, 0, 3)["degenerate"]


def test_fit_records_and_warns_in_python(fitted):
    """The session's tiny trained CLIP is at chance on scenes: the fit says so in its info."""
    _, _, info = fitted["cls"]
    assert info["degenerate"] is True and info["full_model"]["accuracy"] < 0.065


def test_fit_refuses_before_training_unless_accepted(mislabelled, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "fit", "--data", f"folder:{mislabelled}", "--out", tmp_path / "fit",
                           "--epochs", "1", "--quiet", "--json", tmp_path / "fit.json")
    line = assert_one_line_error(rc, err)
    assert "not clearly above chance" in line and "for 10 classes" in line and "--accept-degenerate" in line
    assert not (tmp_path / "fit").exists() and not (tmp_path / "fit.json").exists()


def test_eval_exits_non_zero_on_a_degenerate_result(mislabelled, tmp_path, capsys):
    argv = ["eval", "--tgem", "embedded:cls", "--data", f"folder:{mislabelled}", "--no-speed", "--quiet",
            "--budget", "0.5", "--json", tmp_path / "e.json"]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 4
    assert "tgems: error: degenerate result:" in err and "not clearly above chance" in err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["degenerate"] is True
    (w,) = [w for w in report["warnings"] if w["kind"] == "near_chance"]
    assert w["num_classes"] == 10 and w["n"] == 100 and w["p_value"] >= w["alpha"]
    assert out.strip().splitlines()[-1].startswith("no result to report: full-model accuracy")
    rc, out, err = run_cli(capsys, *argv, "--accept-degenerate")
    assert rc == 0 and "tgems: warning: degenerate result (accepted)" in err


def test_calibrate_with_labels_warns_and_records(mislabelled):
    bb = tgems.load_backbone("embedded")
    data = tgems.load_dataset(f"folder:{mislabelled}")
    clf = tgems.EarlyExitClassifier(bb, "embedded:cls", data.classes)
    with pytest.warns(NearChanceWarning, match="calibration labels .* not clearly above chance"):
        calibrated = clf.calibrate(data, budget=0.5)
    assert calibrated.calibration["degenerate"] is True
    assert calibrated.calibration["full_model"]["num_classes"] == 10
    good = tgems.load_dataset("scenes:calib:300")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NearChanceWarning)
        ok = tgems.EarlyExitClassifier(bb, "embedded:cls", good.classes).calibrate(good, budget=0.5,
                                                                                   allow_uncovered=True)
    assert ok.calibration["degenerate"] is False


def test_search_with_unknown_words_warns_or_refuses(tmp_path, capsys):
    from tgems.profiles import UnknownWordsWarning
    from tgems.retrieval import EarlyExitIndex

    bb = tgems.load_backbone("embedded")
    index = EarlyExitIndex.build(bb, tgems.load_dataset("scenes:test:20"))
    with pytest.warns(UnknownWordsWarning, match="'elephant'"):
        hits = index.search_text("a purple elephant", k=3)
    assert len(hits) == 3
    with pytest.raises(TGEMError, match="cannot read the query"):
        index.search_text("the elephant", k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        index.search_text("a purple star", k=3)
    index.save(tmp_path / "idx")
    rc, out, err = run_cli(capsys, "search", "--index", tmp_path / "idx", "a purple elephant", "--k", "2")
    assert rc == 0 and "tgems: warning: the query 'a purple elephant' has words unknown" in err
    assert len(out.strip().splitlines()) == 2
