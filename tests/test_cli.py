"""End-to-end tests of the `tgems` command line (`tgems.cli.main`), on a tiny trained CLIP.

The shipped embedded model is not used: model A is the session's tiny trained CLIP (tests/conftest.py),
on which a module fixture fits `cls` and `rates` T-GEMs through the CLI; a random-init tiny CLIP (model B,
also shared by the session) stands for "another backbone".
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tgems import __version__
from tgems.cli import main
from helpers import assert_one_line_error, run_cli

SWEEP = [0.3, 0.4, 0.5, 0.6, 0.7]
RECORD_KEYS = {"method", "budget", "split", "accuracy", "agreement", "mean_layers", "flops_ratio",
               "images_per_second"}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory, trained_clip_dir, tiny_clip_dir):
    """Tiny CLIP A (trained; + its cls / rates T-GEMs, fitted through the CLI) and tiny CLIP B (random init).

    A is at chance on scenes (20 training steps), so its fits and evals pass --accept-degenerate."""
    root = tmp_path_factory.mktemp("cli")
    model_a, model_b = trained_clip_dir, tiny_clip_dir
    fit_json = root / "fit_cls.json"
    codes = []
    for space, out in (("cls", root / "tgem_cls"), ("rates", root / "tgem_rates")):
        argv = ["fit", "--model", str(model_a), "--data", "scenes:train:400", "--out", str(out), "--epochs", "1",
                "--quiet", "--space", space, "--accept-degenerate"]
        argv += ["--json", str(fit_json)] if space == "cls" else ["--no-cross-fit"]
        codes.append(main(argv))
    assert codes == [0, 0]
    return {"root": root, "model_a": model_a, "model_b": model_b, "tgem_cls": root / "tgem_cls",
            "tgem_rates": root / "tgem_rates", "fit_json": fit_json}


def _eval_argv(work, out_dir: Path, *extra):
    return ["eval", "--model", work["model_a"], "--tgem", work["tgem_cls"], "--tgem", work["tgem_rates"],
            "--data", "scenes:testall:120", "--n-train", "300", "--no-speed", "--quiet",
            "--json", out_dir / "eval.json", "--plot", out_dir / "eval.png", "--accept-degenerate", *extra]


@pytest.fixture(scope="module")
def sweep_eval(work):
    """The default sweep, run once for the module: (exit code, stdout, report, png path)."""
    out_dir = work["root"] / "eval1"
    rc = main([str(a) for a in _eval_argv(work, out_dir)])
    report = json.loads((out_dir / "eval.json").read_text()) if rc == 0 else None
    return rc, report, out_dir / "eval.png"


@pytest.fixture(scope="module")
def images(work):
    """Three readable 32x32 PNGs (scenes test samples) and one garbage file with a .png name."""
    from tgems.data import load_dataset

    d = work["root"] / "images"
    d.mkdir()
    data = load_dataset("scenes:test:3")
    good = []
    for i in range(3):
        p = d / f"img{i}.png"
        Image.fromarray(data.images[i]).save(p)
        good.append(p)
    bad = d / "broken.png"
    bad.write_bytes(b"this is not a png at all \x00\x01\x02" * 4)
    return good, bad


@pytest.fixture(scope="module")
def folder_data(work):
    """folder:DIR with 3 class sub-folders (underscores for spaces) of 6 scenes images each."""
    from tgems.data.scenes import CLASSES, generate

    root = work["root"] / "folder_ds"
    data = generate("test", 0, 52 * 6)  # the test split cycles over its 52 seen classes
    wanted = sorted(set(data.labels.tolist()))[:3]
    for label in wanted:
        sub = root / CLASSES[label].replace(" ", "_")
        sub.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(data.labels == label)[:6]):
            Image.fromarray(data.images[i]).save(sub / f"{j}.png")
    return root, [CLASSES[label] for label in wanted]


# ----------------------------------------------------------------------------- basics


def test_version(capsys):
    rc, out, err = run_cli(capsys, "--version")
    assert rc == 0
    assert out.strip() == f"tgems {__version__}"


def test_no_command_prints_help(capsys):
    rc, out, err = run_cli(capsys)
    assert rc == 0
    assert "usage: tgems" in out
    for cmd in ("demo", "pretrain", "fit", "eval", "classify"):
        assert cmd in out


def _parsers(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_abbreviated_options_are_refused(tmp_path, capsys):
    """`--n 3` on a command without --n is an unknown option, not `--num-gpus 3` (argparse's prefix matching)."""
    from tgems.cli import build_parser

    assert all(not p.allow_abbrev for p in _parsers(build_parser()))
    rc, out, err = run_cli(capsys, "classify", "--data", "scenes:testall:4", "--out", tmp_path / "o", "--n", "3")
    assert rc == 2 and "unrecognized arguments: --n" in err and "Traceback" not in err
    rc, out, err = run_cli(capsys, "serve", "--max-batch", "8")
    assert rc == 2 and "--max-batch" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- fit


def _subparser(name):
    from tgems.cli import build_parser

    return next(p for p in _parsers(build_parser()) if p.prog == f"tgems {name}")


def test_fit_options_take_their_defaults_from_fit_settings():
    """`tgems fit`'s defaults are FitSettings' (one torch-free place), every option a field, and a parse of no
    options gives the settings' defaults back."""
    import tgems.training.fit as fit
    from tgems.training.settings import FitSettings, cli_fields

    assert fit.FitSettings is FitSettings
    actions = {a.dest: a for a in _subparser("fit")._actions}
    names = cli_fields(FitSettings)
    assert {"space", "hidden", "epochs", "jumper_max", "cross_fit", "recipe", "readout_mix"} <= set(names)
    for name in names:
        assert actions[name].default == getattr(FitSettings(), name), name
    assert "--no-cross-fit" in actions["cross_fit"].option_strings
    args = _subparser("fit").parse_args(["--out", "o", "--no-cross-fit", "--hidden", "64"])
    s = FitSettings(**{k: getattr(args, k) for k in names})
    assert s == FitSettings(cross_fit=False, hidden=64)


def test_index_options_take_their_defaults_from_index_spec():
    """`tgems index`'s options are IndexSpec's fields with its defaults; `index-fit --epochs` is IndexFitSettings'."""
    from dataclasses import fields

    from tgems.spec import INDEX_FIELDS, IndexSpec
    from tgems.training.index_fit import IndexFitSettings as used
    from tgems.training.settings import IndexFitSettings

    assert used is IndexFitSettings
    args = _subparser("index").parse_args(["--data", "scenes:test", "--out", "o"])
    assert IndexSpec(**{k: getattr(args, k) for k in INDEX_FIELDS}) == IndexSpec(data="scenes:test", out="o")
    assert set(INDEX_FIELDS) == {f.name for f in fields(IndexSpec)}
    args = _subparser("index-fit").parse_args(["--model", "m", "--data", "d", "--out", "o"])
    assert args.epochs == IndexFitSettings().epochs


def test_fit_writes_checkpoint_and_json(work):
    for space in ("cls", "rates"):
        d = work[f"tgem_{space}"]
        assert (d / "tgem.json").is_file() and (d / "tgem.safetensors").is_file()
        cfg = json.loads((d / "tgem.json").read_text())
        assert cfg["space"] == space
        assert cfg["num_layers"] == 4 and cfg["layers"] == [1, 2, 3]
        assert cfg["data"] == "scenes:train:400"
        assert not (d.parent / (d.name + ".tmp")).exists()
    info = json.loads(work["fit_json"].read_text())
    assert info["model"] == str(work["model_a"]) and info["data"] == "scenes:train:400" and info["seed"] == 0
    assert info["settings"]["epochs"] == 1 and info["settings"]["space"] == "cls"
    assert [r["layer"] for r in info["per_layer_holdout"]] == [1, 2, 3, 4]
    assert info["num_train"] + info["num_jumper"] == 400
    assert info["fit_seconds"] >= 0
    # cls was cross-fitted (the default): two half-class module sets; rates was fit with --no-cross-fit
    assert info["settings"]["cross_fit"] and len(info["cross_fit"]) == 2
    rates = json.loads((work["tgem_rates"] / "tgem.json").read_text())
    assert not rates["settings"]["cross_fit"] and rates["cross_fit"] is None


def test_fit_jumper_target(work, tmp_path, capsys):
    out = tmp_path / "T"
    rc, _, err = run_cli(capsys, "fit", "--model", work["model_a"], "--data", "scenes:train:200", "--out", out,
                         "--epochs", "1", "--quiet", "--jumper-target", "no_loss", "--accept-degenerate")
    assert rc == 0, err
    assert json.loads((out / "tgem.json").read_text())["settings"]["jumper_target"] == "no_loss"
    rc, _, err = run_cli(capsys, "fit", "--model", work["model_a"], "--out", tmp_path / "U", "--jumper-target", "x")
    assert rc == 2 and "invalid choice" in err and not (tmp_path / "U").exists()


def test_fit_missing_folder_leaves_nothing(work, tmp_path, capsys):
    out, js = tmp_path / "T", tmp_path / "fit.json"
    rc, _, err = run_cli(capsys, "fit", "--model", work["model_a"], "--data", "folder:/nonexistent",
                         "--out", out, "--json", js, "--quiet")
    assert rc == 2
    line = assert_one_line_error(rc, err)
    assert "/nonexistent" in line
    assert not out.exists() and not js.exists()


# ----------------------------------------------------------------------------- eval


def test_eval_sweep_report(sweep_eval, work):
    rc, report, png = sweep_eval
    assert rc == 0
    for key in ("model", "data", "num_layers", "seed", "results"):
        assert key in report
    assert report["model"] == str(work["model_a"])
    assert report["data"] == "scenes:testall"
    assert report["num_layers"] == 4 and report["seed"] == 0
    assert report["budgets"] == SWEEP
    results = report["results"]
    for r in results:
        assert RECORD_KEYS <= set(r), r
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1
        assert 1 <= r["mean_layers"] <= 4
        assert 0 < r["flops_ratio"] <= 1.01
        assert r["images_per_second"] is None  # --no-speed
    methods = {r["method"] for r in results}
    assert {"full", "static", "probe", "sample", "tgem_cls", "tgem_rates", "oracle"} <= methods
    assert {r["split"] for r in results} >= {"seen", "heldout", "all"}
    static_layers = {r["layer"] for r in results if r["method"] == "static"}
    assert static_layers == {1, 2, 3, 4}
    # plain truncated CLIP: one row per layer, and at the last layer it is the full model
    lens = {(r["layer"], r["split"]): r for r in results if r["method"] == "lens"}
    assert {k[0] for k in lens} == {1, 2, 3, 4}
    for split in ("all", "seen", "heldout"):
        full = next(r for r in results if r["method"] == "full" and r["split"] == split)
        assert lens[(4, split)]["agreement"] == 1.0 and lens[(4, split)]["accuracy"] == full["accuracy"]
        assert lens[(1, split)]["flops_ratio"] < lens[(4, split)]["flops_ratio"] <= 1.01
    for m in ("tgem_cls", "tgem_rates", "sample", "probe"):
        for split in ("all", "seen", "heldout"):
            got = sorted(r["budget"] for r in results if r["method"] == m and r["split"] == split)
            assert got == SWEEP, (m, split, got)
    full = [r for r in results if r["method"] == "full" and r["split"] == "all"]
    assert len(full) == 1 and full[0]["agreement"] == 1.0 and full[0]["mean_layers"] == 4
    # the paired difference to static truncation is the difference of the means (static interpolated
    # to the same mean depth), with a standard error
    for r in results:
        if r["budget"] is None:
            assert "vs_static" not in r
            continue
        st = sorted((x for x in results if x["method"] == "static" and x["split"] == r["split"]),
                    key=lambda x: x["layer"])
        expect = r["accuracy"] - np.interp(r["mean_layers"], [x["layer"] for x in st], [x["accuracy"] for x in st])
        assert r["vs_static"] == pytest.approx(expect, abs=2e-4), r
        assert r["vs_static_se"] >= 0
    assert any(r.get("vs_static_se") for r in results)
    # budgets are met on calibration data; the test split should stay close to them
    for r in results:
        if r["method"] == "tgem_cls" and r["split"] == "all":
            assert r["mean_layers"] / 4 <= r["budget"] + 0.15, r


def test_eval_plot_is_png(sweep_eval):
    rc, _, png = sweep_eval
    assert rc == 0
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not png.with_name(png.name + ".tmp").exists()


def test_eval_is_deterministic(sweep_eval, work, tmp_path, capsys):
    rc0, report, _ = sweep_eval
    assert rc0 == 0
    rc, out, err = run_cli(capsys, *_eval_argv(work, tmp_path))
    assert rc == 0, err
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["results"] == report["results"]
    assert "tgem_cls" in out and "T-GEM at budget 0.5" in out  # the table and the summary line


def test_eval_single_budget(work, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--data", "scenes:testall:60", "--n-train", "200", "--no-speed", "--quiet",
                           "--budget", "0.5", "--json", tmp_path / "e.json", "--accept-degenerate")
    assert rc == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["budgets"] == [0.5]
    assert {r["budget"] for r in report["results"]} == {None, 0.5}
    assert "tgem_rates" not in {r["method"] for r in report["results"]}


def test_eval_folder_dataset_splits_calibration(work, folder_data, tmp_path, capsys):
    root, classes = folder_data
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--tgem", work["tgem_rates"], "--data", f"folder:{root}", "--no-speed",
                           "--budget", "0.5", "--json", tmp_path / "f.json", "--plot", tmp_path / "f.png",
                           "--accept-degenerate")
    assert rc == 0, err
    assert "half of the data calibrates" in err  # the fallback is logged (not --quiet)
    assert "Traceback" not in err
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["data"] == f"folder:{root.name}"
    results = report["results"]
    methods = {r["method"] for r in results}
    assert {"full", "static", "oracle", "tgem_cls", "tgem_rates"} <= methods
    assert not {"probe", "sample"} & methods  # no training / shot data for a folder
    full = next(r for r in results if r["method"] == "full" and r["split"] == "all")
    assert full["n"] == 9  # 18 images, half calibrate
    assert {r["split"] for r in results} == {"all"}
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- classify


def test_classify_good_and_bad_images(work, images, tmp_path, capsys):
    good, bad = images
    labels = "a red circle,a blue square,a green star"
    rc, out, err = run_cli(capsys, "classify", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--labels", labels, *good, bad, "--json", tmp_path / "c.json")
    assert rc not in (0, None)
    assert "Traceback" not in err
    lines = out.strip().splitlines()
    assert len(lines) == len(good)
    for p, line in zip(good, lines):
        path, label, prob, layer, flops = line.split("\t")
        assert path == str(p)
        assert label in labels.split(",")
        assert 0 < float(prob) <= 1
        assert layer.startswith("layer ") and layer.endswith("/4") and 1 <= int(layer[6:-2]) <= 4
        assert flops.startswith("FLOPs ") and 0 < float(flops[6:]) <= 1.01
    assert str(bad) not in out
    err_lines = err.strip().splitlines()
    assert any(str(bad) in ln and ln.startswith("tgems: skipped") for ln in err_lines)
    assert err_lines[-1].startswith("tgems: error:") and "1 of 4" in err_lines[-1]
    assert all(ln.startswith("tgems:") for ln in err_lines)
    report = json.loads((tmp_path / "c.json").read_text())
    assert len(report["results"]) == len(good)
    assert [f["path"] for f in report["failed"]] == [str(bad)] and "cannot read image" in report["failed"][0]["reason"]


def test_classify_jsonl_and_labels_file(work, images, tmp_path, capsys):
    good, _ = images
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("a red circle\n\na blue square\n  a green star  \n")
    rc, out, err = run_cli(capsys, "classify", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--labels-file", labels_file, "--jsonl", *good)
    assert rc == 0, err
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in good]
    for r in records:
        assert set(r) == {"path", "label", "probability", "exit_layer", "flops_ratio"}
        assert r["label"] in ("a red circle", "a blue square", "a green star")
        assert 1 <= r["exit_layer"] <= 4 and 0 < r["probability"] <= 1


def test_classify_with_budget_calibration(work, images, capsys):
    """Images of 52 classes cannot calibrate a 2-label classifier on labels (that shifted every index before);
    label-free calibration (agreement with the full model) can, and says so."""
    good, _ = images
    argv = ("classify", "--model", work["model_a"], "--tgem", work["tgem_cls"], "--labels", "a red circle,a blue square",
            "--budget", "0.5", "--calib", "scenes:calib:60", "--jsonl", good[0])
    rc, out, err = run_cli(capsys, *argv)
    assert "outside the label set" in assert_one_line_error(rc, err) and "--label-free" in err
    rc, out, err = run_cli(capsys, *argv, "--label-free")
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    assert "label-free" in err


@pytest.mark.parametrize("labels", [",", " , ,", "a red circle,a blue square,a red circle"])
def test_classify_bad_label_lists(work, images, tmp_path, capsys, labels):
    good, _ = images
    js = tmp_path / "c.json"
    rc, out, err = run_cli(capsys, "classify", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--labels", labels, good[0], "--json", js)
    line = assert_one_line_error(rc, err)
    assert ("empty" in line) if "circle" not in labels else ("duplicate" in line and "a red circle" in line)
    assert out == "" and not js.exists()


def test_classify_empty_labels_file(work, images, tmp_path, capsys):
    good, _ = images
    empty = tmp_path / "labels.txt"
    empty.write_text("\n  \n")
    rc, out, err = run_cli(capsys, "classify", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--labels-file", empty, good[0])
    assert "empty" in assert_one_line_error(rc, err)
    rc, out, err = run_cli(capsys, "classify", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--labels-file", tmp_path / "missing.txt", good[0])
    assert "missing.txt" in assert_one_line_error(rc, err)


# ----------------------------------------------------------------------------- errors


def _outputs(tmp_path):
    return tmp_path / "out.json", tmp_path / "out.png"


def _assert_no_outputs(tmp_path):
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [], leftovers


def test_error_unknown_model(work, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    js, png = _outputs(tmp_path)
    rc, out, err = run_cli(capsys, "eval", "--model", "no-such-model-xyz", "--tgem", work["tgem_cls"],
                           "--data", "scenes:testall:20", "--quiet", "--json", js, "--plot", png)
    assert rc == 2
    assert "no-such-model-xyz" in assert_one_line_error(rc, err)
    rc, out, err = run_cli(capsys, "classify", "--model", "no-such-model-xyz", "--tgem", work["tgem_cls"],
                           "--labels", "a,b", images[0][0], "--json", js)
    assert "no-such-model-xyz" in assert_one_line_error(rc, err)
    assert out == ""
    _assert_no_outputs(tmp_path)


def test_error_missing_dataset_folder(work, tmp_path, capsys):
    js, png = _outputs(tmp_path)
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--data", "folder:/nonexistent", "--quiet", "--json", js, "--plot", png)
    assert rc == 2
    assert "/nonexistent" in assert_one_line_error(rc, err)
    _assert_no_outputs(tmp_path)


def test_error_bad_dataset_specs(work, tmp_path, capsys):
    js, png = _outputs(tmp_path)
    for spec in ("scenes:nosuchsplit", "nosuchkind:x", "scenes:test:zero"):
        rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                               "--data", spec, "--quiet", "--json", js, "--plot", png)
        assert rc == 2
        assert_one_line_error(rc, err)
    _assert_no_outputs(tmp_path)


def test_error_checkpoint_for_another_backbone(work, images, tmp_path, capsys):
    js, png = _outputs(tmp_path)
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_b"], "--tgem", work["tgem_cls"],
                           "--data", "scenes:testall:20", "--n-train", "20", "--quiet", "--no-speed",
                           "--json", js, "--plot", png)
    assert rc == 2
    assert "another backbone" in assert_one_line_error(rc, err)
    rc, out, err = run_cli(capsys, "classify", "--model", work["model_b"], "--tgem", work["tgem_cls"],
                           "--labels", "a red circle,a blue square", images[0][0], "--json", js)
    assert rc == 2
    assert "another backbone" in assert_one_line_error(rc, err)
    assert out == ""
    _assert_no_outputs(tmp_path)


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2", "abc"])
def test_error_budget_out_of_range(work, tmp_path, capsys, budget):
    js, png = _outputs(tmp_path)
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--data", "scenes:testall:20", "--budget", budget, "--json", js, "--plot", png)
    assert rc == 2  # argparse usage error (SystemExit(2))
    assert "Traceback" not in err
    assert "--budget" in err and "(0, 1]" in err
    _assert_no_outputs(tmp_path)


def test_error_budget_out_of_range_classify(work, images, capsys):
    rc, out, err = run_cli(capsys, "classify", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--labels", "a,b", "--budget", "0", images[0][0])
    assert rc == 2 and "(0, 1]" in err and "Traceback" not in err


def test_error_tgem_path_not_a_checkpoint(work, images, tmp_path, capsys):
    not_ckpt = tmp_path / "not_a_tgem"
    not_ckpt.mkdir()
    (not_ckpt / "tgem.json").write_text("{}")  # no tensors
    js, png = tmp_path / "o" / "out.json", tmp_path / "o" / "out.png"
    for path in (not_ckpt, tmp_path / "missing_dir", work["model_a"]):
        rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", path,
                               "--data", "scenes:testall:20", "--quiet", "--json", js, "--plot", png)
        assert rc == 2
        assert "not a T-GEM checkpoint" in assert_one_line_error(rc, err)
        rc, out, err = run_cli(capsys, "classify", "--model", work["model_a"], "--tgem", path,
                               "--labels", "a,b", images[0][0], "--json", js)
        assert rc == 2
        assert "not a T-GEM checkpoint" in assert_one_line_error(rc, err)
    assert not (tmp_path / "o").exists()


def test_error_corrupt_checkpoint_json(work, tmp_path, capsys):
    bad = tmp_path / "bad_tgem"
    bad.mkdir()
    (bad / "tgem.json").write_text("{not json")
    (bad / "tgem.safetensors").write_bytes((work["tgem_cls"] / "tgem.safetensors").read_bytes())
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", bad,
                           "--data", "scenes:testall:20", "--quiet", "--json", tmp_path / "o.json")
    assert rc == 2
    assert_one_line_error(rc, err)
    assert not (tmp_path / "o.json").exists()


def test_error_eval_needs_cls_checkpoint(work, tmp_path, capsys):
    js, png = _outputs(tmp_path)
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_rates"],
                           "--data", "scenes:testall:20", "--n-train", "20", "--quiet", "--no-speed",
                           "--json", js, "--plot", png)
    assert rc == 2
    assert "cls" in assert_one_line_error(rc, err)
    _assert_no_outputs(tmp_path)


def test_error_plot_must_be_png(work, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--data", "scenes:testall:20", "--quiet", "--json", tmp_path / "o.json",
                           "--plot", tmp_path / "o.pdf")
    assert ".png" in assert_one_line_error(rc, err)
    _assert_no_outputs(tmp_path)


# ----------------------------------------------------------------------------- the installed script


def test_console_script_subprocess(work, images, tmp_path):
    """The real `tgems` entry point: exit code and a clean stderr (no traceback, only tgems lines)."""
    exe = Path(sys.executable).with_name("tgems")
    if not exe.is_file():
        pytest.skip("the tgems console script is not installed next to this interpreter")
    good, bad = images
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TGEMS_DEBUG", None)
    proc = subprocess.run([str(exe), "classify", "--model", str(work["model_a"]), "--tgem", str(work["tgem_cls"]),
                           "--labels", "a red circle,a blue square", "--jsonl", str(good[0]), str(bad)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [json.loads(ln)["path"] for ln in proc.stdout.strip().splitlines()] == [str(good[0])]
    err_lines = proc.stderr.strip().splitlines()
    assert err_lines[-1].startswith("tgems: error:")
    assert all(ln.startswith("tgems:") for ln in err_lines), proc.stderr


# ----------------------------------------------------------------------------- options checked up front


@pytest.mark.parametrize("argv, flag", [
    (["fit", "--epochs", "0"], "--epochs"),
    (["fit", "--epochs", "-1"], "--epochs"),
    (["fit", "--hidden", "0"], "--hidden"),
    (["fit", "--seed", "-1"], "--seed"),
    (["eval", "--tgem", "T", "--data", "scenes:test", "--n-train", "0"], "--n-train"),
    (["pretrain", "--batch-size", "0"], "--batch-size"),
    (["pretrain", "--steps", "x"], "--steps"),
])
def test_bad_numeric_options_are_usage_errors(tmp_path, capsys, argv, flag):
    if argv[0] in ("fit", "pretrain"):
        argv = argv + ["--out", str(tmp_path / "o")]
    rc, out, err = run_cli(capsys, *argv, "--json", tmp_path / "o.json")
    assert rc == 2 and flag in err and "Traceback" not in err and "internal error" not in err
    _assert_no_outputs(tmp_path)


def test_unwritable_output_fails_before_the_work(work, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--data", "scenes:testall:20", "--quiet", "--no-speed", "--json", afile / "r.json")
    assert "not a directory" in assert_one_line_error(rc, err)
    assert out == ""  # failed before the table
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--data", "scenes:testall:20", "--quiet", "--no-speed", "--plot", tmp_path)
    assert "is a directory" in assert_one_line_error(rc, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_fit_out_never_replaces_an_unrelated_directory(work, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    fit = ["fit", "--model", work["model_a"], "--data", "scenes:train:40", "--epochs", "1", "--quiet",
           "--accept-degenerate"]
    rc, out, err = run_cli(capsys, *fit, "--out", victim)
    assert "refusing" in assert_one_line_error(rc, err)
    assert (victim / "notes.txt").read_text() == "keep me"
    # a previous checkpoint (or an empty directory) may be replaced
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for _ in range(2):
        rc, out, err = run_cli(capsys, *fit, "--out", ckpt)
        assert rc == 0, err
        assert sorted(p.name for p in ckpt.iterdir()) == ["tgem.json", "tgem.safetensors"]


def test_pretrain_command(tmp_path, capsys):
    out, js = tmp_path / "clip", tmp_path / "pretrain.json"
    rc, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--steps", "2", "--batch-size", "16",
                         "--threads", "1", "--out", out, "--json", js, "--quiet")
    assert rc == 0, err
    assert (out / "config.json").is_file() and (out / "pretrain.json").is_file()
    info = json.loads(js.read_text())
    assert info["preset"] == "tiny" and info["recipe"]["steps"] == 2 and info["log"]
    rc, _, err = run_cli(capsys, "pretrain", "--preset", "no-such-preset", "--out", tmp_path / "x", "--quiet")
    assert "no-such-preset" in assert_one_line_error(rc, err)
    assert not (tmp_path / "x").exists()
    rc, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--device", "warp-drive", "--out", tmp_path / "x",
                         "--quiet")
    assert "warp-drive" in assert_one_line_error(rc, err)
    assert not (tmp_path / "x").exists()


def test_eval_folder_too_small_to_split(work, tmp_path, capsys):
    root = tmp_path / "one"
    (root / "a_red_circle").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "a_red_circle" / "0.png")
    rc, out, err = run_cli(capsys, "eval", "--model", work["model_a"], "--tgem", work["tgem_cls"],
                           "--data", f"folder:{root}", "--quiet", "--no-speed", "--json", tmp_path / "o.json")
    assert "--calib" in assert_one_line_error(rc, err)
    assert not (tmp_path / "o.json").exists()


def test_file_mode_refuses_a_jobs_options(tmp_path, capsys):
    """--engine, --workers and the other streamed-job options, given with image files, are refused in one line
    (they would be silently ignored), as --scheduler is."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    base = ["classify", "--labels", "a red circle,a blue star", "--quiet"]
    for extra, said in ((["--engine", "ray"], "--engine ray"), (["--workers", "4"], "--workers 4"),
                        (["--concurrency", "2"], "--concurrency 2"), (["--scheduler", "depth"], "--scheduler depth")):
        rc, out, err = run_cli(capsys, *base, *extra, img)
        assert assert_one_line_error(rc, err) == f"tgems: error: {said} is for a streamed job (--data SPEC --out DIR)"
        assert out == ""


def test_calibrate_checks_the_classes_before_encoding(tmp_path, capsys, monkeypatch):
    """Calibration images of classes outside the label set are refused before any image is encoded, with the
    --label-free hint (the README's example)."""
    import tgems.classifier

    def no_encoding(*a, **k):
        raise AssertionError("encoded before the classes were checked")

    monkeypatch.setattr(tgems.classifier, "extract_features", no_encoding)
    rc, _, err = run_cli(capsys, "calibrate", "--labels", "a red circle,a blue star", "--calib", "scenes:calib:200",
                         "--budget", "0.5", "--out", tmp_path / "c", "--quiet")
    line = assert_one_line_error(rc, err)
    assert "outside the label set" in line and "--label-free" in line
    assert not (tmp_path / "c").exists()


def test_fit_disk_full_is_one_line(tmp_path, capsys, monkeypatch):
    """A full disk under fit is a user error in one line (where, that finished files are whole, rerun)."""
    import errno

    import tgems.training.fit

    out = tmp_path / "tgem"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "tgem.safetensors"))

    monkeypatch.setattr(tgems.training.fit, "fit_and_save", full)
    rc, _, err = run_cli(capsys, "fit", "--data", "scenes:train:64", "--out", out, "--quiet")
    line = assert_one_line_error(rc, err)
    assert rc == 2 and f"no space left on the device writing {out / 'tgem.safetensors'}" in line and "rerun" in line
