"""Ray: the map_batches predictor and `--engine ray` give the rows of the single-process run, resume shard by
shard after a SIGKILL, refuse what the cluster cannot do in one line, and stay quiet with --quiet.

One local Ray (2 CPUs) is shared by the module (starting one takes seconds); `-m "not ray"` skips these."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:  # only the missing extra skips: CI installs it
    pytest.skip('the ray extra is not installed (pip install "tgems[ray]")', allow_module_level=True)

import pyarrow as pa
import pyarrow.parquet as pq
from stream_helpers import (clf, spec,  # noqa: F401 (shared fixtures)
                            LABELS, kill_after_first_part, encode, make_folder, read_parts, scene_images, tgem_checkpoint,
                            truncated_jpeg)

from tgems.batch import run_command
from tgems.jobs.runner import run_job
from tgems.spec import JobSpec, PredictorSpec, predictor_settings
from tgems.errors import TGEMError
from tgems.integrations.ray import TGEMPredictor, _units, plan_actors, run_ray_job

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.join(os.path.dirname(__file__), "..", "src"),
                                                    os.path.dirname(__file__), env.get("PYTHONPATH")] if p)
    return env


def _ray_running_on_this_machine() -> bool:
    """`--address auto` joins any running GCS server it sees (Ray's legacy rule), whoever started it."""
    for p in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            if "gcs_server" in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace"):
                return True
        except OSError:
            pass
    return False


def test_no_cluster_at_address_auto_is_one_line_and_leaves_nothing(tmp_path):
    """Before the module's Ray starts; a private TMPDIR so `auto` cannot find another Ray's address file."""
    if ray.is_initialized() or _ray_running_on_this_machine():
        pytest.skip("a Ray cluster runs on this machine: --address auto would join it")
    images, classes = scene_images(4)
    make_folder(tmp_path / "f", images, classes)
    env = _env()
    env["TMPDIR"] = env["RAY_TMPDIR"] = str(tmp_path / "tmp")
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tgems.cli", "classify", "--data", f"folder:{tmp_path / 'f'}",
                        "--out", str(out), "--tgem", tgem_checkpoint(), "--labels", ",".join(LABELS),
                        "--engine", "ray", "--address", "auto", "--quiet"], env=env, capture_output=True, text=True,
                       timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("tgems: error: cannot reach a Ray cluster at --address auto")
    assert not out.exists()


def test_a_small_job_runs_locally_without_starting_ray(tmp_path, spec, clf, capsys):
    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    images, classes = scene_images(12)
    rels = make_folder(tmp_path / "f", images, classes)
    summary = run_ray_job(spec, JobSpec(data=f"folder:{tmp_path / 'f'}", out=str(tmp_path / "out"), batch_size=8,
                                        workers=0), progress=True)
    assert "running locally" in capsys.readouterr().err and not ray.is_initialized()
    assert summary["engine"] == "local" and summary["images"] == 12
    order = sorted(range(12), key=lambda i: rels[i])
    assert read_parts(tmp_path / "out").column("label").to_pylist() == clf.predict([images[i] for i in order]).labels


def test_actors_and_threads_from_the_cpus():
    assert plan_actors(2, 0, None, 0)[:2] == (2, 1)
    assert plan_actors(16, 0, None, 0)[:2] == (8, 2)
    assert plan_actors(2, 0, 8, 0)[:2] == (2, 1)  # never more actors than CPUs: they would wait forever
    assert plan_actors(8, 0, 2, 0)[:2] == (2, 4)
    assert plan_actors(16, 4, None, 1)[:2] == (4, 4)


def test_predictor_takes_bytes_or_arrays(spec, clf):
    images, _ = scene_images(12)
    pred = clf.predict(images)
    p = TGEMPredictor(dataclasses.asdict(spec))
    data = [encode(im, "PNG") for im in images]
    data[4] = b"not an image"
    out = p(pa.table({"id": [f"k{i}" for i in range(12)], "bytes": pa.array(data, pa.binary())}))
    good = out.filter(pa.compute.is_null(out.column("error")))
    keep = [i for i in range(12) if i != 4]
    assert good.column("id").to_pylist() == [f"k{i}" for i in keep]
    assert good.column("label").to_pylist() == [pred.labels[i] for i in keep]
    assert np.array_equal(good.column("exit_layer").to_numpy(), pred.exit_layers[keep])
    bad = out.filter(pa.compute.is_valid(out.column("error"))).to_pylist()
    assert [b["id"] for b in bad] == ["k4"] and "not an image" in bad[0]["error"]
    # uint8 arrays, as ray.data.read_images gives them, in the numpy batch format
    arrays = np.stack([np.asarray(im) for im in images])
    out = p({"image": arrays, "path": np.array([f"p{i}" for i in range(12)])})
    assert out.column("label").to_pylist() == pred.labels
    assert out.column("id").to_pylist() == [f"p{i}" for i in range(12)]
    # the image column is chosen as the local parquet reader chooses it ('image' before 'bytes')
    out = p(pa.table({"id": ["a", "b"], "bytes": pa.array([b"junk", b"junk"], pa.binary()),
                      "image": pa.array(data[:2], pa.binary())}))
    assert out.column("error").null_count == 2 and out.column("label").to_pylist() == pred.labels[:2]


def test_ray_engine_gives_the_rows_of_the_local_run(tmp_path, local_ray, spec, clf, capsys):
    images, classes = scene_images(100)
    root = tmp_path / "f"
    make_folder(root, images, classes)
    (root / "zz_bad.jpg").write_bytes(truncated_jpeg(images[0]))
    data = f"folder:{root}?block=25"
    local = run_job(clf, JobSpec(data=data, out=str(tmp_path / "local"), batch_size=16, workers=0),
                    settings=predictor_settings(clf), progress=False)
    summary, code = run_command(data=data, out=str(tmp_path / "ray"), tgem=tgem_checkpoint(), labels=LABELS,
                                engine="ray", batch_size=16, quiet=True)
    assert code == 1 and summary["engine"] == "ray"
    assert summary["images"] == local["images"] == 100 and summary["errors"] == local["errors"] == 1
    a, b = read_parts(tmp_path / "local"), read_parts(tmp_path / "ray")
    assert sorted(p.name for p in (tmp_path / "ray").glob("part-*")) == [f"part-0000{i}.parquet" for i in range(5)]
    assert a.schema == b.schema
    for col in ("id", "source_label", "label", "label_index", "exit_layer", "top5_labels"):
        assert a.column(col).equals(b.column(col)), col  # same rows, same order
    np.testing.assert_allclose(a.column("probability").to_numpy(), b.column("probability").to_numpy(), atol=1e-5)
    assert pq.read_table(tmp_path / "ray" / "_errors.parquet").column("id").to_pylist() == ["zz_bad.jpg"]
    assert summary["exit_layers"] == local["exit_layers"]
    assert {"ray_startup_s", "encode_s", "decode_s", "write_s"} <= set(summary["stages"])
    assert not [p for p in (tmp_path / "ray").rglob("*") if p.name.endswith(".tmp")]
    # a finished Ray job is not redone
    again = run_ray_job(spec, JobSpec(data=data, out=str(tmp_path / "ray"), batch_size=16),
                        progress=True)
    assert again["images"] == 100 and again["parts_written"] == 0 and again["parts_skipped"] == 5
    assert "Ray: 2 actors x 1 threads (2 CPUs)" in capsys.readouterr().err
    # a job of fewer than two batches per actor runs locally, and says so
    small = run_ray_job(spec, JobSpec(data=f"folder:{root}", out=str(tmp_path / "small"), batch_size=32),
                        progress=True)
    assert "running locally" in capsys.readouterr().err and small["engine"] == "local" and small["images"] == 100


def test_ray_engine_with_depth_queues_gives_the_rows_of_the_local_depth_run(tmp_path, local_ray, spec, clf):
    """`--scheduler depth` on Ray: each actor runs a folder block whole through its depth queues, so the rows
    are the local depth run's (and the drop path's), in the same order."""
    images, classes = scene_images(100)
    make_folder(tmp_path / "f", images, classes)
    data = f"folder:{tmp_path / 'f'}?block=50"
    run_job(clf, JobSpec(data=data, out=str(tmp_path / "local"), batch_size=16, workers=0, scheduler="depth"),
            settings=predictor_settings(clf), progress=False)
    summary, code = run_command(data=data, out=str(tmp_path / "ray"), tgem=tgem_checkpoint(), labels=LABELS,
                                engine="ray", batch_size=16, quiet=True, scheduler="depth")
    assert code == 0 and summary["engine"] == "ray" and summary["settings"]["scheduler"] == "depth"
    a, b = read_parts(tmp_path / "local"), read_parts(tmp_path / "ray")
    for col in ("id", "label", "label_index", "exit_layer", "flops_ratio", "top5_labels"):
        assert a.column(col).equals(b.column(col)), col
    np.testing.assert_allclose(a.column("probability").to_numpy(), b.column("probability").to_numpy(), atol=1e-5)
    assert len(set(a.column("exit_layer").to_pylist())) > 3


def test_calibrated_ray_job_calibrates_once_and_gives_the_local_rows(tmp_path, local_ray):
    """--budget on Ray: the driver calibrates once (one calibration in the log); the actors get the calibrated
    classifier saved, never the goal, so the rows are the local job's."""
    from tgems.integrations.ray import actor_payload, predictor_from_payload

    images, classes = scene_images(100)
    make_folder(tmp_path / "f", images, classes)
    goal = dict(data=f"folder:{tmp_path / 'f'}?block=25", tgem=tgem_checkpoint(), labels=LABELS, budget=0.5,
                calib="scenes:calib:150", label_free=True, batch_size=16, quiet=True)
    local_log, ray_log = [], []
    local, _ = run_command(out=str(tmp_path / "local"), workers=0, log=local_log.append, **goal)
    summary, code = run_command(out=str(tmp_path / "ray"), engine="ray", log=ray_log.append, **goal)
    assert code == 0 and summary["engine"] == "ray" and summary["actors"] == 2
    assert [m for m in ray_log if m.startswith("calibrated")] == [m for m in local_log if m.startswith("calibrated")]
    assert len([m for m in ray_log if m.startswith("calibrated")]) == 1
    assert summary["settings"]["predictor"] == local["settings"]["predictor"]
    a, b = read_parts(tmp_path / "local"), read_parts(tmp_path / "ray")
    for col in ("id", "label", "label_index", "exit_layer", "flops_ratio", "top5_labels"):
        assert a.column(col).equals(b.column(col)), col
    np.testing.assert_allclose(a.column("probability").to_numpy(), b.column("probability").to_numpy(), atol=1e-5)
    # what an actor receives: the saved classifier and no goal; asked to calibrate, it refuses
    spec = PredictorSpec(tgem=tgem_checkpoint(), labels=LABELS, budget=0.5, calib="scenes:calib:150",
                         label_free=True).check()
    clf = spec.build()
    payload = actor_payload(spec, clf)
    assert set(payload) == {"saved", "options"} and "budget" not in payload["options"]
    assert predictor_from_payload(payload).tau == clf.tau
    with pytest.raises(TGEMError, match="asked to calibrate"):
        predictor_from_payload({"options": spec.options()})
    assert actor_payload(PredictorSpec(labels=LABELS), None) == {"options": PredictorSpec(labels=LABELS).options()}


def test_depth_queues_take_folder_blocks_whole(tmp_path):
    """The drop path splits a folder block into pieces of whole batches (its batches do not depend on the
    split); the depth queues are drained at a piece's end, so a piece is the whole block, as locally."""
    from tgems.jobs.sources import open_source

    images, classes = scene_images(40)
    make_folder(tmp_path / "f", images, classes)
    source = open_source(f"folder:{tmp_path / 'f'}?block=30")
    drop = _units(source, source.shards, 4, 4, "drop")
    assert len(drop) > len(source.shards) and all(u["start"] % 4 == 0 for u in drop)  # pieces of whole batches
    assert _units(source, source.shards, 4, 4, "depth") == [{"shard": 0, "start": 0, "stop": 30},
                                                              {"shard": 1, "start": 0, "stop": 10}]


def test_num_gpus_on_a_cluster_without_gpus_is_refused(tmp_path, local_ray, spec):
    images, classes = scene_images(4)
    make_folder(tmp_path / "f", images, classes)
    with pytest.raises(TGEMError, match=r"--num-gpus 1 asks for GPUs, but the Ray cluster has 0") as e:
        run_ray_job(spec, JobSpec(data=f"folder:{tmp_path / 'f'}", out=str(tmp_path / "out"), num_gpus=1),
                    progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


KILLED_RAY_JOB = """
import time, ray
from tgems.integrations.ray import run_ray_job
from tgems.spec import JobSpec, PredictorSpec, predictor_settings

clf = PredictorSpec(tgem={tgem!r}, labels={labels!r}).check().build()

class Slow:  # the same classifier, slowed; sent to every actor as it is, so the test can kill the job between parts
    labels, backbone = clf.labels, clf.backbone
    def predict(self, images):
        time.sleep(0.3)
        return clf.predict(images)

run_ray_job(Slow(), JobSpec(data={data!r}, out={out!r}, batch_size=5, address={address!r}), progress=False,
            settings=predictor_settings(clf))
"""


def test_killed_ray_job_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path, local_ray, spec, clf):
    images, classes = scene_images(60)
    make_folder(tmp_path / "f", images, classes)
    data = f"folder:{tmp_path / 'f'}?block=10"
    out = tmp_path / "killed"
    script = KILLED_RAY_JOB.format(tgem=tgem_checkpoint(), labels=list(LABELS), data=data, out=str(out),
                                   address=ray.get_runtime_context().gcs_address)
    done = kill_after_first_part(script, out, env=_env(), timeout=180)
    assert json.loads((out / "_job.json").read_text())["engine"] == "ray"
    resumed = run_ray_job(spec, JobSpec(data=data, out=str(out), batch_size=5),
                          progress=False)
    assert resumed["parts_skipped"] == len(done) and resumed["parts"] == 6 and resumed["images"] == 60
    whole = run_job(clf, JobSpec(data=data, out=str(tmp_path / "whole"), batch_size=5, workers=0),
                    settings=predictor_settings(clf), progress=False)
    a, b = read_parts(out), read_parts(tmp_path / "whole")
    assert whole["images"] == 60 and a.column("id").equals(b.column("id"))
    for col in ("label", "label_index", "exit_layer", "top5_labels"):
        assert a.column(col).equals(b.column(col)), col
    np.testing.assert_allclose(a.column("probability").to_numpy(), b.column("probability").to_numpy(), atol=1e-5)


def test_quiet_silences_ray(tmp_path, local_ray):
    images, classes = scene_images(20)
    make_folder(tmp_path / "f", images, classes)
    r = subprocess.run([sys.executable, "-m", "tgems.cli", "classify", "--data", f"folder:{tmp_path / 'f'}",
                        "--out", str(tmp_path / "out"), "--tgem", tgem_checkpoint(), "--labels", ",".join(LABELS),
                        "--engine", "ray", "--address", ray.get_runtime_context().gcs_address, "--batch-size", "4",
                        "--quiet"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.strip() == "" and r.stdout.strip() == ""
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["engine"] == "ray"


def test_no_import_circle_between_batch_and_ray():
    """integrations/ray.py builds on tgems.jobs and the spec object it is given; it does not import tgems.batch."""
    code = "import sys, tgems.integrations.ray; assert 'tgems.batch' not in sys.modules, 'tgems.batch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
