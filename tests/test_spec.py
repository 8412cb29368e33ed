"""One predictor spec for every entry point: checked once, fingerprinted from the built predictor; portable
saved classifiers; a light `import tgems`; result folders that read back as their rows."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import assert_one_line_error, run_cli
from stream_helpers import (clf, spec,  # noqa: F401 (shared fixtures)
                            LABELS, make_folder, read_parts, scene_images, tgem_checkpoint, truncated_jpeg)

from tgems.errors import TGEMError


@pytest.fixture(scope="module")
def imgs():
    return scene_images(12)


@pytest.fixture
def folder(tmp_path, imgs):
    make_folder(tmp_path / "f", *imgs)
    return f"folder:{tmp_path / 'f'}"


@pytest.fixture(scope="module")
def saved(clf, tmp_path_factory):
    return str(clf.save(tmp_path_factory.mktemp("saved") / "clf"))


# ------------------------------------------------------------------------ 19.1: the resume check sees every setting


def test_resume_with_a_saved_classifier_refuses_another_tau_budget_or_calib(tmp_path, capsys, saved, folder):
    out = tmp_path / "out"
    base = ["classify", "--classifier", saved, "--data", folder, "--out", out, "--workers", "0", "--quiet"]
    rc, _, err = run_cli(capsys, *base, "--tau", "2.0")
    assert rc == 0, err
    assert {r for r in read_parts(out).column("exit_layer").to_pylist()} == {12}
    line = assert_one_line_error(*run_cli(capsys, *base, "--tau", "0.0")[::2])
    assert "holds another job" in line and "tau" in line
    line = assert_one_line_error(*run_cli(capsys, *base, "--budget", "0.5", "--calib", "scenes:calib:120",
                                          "--label-free")[::2])
    assert "holds another job" in line and ("tau" in line or "calibration" in line)
    rc, _, err = run_cli(capsys, *base, "--tau", "2.0")  # the same settings still resume
    assert rc == 0, err
    assert {r for r in read_parts(out).column("exit_layer").to_pylist()} == {12}


def test_job_fingerprint_is_the_built_predictors(clf):
    from tgems.spec import predictor_settings

    a = predictor_settings(clf)
    assert a == predictor_settings(clf)
    assert predictor_settings(clf.with_tau(0.3))["tau"] != a["tau"]
    assert {"labels", "templates", "goal", "tau", "backbone", "dtype", "weights"} <= set(a)


# ------------------------------------------------------------------------ 19.2: portable saved classifiers


def test_saved_classifier_finds_its_backbone_from_another_directory(tmp_path, monkeypatch, tiny_clip_dir):
    from tgems.classifier import EarlyExitClassifier
    from tgems.pretrained import EMBEDDED_MODEL
    from tgems.spec import PredictorSpec

    root = tmp_path / "project"
    shutil.copytree(EMBEDDED_MODEL, root / "models" / "emb")
    monkeypatch.chdir(root)
    c = PredictorSpec(model="models/emb", tgem=tgem_checkpoint(), labels=list(LABELS)).check().build()
    c.save("classifiers/c1")
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "moved"
    shutil.move(str(root), str(moved))  # the whole project moved: the model is found next to the classifier
    loaded = EarlyExitClassifier.load(moved / "classifiers" / "c1")
    assert loaded.labels == list(LABELS) and loaded.backbone.fingerprint() == c.backbone.fingerprint()
    shutil.rmtree(moved / "models")
    with pytest.raises(TGEMError, match=r"--model.*backbone="):
        EarlyExitClassifier.load(moved / "classifiers" / "c1")
    ok = PredictorSpec(classifier=str(moved / "classifiers" / "c1"), model=str(EMBEDDED_MODEL)).check().build()
    assert ok.labels == list(LABELS)
    with pytest.raises(TGEMError, match="another backbone"):
        PredictorSpec(classifier=str(moved / "classifiers" / "c1"), model=str(tiny_clip_dir)).check().build()


def test_model_given_with_classifier_is_checked_not_ignored(tmp_path, capsys, saved, tiny_clip_dir, imgs):
    images, _ = imgs
    images[0].save(tmp_path / "a.png")
    line = assert_one_line_error(*run_cli(capsys, "classify", "--classifier", saved, "--model", tiny_clip_dir,
                                          tmp_path / "a.png")[::2])
    assert "another backbone" in line


# ------------------------------------------------------------------------ 19.3: file and stream mode, one check


@pytest.mark.parametrize("extra, why", [
    (["--labels", "a red circle"], "at least two"),
    (["--labels", ",".join(LABELS), "--budget", "0.5", "--calib", "scenes:calib:60", "--tau", "0.5"], "--tau"),
    (["--labels", ",".join(LABELS), "--budget", "0.5"], "--calib"),
])
def test_file_and_stream_mode_refuse_the_same_settings(tmp_path, capsys, imgs, folder, extra, why):
    images, _ = imgs
    images[0].save(tmp_path / "a.png")
    file_line = assert_one_line_error(*run_cli(capsys, "classify", "--tgem", tgem_checkpoint(), *extra,
                                               tmp_path / "a.png")[::2])
    stream_line = assert_one_line_error(*run_cli(capsys, "classify", "--tgem", tgem_checkpoint(), *extra,
                                                 "--data", folder, "--out", tmp_path / "o", "--quiet")[::2])
    assert why in file_line and file_line == stream_line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ 19.5: no torch for import or --help


def test_import_and_parser_import_no_torch():
    code = ("import sys, tgems, tgems.spec; from tgems.cli import build_parser; p = build_parser(); "
            "p.parse_args(['classify', '--labels', 'a,b', 'x.png']); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('tgems'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import sys; from tgems.cli import main\n"
                        "try:\n main(['classify', '--help'])\nexcept SystemExit: pass\n"
                        "assert 'torch' not in sys.modules"], capture_output=True, text=True)
    assert r.returncode == 0 and "--tau" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------------------ 23.2: a result folder reads as its rows


def test_result_folder_reads_back_as_the_predictions(tmp_path, capsys, imgs, folder):
    (tmp_path / "f" / "broken").mkdir()
    (tmp_path / "f" / "broken" / "cut.jpg").write_bytes(truncated_jpeg(imgs[0][0]))
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "classify", "--tgem", tgem_checkpoint(), "--labels", ",".join(LABELS),
                         "--data", folder, "--out", out, "--workers", "0", "--quiet")
    assert rc == 1 and "_errors.parquet" in err
    table = pq.read_table(out)
    assert table.num_rows == 12 and {"id", "label", "exit_layer"} <= set(table.column_names)
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(out)
    assert len(df) == 12 and sorted(df["id"]) == sorted(read_parts(out).column("id").to_pylist())
    assert pq.read_table(out / "_errors.parquet").column("id").to_pylist() == ["broken/cut.jpg"]
    assert not (out / "errors.parquet").exists()


# ------------------------------------------------------------------------ 23.8: settings checked


def test_workers_are_checked(tmp_path, capsys, folder):
    base = ["classify", "--tgem", tgem_checkpoint(), "--labels", ",".join(LABELS), "--data", folder, "--quiet"]
    line = assert_one_line_error(*run_cli(capsys, *base, "--out", tmp_path / "a", "--workers", "-1")[::2])
    assert "--workers" in line
    rc, _, err = run_cli(capsys, *base, "--out", tmp_path / "b", "--workers", "100000")
    assert rc == 0 and f"{os.cpu_count()}" in err and "workers" in err


def test_unreachable_budget_says_what_was_reachable(clf, scenes_calib_small):
    with pytest.warns(UserWarning, match=r"budget 0.01 .*reachable.*0\.\d+"):
        c = clf.calibrate(scenes_calib_small, budget=0.01, use_labels=False)
    assert c.calibration["reachable_budget"] > 0.01


@pytest.fixture(scope="module")
def scenes_calib_small():
    import tgems

    return tgems.load_dataset("scenes:calib:60")


def test_edited_label_text_in_a_saved_classifier_is_refused(tmp_path, clf):
    from tgems.classifier import EarlyExitClassifier

    path = clf.save(tmp_path / "c")
    cfg = json.loads((path / "classifier.json").read_text())
    cfg["labels"][0] = "a large dog"
    (path / "classifier.json").write_text(json.dumps(cfg))
    with pytest.raises(TGEMError, match=r"classifier.json.*label"):
        EarlyExitClassifier.load(path)


# ------------------------------------------------------------------------ the shape: one place per default


def test_cli_defaults_are_the_specs():
    from tgems.cli import build_parser
    from tgems.cli import specs_from_args
    from tgems.spec import PredictorSpec

    args = build_parser().parse_args(["classify", "--labels", "a,b", "--data", "folder:x", "--out", "o"])
    args.task = "classify"
    pred, job = specs_from_args(args)
    assert pred == PredictorSpec(labels="a,b")
    assert (job.workers, job.engine, job.concurrency, job.num_gpus, job.scheduler) == (2, "local", None, 0.0, "drop")
    args = build_parser().parse_args(["classify", "--labels", "a,b", "x.png"])
    assert specs_from_args(args) == (PredictorSpec(labels="a,b"), None)


def test_inference_modules_do_not_import_training():
    code = ("import sys, tgems.classifier, tgems.engine, tgems.jumper, tgems.spec, tgems.batch; "
            "assert not [m for m in sys.modules if m.startswith('tgems.training')], "
            "[m for m in sys.modules if m.startswith('tgems.training')]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_atomic_dir_swaps_without_a_moment_with_no_output(tmp_path, monkeypatch):
    """The old directory is swapped out, never deleted before the new one is in place."""
    import tgems.io as tio

    path = tmp_path / "model"
    with tio.atomic_dir(path, "m.json") as tmp:
        (tmp / "m.json").write_text("1")
    seen = []
    real_rmtree = tio.shutil.rmtree

    def watching_rmtree(p, *a, **kw):
        real_rmtree(p, *a, **kw)
        seen.append((path / "m.json").is_file())

    monkeypatch.setattr(tio.shutil, "rmtree", watching_rmtree)
    with tio.atomic_dir(path, "m.json") as tmp:
        (tmp / "m.json").write_text("2")
    assert (path / "m.json").read_text() == "2" and seen and all(seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("bad,reason", [
    ({"budget": 0.5, "max_drop": 0.1}, "give --budget or --max-drop, not both"),
    ({"out": None}, "give an output directory for the index"),
    ({"budget": 1.5}, "budget must be a number in (0, 1]"),
    ({"max_drop": 1.0}, "max-drop must be a number in (0, 1)"),
    ({"delta": 0.0}, "delta must be a number in (0, 1)"),
    ({"rank": 0}, "--rank must be an integer >= 1"),
    ({"n_calib": 0}, "--n-calib must be an integer >= 1"),
    ({"n": 0}, "--n must be an integer >= 1"),
    ({"workers": -1}, "--workers"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_index_spec_check_refuses_bad_options(bad, reason):
    from tgems.indexing import build_index
    from tgems.spec import IndexSpec

    spec = IndexSpec(**{"out": "o", **bad})
    with pytest.raises(TGEMError) as e:
        spec.check()
    assert reason in str(e.value)
    with pytest.raises(TGEMError, match=reason.split(" must")[0].replace("(", r"\(")):  # before any model loads
        build_index("no/such/model", out=spec.out, **{k: v for k, v in bad.items() if k != "out"})


def test_index_spec_check_returns_a_checked_copy(tmp_path):
    from tgems.spec import IndexSpec

    spec = IndexSpec(out=tmp_path, tgem=tmp_path, budget=1)
    checked = spec.check()
    assert checked.out == str(tmp_path) and checked.tgem == str(tmp_path) and type(checked.budget) is float
    assert spec.out == tmp_path  # frozen: the given spec is left as it was
