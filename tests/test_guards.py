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

from tgems.errors import TGEMError
from helpers import assert_one_line_error, run_cli

DIGITS = ["zero", "one", "two", "three"]


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


# ----------------------------------------------------------------------------- degenerate data


def test_one_class_folder_refused_by_fit_and_eval(tmp_path, capsys):
    one = _write_folder(tmp_path / "one", ["a red circle"], 20)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "fit", "--data", f"folder:{one}", "--out", out / "fit", "--epochs", "1", "--quiet",
                         "--json", out / "fit.json")
    assert "at least two" in assert_one_line_error(rc, err)
    rc, _, err = run_cli(capsys, "eval", "--tgem", "embedded:cls", "--data", f"folder:{one}", "--no-speed",
                         "--quiet", "--json", out / "eval.json")
    line = assert_one_line_error(rc, err)
    assert "all of one class ('a red circle')" in line
    assert not out.exists()


def test_eval_on_too_few_images_refused(tmp_path, capsys):
    few = _write_folder(tmp_path / "few", ["a red circle", "a blue star"], 4)  # 8 images: 4 test, 4 calibration
    rc, _, err = run_cli(capsys, "eval", "--tgem", "embedded:cls", "--data", f"folder:{few}", "--no-speed",
                         "--quiet", "--json", tmp_path / "eval.json")
    assert "4 test image(s) are too few" in assert_one_line_error(rc, err)
    assert not (tmp_path / "eval.json").exists()


def test_degenerate_data_flagged_not_celebrated(tmp_path, capsys):
    """Every image the same: the full model gives one class to all of them; the summary says so."""
    from tgems.data import load_dataset

    img = load_dataset("scenes:test:1").images[0]
    root = tmp_path / "same"
    for c in ("a red circle", "a blue star"):
        (root / c.replace(" ", "_")).mkdir(parents=True)
        for j in range(10):
            Image.fromarray(img).save(root / c.replace(" ", "_") / f"{j}.png")
    rc, out, err = run_cli(capsys, "eval", "--tgem", "embedded:cls", "--data", f"folder:{root}", "--no-speed",
                           "--quiet", "--budget", "0.5", "--json", tmp_path / "e.json")
    assert rc == 4 and "tgems: error: degenerate result: the full model predicts" in err, err
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("no result to report: the full model predicts"), summary
    assert "100.0% of the 10 test images" in summary and "fewer encoder FLOPs" not in summary
    report = json.loads((tmp_path / "e.json").read_text())
    kinds = {w["kind"] for w in report["warnings"]}
    assert {"degenerate", "few_images"} <= kinds


def test_progress_while_calibrating_and_timing_unless_quiet(tmp_path, capsys):
    from tgems.data import load_dataset

    scenes, data = load_dataset("scenes:test:600"), tmp_path / "two"
    for c in np.unique(scenes.labels)[:2]:  # real scenes of two classes, so the data are not degenerate
        sub = data / scenes.classes[c].replace(" ", "_")
        sub.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(scenes.labels == c)[:8]):
            Image.fromarray(scenes.images[i]).save(sub / f"{j}.png")
    argv = ["eval", "--tgem", "embedded:cls", "--data", f"folder:{data}", "--budget", "0.5"]
    rc, out, err = run_cli(capsys, *argv, "--json", tmp_path / "e.json")
    assert rc == 0, err
    assert "calibrate" in err and "timing" in err  # the tqdm bars
    timed = [r for r in json.loads((tmp_path / "e.json").read_text())["results"] if r["images_per_second"]]
    assert {r["method"] for r in timed} == {"full", "static", "tgem_cls"}
    assert all(r["ips_min"] <= r["images_per_second"] <= r["ips_max"] and r["repeats"] == 5 for r in timed)
    rc, out, err = run_cli(capsys, *argv, "--quiet")
    assert rc == 0 and err == "", err
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("T-GEM at budget 0.5") and "measured throughput" in summary, summary


def test_scenes_report_has_no_degenerate_warning():
    import torch

    from tgems.evaluation.harness import data_warnings

    preds = torch.arange(200) % 5
    assert data_warnings(preds, list("abcde"), 500) == []
    preds[:185] = 2
    (w,) = data_warnings(preds, list("abcde"), 500)
    assert w["kind"] == "degenerate" and w["class"] == "c" and w["share"] == pytest.approx(0.93, abs=0.01)


# ----------------------------------------------------------------------------- timings


def test_throughput_is_interleaved_with_spread_and_load(backbone):
    import torch

    from tgems.evaluation.harness import measure_throughputs
    from tgems.policies import ExitAtLayer, NeverExit

    pixels = torch.randn(16, 3, backbone.image_size, backbone.image_size)
    calls = []

    class Counting(ExitAtLayer):
        def decide(self, layer, z, rows):
            calls.append(layer)
            return super().decide(layer, z, rows)

    res = measure_throughputs(backbone, pixels, [NeverExit(), Counting(3)], repeats=3)
    assert len(res) == 2
    for r in res:
        assert r["ips_min"] <= r["images_per_second"] <= r["ips_max"]
        assert len(r["load"]) == 2 and r["cores"] >= 1 and r["repeats"] == 3
    assert calls == [3] * (1 + 3)  # warm-up + 3 timed runs, each exiting at layer 3


def _timed(ips, lo, hi, load=(0.1, 0.1), cores=8, **kw):
    return {"images_per_second": ips, "ips_min": lo, "ips_max": hi, "load": list(load), "cores": cores, **kw}


def _results(full, tgem):
    base = {"split": "all", "accuracy": 0.8, "agreement": 1.0, "mean_layers": 12.0}
    return [{**base, "method": "full", "budget": None, "flops_ratio": 1.0, **full},
            {**base, "method": "tgem_cls", "budget": 0.5, "flops_ratio": 0.5, "accuracy": 0.7, **tgem}]


def test_summary_line_trusts_only_quiet_tight_timings():
    from tgems.evaluation.report import summary_line

    quiet = summary_line(_results(_timed(100, 95, 105), _timed(180, 170, 190)), 0.5)
    assert "1.80 x measured throughput" in quiet and "not to be trusted" not in quiet
    spread = summary_line(_results(_timed(100, 40, 140), _timed(180, 170, 190)), 0.5)
    assert "not to be trusted (full repeats spread 3.50x" in spread and "1.80 x measured" not in spread
    busy = summary_line(_results(_timed(100, 95, 105, load=(9, 7), cores=2), _timed(180, 170, 190, load=(9, 7),
                                                                                      cores=2)), 0.5)
    assert "not to be trusted (load 9.0 on 2 cores" in busy


# ----------------------------------------------------------------------------- calibration, checkpoints, options


def test_calibration_data_of_other_classes_refused(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "calibrate", "--labels", "a red circle,a blue star", "--calib", "scenes:calib:100",
                         "--budget", "0.5", "--out", tmp_path / "clf", "--quiet", "--json", tmp_path / "c.json")
    line = assert_one_line_error(rc, err)
    assert "outside the label set" in line and "--label-free" in line
    assert not any(tmp_path.iterdir())


def test_calibration_data_missing_a_class_refused(tmp_path, capsys):
    calib = _write_folder(tmp_path / "calib", ["a red circle"], 10)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "calibrate", "--labels", "a red circle,a blue star", "--calib", f"folder:{calib}",
                         "--budget", "0.5", "--out", out / "clf", "--quiet", "--json", out / "c.json")
    line = assert_one_line_error(rc, err)
    assert "no image of 1 of the 2 labels ('a blue star')" in line
    assert not out.exists()


def test_tiny_calibration_set_cannot_certify_a_strict_guarantee(png, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "classify", "--labels", "a red circle,a blue star", "--calib", "scenes:calib:50",
                           "--label-free", "--max-drop", "0.001", png, "--quiet", "--json", tmp_path / "o.json")
    line = assert_one_line_error(rc, err)
    assert "50 calibration images cannot certify max_drop 0.001" in line and "at least" in line
    assert out == "" and not (tmp_path / "o.json").exists()


def test_damaged_checkpoint_named_in_one_line(png, tmp_path, capsys):
    from tgems.pretrained import tgem_path

    ckpt = tmp_path / "tgem"
    shutil.copytree(tgem_path("embedded:cls"), ckpt)
    weights = ckpt / "tgem.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, out, err = run_cli(capsys, "classify", "--tgem", ckpt, "--labels", "a red circle,a blue star", png,
                           "--json", tmp_path / "o.json")
    line = assert_one_line_error(rc, err)
    assert str(weights) in line and "internal error" not in line
    assert out == "" and not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("tau", ["nan", "-5", "2.5", "inf"])
def test_bad_tau_refused_in_one_line(tau, png, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "classify", "--labels", "a red circle,a blue star", "--tau", tau, png,
                           "--json", tmp_path / "o.json")
    assert "--tau" in assert_one_line_error(rc, err)
    assert out == "" and not (tmp_path / "o.json").exists()


def test_timing_doubts_discount_the_runs_own_threads_and_flag_a_small_cpu_share():
    """On a 2-core machine the timed runs' own 2 threads put the load average near 2: that alone is no
    reason to doubt them; other processes taking CPU from them (a low CPU share) is."""
    from tgems.evaluation.harness import timing_doubts

    quiet = _timed(100, 95, 105, load=(2.2, 2.4), cores=2, threads=2, cpu_share=0.97)
    assert timing_doubts(quiet) == []
    busy = _timed(100, 95, 105, load=(2.2, 2.4), cores=2, threads=2, cpu_share=0.5)
    assert timing_doubts(busy) == ["the timed runs got 50% of their 2 threads' CPU"]
    assert timing_doubts(_timed(100, 95, 105, load=(4.5, 4.0), cores=2, threads=2, cpu_share=0.97)) == \
        ["load 4.5 on 2 cores"]
