"""Batch jobs: streamed rows equal in-memory predict, resume after SIGKILL, settings check, bad inputs, CLI job."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from stream_helpers import (clf, spec,  # noqa: F401 (shared fixtures)
                            LABELS, kill_after_first_part, decoded, encode, make_folder, make_parquet, make_shards, read_parts,
                            scene_images, tgem_checkpoint, truncated_jpeg)

from tgems.batch import run_command
from tgems.jobs.runner import run_job
from tgems.spec import JobSpec, PredictorSpec
from tgems.spec import predictor_settings
from tgems.cli import main
from tgems.errors import TGEMError
from tgems.jobs.stages import reader_geometry

N = 60


@pytest.fixture(scope="module")
def imgs():
    return scene_images(N)


def _source(kind, tmp_path, images, classes):
    """(spec, ids in stream order, the images as a reader of the files sees them)."""
    if kind == "folder":
        rels = make_folder(tmp_path / "f", images, classes)
        order = sorted(range(len(rels)), key=lambda i: rels[i])
        return f"folder:{tmp_path / 'f'}?block=25", [rels[i] for i in order], [images[i] for i in order]
    if kind == "webdataset":
        pattern, keys = make_shards(tmp_path / "wds", images, per_shard=20)
        return f"webdataset:{pattern}", keys, [decoded(encode(im, "JPEG")) for im in images]
    ids = make_parquet(tmp_path / "x.parquet", images)
    return f"parquet:{tmp_path / 'x.parquet'}", ids, images


@pytest.mark.parametrize("kind", ["folder", "webdataset", "parquet"])
def test_streamed_classification_equals_in_memory_predict(kind, tmp_path, clf, spec, imgs):
    data, ids, images = _source(kind, tmp_path, *imgs)
    assert reader_geometry(clf) == clf.backbone.transform.geometry  # the workers resize and crop
    summary = run_job(clf, JobSpec(data=data, out=str(tmp_path / "out"), batch_size=16, workers=2),
                      settings=predictor_settings(clf), progress=False)
    t = read_parts(tmp_path / "out")
    pred = clf.predict(images)
    assert t.column("id").to_pylist() == ids
    assert t.column("label").to_pylist() == pred.labels
    assert np.array_equal(t.column("exit_layer").to_numpy(), pred.exit_layers)
    assert np.array_equal(t.column("label_index").to_numpy(), pred.indices)
    np.testing.assert_allclose(t.column("probability").to_numpy(), pred.probs.max(1), atol=1e-5)
    np.testing.assert_allclose(t.column("flops_ratio").to_numpy(), pred.flops_ratio, rtol=1e-6)
    top = t.column("top5_labels").to_pylist()
    assert [r[0] for r in top] == pred.labels and all(len(r) == 5 for r in top)
    probs5 = np.array(t.column("top5_probs").to_pylist())
    assert (np.diff(probs5, axis=1) <= 0).all()
    assert len(set(pred.exit_layers.tolist())) > 1  # the exits really vary, so the comparison means something
    assert summary["images"] == N and summary["errors"] == 0
    assert summary["exit_layers"] == {str(l): int(c) for l, c in zip(*np.unique(pred.exit_layers, return_counts=True))}
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert success["images"] == N and success["settings"]["data"] == data
    assert len(pq.read_table(tmp_path / "out" / "_errors.parquet")) == 0


def test_images_resized_and_cropped_in_the_workers_give_the_in_memory_rows(tmp_path, clf, spec, imgs):
    """Images larger than the model's input, not square: the workers resize and crop them (the backbone's
    own geometry), the main process normalises; rows equal predict on the full-size PIL images."""
    from PIL import Image

    images, classes = imgs
    big = [im.resize((61 + i % 5, 45 + i % 3), Image.BICUBIC) for i, im in enumerate(images[:24])]
    data, ids, order = _source("folder", tmp_path, big, classes[:24])
    for task in ("classify", "embed"):
        summary = run_job(clf, JobSpec(data=data, out=str(tmp_path / task), task=task, batch_size=8, workers=2),
                          settings=predictor_settings(clf), progress=False)
        t = read_parts(tmp_path / task)
        pred = clf.predict(order)
        assert t.column("id").to_pylist() == ids
        assert np.array_equal(t.column("exit_layer").to_numpy(), pred.exit_layers)
        if task == "classify":
            assert t.column("label").to_pylist() == pred.labels
            np.testing.assert_allclose(t.column("probability").to_numpy(), pred.probs.max(1), atol=1e-6)
        else:
            emb = np.array(t.column("embedding").to_pylist(), dtype=np.float32)
            # float32 rounding of another batch composition: a few ulp of embeddings up to |3.3| (rtol 1e-6)
            np.testing.assert_allclose(emb, np.asarray(pred.embeddings), rtol=1e-6, atol=1e-6)
        stages = json.loads((tmp_path / task / "_SUCCESS").read_text())["stages"]
        assert set(stages) >= {"read_s", "decode_s", "preprocess_s", "normalize_s", "encode_s", "write_s",
                               "wait_s", "reader_wait_s"}
        assert summary["stages"] == stages


def test_embed_writes_the_exit_embedding(tmp_path, clf, spec, imgs):
    images, classes = imgs
    data, ids, images = _source("folder", tmp_path, images[:30], classes[:30])
    run_job(clf, JobSpec(data=data, out=str(tmp_path / "out"), task="embed", batch_size=8, workers=0),
            settings=predictor_settings(clf), progress=False)
    t = read_parts(tmp_path / "out")
    assert t.schema.names == ["id", "source_label", "embedding", "exit_layer", "flops_ratio"]
    assert t.schema.field("embedding").type.value_type == "float"
    pred = clf.predict(images)
    emb = np.array(t.column("embedding").to_pylist(), dtype=np.float32)
    assert np.array_equal(t.column("exit_layer").to_numpy(), pred.exit_layers)
    ref = getattr(pred, "embeddings", None)
    if ref is None:
        from tgems.engine import run_early_exit

        ref = run_early_exit(clf.backbone, clf.backbone.preprocess(images), clf.policy()).features.numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    # the embedding is the readout at the exit layer, not the full model's
    full = clf.backbone.encode_image(clf.backbone.preprocess(images)).numpy()
    early = pred.exit_layers < clf.backbone.num_layers
    assert early.any() and not np.allclose(emb[early], full[early], atol=1e-3)


def test_rerun_skips_finished_parts_and_other_settings_are_refused(tmp_path, clf, spec, imgs):
    data, _, _ = _source("folder", tmp_path, *imgs)
    out = tmp_path / "out"
    first = run_job(clf, JobSpec(data=data, out=str(out), batch_size=16, workers=0),
                    settings=predictor_settings(clf), progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = run_job(clf, JobSpec(data=data, out=str(out), batch_size=16, workers=0),
                    settings=predictor_settings(clf), progress=False)
    assert again["parts_skipped"] == 3 and again["parts_written"] == 0 and again["images"] == first["images"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stamps
    with pytest.raises(TGEMError, match=r"holds another job \(different batch_size\)"):
        run_job(clf, JobSpec(data=data, out=str(out), batch_size=8, workers=0),
                settings=predictor_settings(clf), progress=False)
    other = PredictorSpec(tgem=tgem_checkpoint(), labels=list(LABELS[:-1])).check().build()
    with pytest.raises(TGEMError, match=r"holds another job \(different predictor.labels"):
        run_job(clf, JobSpec(data=data, out=str(out), batch_size=16, workers=0),
                settings=predictor_settings(other), progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    with pytest.raises(TGEMError, match="holds no tgems job"):
        run_job(clf, JobSpec(data=data, out=str(tmp_path / "foreign")),
                settings=predictor_settings(clf), progress=False)
    # an object without settings is fingerprinted by its state: another threshold is another job
    run_job(clf, JobSpec(data=data, out=str(tmp_path / "obj"), batch_size=16, workers=0),
            progress=False)
    other_clf = PredictorSpec(tgem=tgem_checkpoint(), labels=list(LABELS), tau=clf.tau + 0.5).check().build()
    with pytest.raises(TGEMError, match="holds another job"):
        run_job(other_clf, JobSpec(data=data, out=str(tmp_path / "obj"), batch_size=16, workers=0),
                progress=False)


KILLED_JOB = """
import sys, time
import torch
torch.set_num_threads(1)  # as the test process (conftest): bit-equal floats need the same thread count
from tgems.jobs.runner import run_job
from tgems.spec import JobSpec, PredictorSpec, predictor_settings
spec = PredictorSpec(tgem={tgem!r}, labels={labels!r}).check()
clf = spec.build()

class Slow:  # slows the job so the test can kill it between parts
    labels = clf.labels
    backbone = clf.backbone  # so the workers preprocess, as for the classifier itself
    def predict(self, images):
        time.sleep(0.1)
        return clf.predict(images)

run_job(Slow(), JobSpec(data={data!r}, out={out!r}, batch_size=5, workers=1), settings=predictor_settings(clf),
        progress=False)
"""


def test_killed_job_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path, clf, spec, imgs):
    images, classes = imgs
    pattern, _ = make_shards(tmp_path / "wds", images, per_shard=10)
    data = f"webdataset:{pattern}"
    out = tmp_path / "killed"
    script = KILLED_JOB.format(tgem=tgem_checkpoint(), labels=list(LABELS), data=data, out=str(out))
    done = kill_after_first_part(script, out)
    resumed = run_job(clf, JobSpec(data=data, out=str(out), batch_size=5, workers=1),
                      settings=predictor_settings(clf), progress=False)
    assert resumed["parts_skipped"] == len(done) and resumed["parts"] == 6
    reference = run_job(clf, JobSpec(data=data, out=str(tmp_path / "whole"), batch_size=5, workers=1),
                        settings=predictor_settings(clf), progress=False)
    assert read_parts(out).equals(read_parts(tmp_path / "whole"))
    assert resumed["images"] == reference["images"] == N
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _stat(pid) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the state first, the parent pid next), or None
    once the process is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and (f := _stat(d)) and int(f[1]) == pid]


def _state(pid: int) -> str:
    f = _stat(pid)
    try:
        command = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:120]
    except OSError:
        command = ""
    return "gone" if f is None else f"{f[0]} {command}"


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks: with the pid, it names one process even if the pid is reused."""
    f = _stat(pid)
    return None if f is None else f[19]


def _alive(pid: int, started: str | None = None) -> bool:
    f = _stat(pid)
    return f is not None and f[0] != "Z" and (started is None or f[19] == started)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_job_leaves_no_worker_and_no_traceback(tmp_path, imgs):
    """SIGKILL to the job alone (not its process group): its decoding workers end by themselves, quietly."""
    images, classes = imgs
    pattern, _ = make_shards(tmp_path / "wds", images, per_shard=10)
    out = tmp_path / "killed"
    script = KILLED_JOB.format(tgem=tgem_checkpoint(), labels=list(LABELS), data=f"webdataset:{pattern}",
                               out=str(out)).replace("workers=1", "workers=2")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers = {}
    try:
        deadline = time.time() + 120
        while not (out / "part-00000.parquet").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the job wrote no part in time"
            time.sleep(0.02)
        workers = {pid: _started(pid) for pid in _children(proc.pid)}
        assert len(workers) >= 2
        proc.kill()
        try:
            _, err = proc.communicate(timeout=60)  # end of file on stderr: every worker has closed it
            closed = "closed"
        except subprocess.TimeoutExpired:
            err, closed = b"", "still open after 60 s"
        settle = time.time() + 10  # a worker that has closed its pipes may not yet be a zombie in /proc
        while (survivors := [p for p, t in workers.items() if _alive(p, t)]) and time.time() < settle:
            time.sleep(0.05)
        states = {pid: _state(pid) for pid in survivors}
    finally:
        for pid in _children(proc.pid) + [proc.pid] + [p for p, t in workers.items() if _alive(p, t)]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert survivors == [], f"workers alive 10 s after the job's stderr was {closed}: {states}"
    text = err.decode(errors="replace")
    assert "Traceback" not in text and "BrokenPipe" not in text and "leaked" not in text, text[-2000:]


def test_bad_inputs_are_listed_and_the_command_exits_non_zero(tmp_path, capsys, imgs):
    images, classes = imgs
    root = tmp_path / "f"
    make_folder(root, images[:20], classes[:20])
    (root / "broken").mkdir()
    (root / "broken" / "cut.jpg").write_bytes(truncated_jpeg(images[0]))
    (root / "broken" / "text.png").write_text("I am a text file")
    (root / "broken" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    rc = main(["classify", "--data", f"folder:{root}", "--out", str(out), "--tgem", tgem_checkpoint(),
               "--labels", ",".join(LABELS), "--workers", "1", "--batch-size", "8", "--quiet",
               "--json", str(tmp_path / "summary.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("tgems: error: 3 inputs could not be read")
    errors = pq.read_table(out / "_errors.parquet").to_pylist()
    reasons = {e["id"]: e["reason"] for e in errors}
    assert set(reasons) == {"broken/cut.jpg", "broken/text.png", "broken/empty.jpg"}
    assert "truncated" in reasons["broken/cut.jpg"].lower()
    assert "not an image" in reasons["broken/text.png"] and "empty" in reasons["broken/empty.jpg"]
    t = read_parts(out)
    assert t.num_rows == 20 and not set(reasons) & set(t.column("id").to_pylist())
    assert json.loads((tmp_path / "summary.json").read_text())["errors"] == 3
    # a parquet row with null bytes: the same
    make_parquet(tmp_path / "x.parquet", images[:10], null_rows={3})
    summary, code = run_command(data=f"parquet:{tmp_path / 'x.parquet'}", out=str(tmp_path / "pq"),
                                tgem=tgem_checkpoint(), labels=LABELS, workers=0, quiet=True)
    assert code == 1 and summary["errors"] == 1 and summary["images"] == 9
    assert pq.read_table(tmp_path / "pq" / "_errors.parquet").to_pylist()[0]["reason"] == "no image bytes (null)"


def test_full_disk_is_one_line_and_a_rerun_resumes(tmp_path, capsys, imgs, monkeypatch):
    """A full disk while a part is committed: one line (the folder, parts done, rerun resumes), no partial part;
    the rerun, with space, ends with the rows of an uninterrupted job."""
    import errno

    import tgems.jobs.writer

    images, classes = imgs
    make_folder(tmp_path / "f", images[:12], classes[:12])
    args = ["classify", "--data", f"folder:{tmp_path / 'f'}?block=4", "--tgem", tgem_checkpoint(),
            "--labels", ",".join(LABELS), "--workers", "0", "--batch-size", "4", "--quiet"]
    real, calls = tgems.jobs.writer.commit, []

    def commit(tmp, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, path)

    monkeypatch.setattr(tgems.jobs.writer, "commit", commit)
    out = tmp_path / "out"
    rc = main([*args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"tgems: error: no space left on the device of {out}: 1 of 3 parts are done (kept "
                               f"whole); free space and rerun the same command to resume"]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(tgems.jobs.writer, "commit", real)
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert read_parts(out).equals(read_parts(tmp_path / "whole"))


def test_missing_shard_or_unreadable_parquet_fails_before_any_work(tmp_path, capsys, imgs):
    images, _ = imgs
    pattern, _ = make_shards(tmp_path / "wds", images[:20], per_shard=10)
    os.remove(tmp_path / "wds" / "shard-000001.tar")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    cases = {f"webdataset:{pattern}": "shard-000001.tar does not exist",
             f"parquet:{tmp_path / 'junk.parquet'}": "cannot read parquet file"}
    for data, why in cases.items():
        out = tmp_path / "out"
        rc = main(["classify", "--data", data, "--out", str(out), "--tgem", tgem_checkpoint(), "--labels",
                   ",".join(LABELS), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("tgems: error: ") and why in err[0]
        assert not out.exists()


def test_saved_classifier_directory(tmp_path, clf, imgs):
    import tgems

    if not hasattr(tgems.EarlyExitClassifier, "save"):
        pytest.skip("this tgems has no EarlyExitClassifier.save yet")
    clf.save(tmp_path / "clf")
    data, ids, images = _source("parquet", tmp_path, *imgs)
    summary, code = run_command(data=data, out=str(tmp_path / "out"), classifier=str(tmp_path / "clf"), quiet=True,
                                workers=0)
    t = read_parts(tmp_path / "out")
    pred = clf.predict(images)
    assert code == 0 and t.column("label").to_pylist() == pred.labels
    assert np.array_equal(t.column("exit_layer").to_numpy(), pred.exit_layers)
    assert summary["settings"]["predictor"]["weights"] == predictor_settings(clf)["weights"]


def test_core_package_does_not_import_ray():
    code = ("import sys, tgems, tgems.batch, tgems.jobs.sources, tgems.integrations; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tgems_cli_classify_data_and_embed(tmp_path, capsys, imgs):
    from tgems.cli import main as tgems_main

    images, classes = imgs
    make_folder(tmp_path / "f", images[:12], classes[:12])
    common = ["--data", f"folder:{tmp_path / 'f'}", "--tgem", tgem_checkpoint(), "--labels", ",".join(LABELS),
              "--workers", "0", "--quiet"]
    assert tgems_main(["classify", *common, "--out", str(tmp_path / "c")]) == 0
    assert tgems_main(["embed", *common, "--out", str(tmp_path / "e")]) == 0
    c, e = read_parts(tmp_path / "c"), read_parts(tmp_path / "e")
    assert c.num_rows == e.num_rows == 12 and "embedding" in e.column_names and "label" in c.column_names
    assert c.column("exit_layer").equals(e.column("exit_layer"))
    capsys.readouterr()
    assert tgems_main(["classify", *common, "--out", str(tmp_path / "x"), str(tmp_path / "f" / "a.png")]) == 2
    assert "not both" in capsys.readouterr().err
    assert tgems_main(["classify", *common]) == 2  # --data without --out
    assert "--data SPEC and --out DIR" in capsys.readouterr().err
