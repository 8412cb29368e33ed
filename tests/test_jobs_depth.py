"""Batch jobs through depth queues (`--scheduler depth`, tgems.jobs.depth): the rows, their order, the errors
and the resume of the drop path, with every block on a full batch while images wait; options it cannot serve
refused in one line; no tensor made on a device other than its input's."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from stream_helpers import (clf, spec,  # noqa: F401 (shared fixtures)
                            LABELS, kill_after_first_part, make_folder, make_shards, read_parts, scene_images, tgem_checkpoint,
                            truncated_jpeg)
from torch.overrides import TorchFunctionMode

import tgems.scheduling.depth
from tgems.batch import run_command
from tgems.jobs.runner import run_job
from tgems.cli import main
from tgems.errors import TGEMError
from tgems.spec import JobSpec, predictor_settings

N = 60
EXACT = ("id", "source_label", "label", "label_index", "exit_layer", "flops_ratio", "top5_labels")


@pytest.fixture(scope="module")
def imgs():
    return scene_images(N)


@pytest.fixture
def folder(tmp_path, imgs):
    images, classes = imgs
    root = tmp_path / "f"
    make_folder(root, images, classes)
    (root / "zz_broken").mkdir()
    (root / "zz_broken" / "cut.jpg").write_bytes(truncated_jpeg(images[0]))
    return f"folder:{root}?block=25"


def _same_rows(a, b, task="classify"):
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for col in EXACT:
        if col in a.column_names:
            assert a.column(col).equals(b.column(col)), col
    if task == "classify":
        np.testing.assert_allclose(a.column("probability").to_numpy(), b.column("probability").to_numpy(), atol=1e-5)
        np.testing.assert_allclose(np.array(a.column("top5_probs").to_pylist()),
                                   np.array(b.column("top5_probs").to_pylist()), atol=1e-5)
    else:
        np.testing.assert_allclose(np.array(a.column("embedding").to_pylist()),
                                   np.array(b.column("embedding").to_pylist()), atol=1e-5)


class DeviceTrap(TorchFunctionMode):
    """Tensors made without a device (a factory call with no `device=`, not copying a tensor) land on the meta
    device, where they have no data: code that makes a tensor on a fixed device instead of its input's fails
    here as it would on a GPU (mixing devices, or reading a value that is not there)."""

    FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
                 torch.rand, torch.randn, torch.randint, torch.eye, torch.linspace}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None and not (args and isinstance(args[0], torch.Tensor)):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def test_the_device_trap_catches_a_tensor_made_without_the_inputs_device():
    x = torch.ones(3)
    with DeviceTrap():
        assert (x + torch.ones(3, device=x.device)).tolist() == [2.0, 2.0, 2.0]
        with pytest.raises((RuntimeError, NotImplementedError)):
            (x + torch.zeros(3)).tolist()
        with pytest.raises((RuntimeError, NotImplementedError)):
            bool(torch.zeros(1, dtype=torch.bool)[0])


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_depth_rows_equal_the_drop_rows(tmp_path, folder, clf, spec, task):
    drop = run_job(clf, JobSpec(data=folder, out=str(tmp_path / "drop"), task=task, batch_size=8, workers=1, scheduler="drop"),
                   settings=predictor_settings(clf), progress=False)
    with DeviceTrap():  # the depth path makes every tensor on its input's device
        depth = run_job(clf, JobSpec(data=folder, out=str(tmp_path / "depth"), task=task, batch_size=8, workers=1, scheduler="depth"),
                        settings=predictor_settings(clf), progress=False)
    a, b = read_parts(tmp_path / "drop"), read_parts(tmp_path / "depth")
    _same_rows(a, b, task)
    assert len(set(a.column("exit_layer").to_pylist())) > 3  # rows leave at many depths: the order is tested
    assert sorted(p.name for p in (tmp_path / "depth").glob("part-*")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert pq.read_table(tmp_path / "depth" / "_errors.parquet").equals(
        pq.read_table(tmp_path / "drop" / "_errors.parquet"))
    assert depth["errors"] == drop["errors"] == 1 and depth["images"] == drop["images"] == N
    assert depth["exit_layers"] == drop["exit_layers"]
    assert depth["fingerprint"] != drop["fingerprint"] and depth["settings"]["scheduler"] == "depth"
    assert "scheduler" not in drop["settings"]  # jobs of the drop path keep the fingerprint they had


def test_every_block_runs_a_full_batch_while_images_wait(tmp_path, imgs, clf, spec, monkeypatch):
    """Refilled from the stream: new images enter at layer 0 as rows exit, so no step waits for a chunk's
    slowest row; only the drain at the end of a shard runs partial batches."""
    made = []

    class Recording(tgems.scheduling.depth.DepthScheduler):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(tgems.scheduling.depth, "DepthScheduler", Recording)
    images, classes = imgs
    make_folder(tmp_path / "f", images, classes)
    run_job(clf, JobSpec(data=f"folder:{tmp_path / 'f'}", out=str(tmp_path / "out"), batch_size=4, workers=0, scheduler="depth"),
            settings=predictor_settings(clf), progress=False)
    (sched,) = made
    saturated = [o for o in sched.occupancy(saturated=True) if o is not None]
    assert len(saturated) >= 5 and all(o == 1.0 for o in saturated)  # depths 1..5 at least, full every step
    assert sched.stats["answered"] == N and sched.inflight == 0
    layers = read_parts(tmp_path / "out").column("exit_layer").to_numpy()
    assert sum(sched.stats["rows"]) == int(layers.sum())  # each row ran exactly the blocks up to its exit


KILLED_JOB = """
import time
import torch
torch.set_num_threads(1)  # as the test process (conftest): bit-equal floats need the same thread count
import tgems.scheduling.depth
from tgems.jobs.runner import run_job
from tgems.spec import JobSpec, PredictorSpec, predictor_settings
spec = PredictorSpec(tgem={tgem!r}, labels={labels!r}).check()
clf = spec.build()
step = tgems.scheduling.depth.DepthScheduler.step

def slow_step(self, flush=False):  # slows the job so the test can kill it between parts
    time.sleep(0.01)
    return step(self, flush)

tgems.scheduling.depth.DepthScheduler.step = slow_step
run_job(clf, JobSpec(data={data!r}, out={out!r}, batch_size=4, workers=1, scheduler="depth"),
        settings=predictor_settings(clf), progress=False)
"""


def test_killed_depth_job_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path, imgs, clf, spec):
    images, classes = imgs
    pattern, _ = make_shards(tmp_path / "wds", images, per_shard=10)
    data = f"webdataset:{pattern}"
    out = tmp_path / "killed"
    script = KILLED_JOB.format(tgem=tgem_checkpoint(), labels=list(LABELS), data=data, out=str(out))
    done = kill_after_first_part(script, out)
    with pytest.raises(TGEMError, match=r"holds another job \(different scheduler\)"):
        run_job(clf, JobSpec(data=data, out=str(out), batch_size=4, workers=1, scheduler="drop"),
                settings=predictor_settings(clf), progress=False)
    resumed = run_job(clf, JobSpec(data=data, out=str(out), batch_size=4, workers=1, scheduler="depth"),
                      settings=predictor_settings(clf), progress=False)
    assert resumed["parts_skipped"] == len(done) and resumed["parts"] == 6 and resumed["images"] == N
    run_job(clf, JobSpec(data=data, out=str(tmp_path / "whole"), batch_size=4, workers=1, scheduler="depth"),
            settings=predictor_settings(clf), progress=False)
    assert read_parts(out).equals(read_parts(tmp_path / "whole"))  # bit-equal, floats included
    run_job(clf, JobSpec(data=data, out=str(tmp_path / "drop"), batch_size=4, workers=1),
            settings=predictor_settings(clf), progress=False)
    _same_rows(read_parts(out), read_parts(tmp_path / "drop"))


def test_cli_scheduler_option_and_what_it_cannot_serve(tmp_path, capsys, imgs, clf):
    images, classes = imgs
    make_folder(tmp_path / "f", images[:12], classes[:12])
    common = ["--data", f"folder:{tmp_path / 'f'}", "--tgem", tgem_checkpoint(), "--labels", ",".join(LABELS),
              "--workers", "0", "--quiet", "--batch-size", "4"]
    assert main(["classify", *common, "--out", str(tmp_path / "depth"), "--scheduler", "depth",
                 "--json", str(tmp_path / "s.json")]) == 0
    assert main(["classify", *common, "--out", str(tmp_path / "drop")]) == 0
    _same_rows(read_parts(tmp_path / "depth"), read_parts(tmp_path / "drop"))
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["scheduler"] == "depth"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["classify", *common, "--out", str(tmp_path / "x"), "--scheduler", "fifo"])
    assert exit_.value.code == 2 and "invalid choice: 'fifo'" in capsys.readouterr().err
    # the scheduler is a streamed job's: image files named on the command line are refused with it
    rc = main(["classify", "--tgem", tgem_checkpoint(), "--labels", ",".join(LABELS), "--scheduler", "depth",
               str(tmp_path / "f" / "a.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["tgems: error: --scheduler depth is for a streamed job (--data SPEC --out DIR)"]
    # Python: an unknown scheduler, and a predictor the depth queues cannot run (predict only), in one line
    with pytest.raises(TGEMError, match="unknown scheduler 'fifo' \\(use drop or depth\\)"):
        JobSpec(data="folder:x", out="y", scheduler="fifo").check()
    with pytest.raises(TGEMError, match="unknown scheduler"):
        run_command(data=f"folder:{tmp_path / 'f'}", out=str(tmp_path / "y"), tgem=tgem_checkpoint(),
                    labels=LABELS, scheduler="fifo", quiet=True)

    class PredictOnly:
        labels = clf.labels

        def predict(self, images):
            return clf.predict(images)

    with pytest.raises(TGEMError, match="--scheduler depth needs an early-exit classifier .* got PredictOnly"):
        run_job(PredictOnly(), JobSpec(data=f"folder:{tmp_path / 'f'}", out=str(tmp_path / "z"), batch_size=4, workers=0, scheduler="depth"),
                progress=False)
    assert not (tmp_path / "z").exists()  # refused before the output directory is touched


def test_an_image_the_encoder_refuses_is_an_error_record_as_in_the_drop_path(tmp_path, imgs, clf):
    """Without a reader geometry the encoder gets decoded images and preprocesses them itself; a batch it
    refuses is retried image by image, so the one odd image is an error record and the rest are rows."""
    images, classes = imgs
    odd = list(images[:16])
    odd[5] = odd[5].resize((7, 7))
    make_folder(tmp_path / "f", odd, classes[:16])

    class Picky:
        """The embedded backbone, less its transform (so the readers only decode), refusing 7 px images."""

        transform = None

        def __getattr__(self, name):
            return getattr(clf.backbone, name)

        def preprocess(self, images):
            if any(im.size[0] == 7 for im in images):
                raise TGEMError("7 px is too small")
            return clf.backbone.preprocess(images)

    class Predictor:
        labels, backbone = clf.labels, Picky()

        def policy(self):
            return clf.policy()

        def predict(self, images):
            return clf.predict(self.backbone.preprocess(images))

    for scheduler in ("drop", "depth"):
        s = run_job(Predictor(), JobSpec(data=f"folder:{tmp_path / 'f'}", out=str(tmp_path / scheduler), batch_size=4, workers=0, scheduler=scheduler),
                    progress=False, settings={"picky": 1})
        assert s["errors"] == 1 and s["images"] == 15
    _same_rows(read_parts(tmp_path / "drop"), read_parts(tmp_path / "depth"))
    errors = pq.read_table(tmp_path / "depth" / "_errors.parquet")
    assert errors.equals(pq.read_table(tmp_path / "drop" / "_errors.parquet"))
    assert errors.column("reason").to_pylist() == ["cannot encode image: 7 px is too small"]


def _distilled_checkpoint(path) -> str:
    """The shipped cls modules with distilled readouts of z_l and the mean-patch readout (seeded maps near
    the identity, both readouts mixed) and Jumpers that read the trajectory signals: the issue-27 recipe,
    whatever the shipped checkpoint holds."""
    from tgems.backbones import load_backbone
    from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, NUM_TRAJ_SIGNALS, Jumper
    from tgems.tgem import RECIPE_BUFFERS, TGEM, load_tgem, save_tgem

    bb = load_backbone("embedded")
    main, jumper, cfg = load_tgem(tgem_checkpoint(), bb)
    tgem = TGEM(main.layers, main.num_layers, main.embed_dim, main.out_dim, main.space, main.hidden, "distilled",
                readout_patch=True)
    tgem.load_state_dict({k: v for k, v in main.state_dict().items() if k not in RECIPE_BUFFERS}, strict=False)
    g = torch.Generator().manual_seed(0)
    n, D = len(main.layers), main.embed_dim
    tgem.readout_weight.copy_(torch.cat([torch.eye(D) + 0.1 * torch.randn(n, D, D, generator=g),
                                         0.3 * torch.randn(n, D, D, generator=g)], 1))
    tgem.mix.copy_(torch.tensor([[0.6, 0.5]]).repeat(n, 1))

    def widen(j, extra):  # the trajectory weights replaced (a checkpoint fit without them has zeros there)
        base = j.weight[:, :NUM_SIGNALS + D + NUM_SET_SIGNALS]
        return Jumper(torch.cat([base, torch.tensor([extra]).repeat(n, 1)], 1), j.bias)

    both = widen(jumper, [0.0] * NUM_TRAJ_SIGNALS)
    both.budget, both.tau = widen(jumper.budget, [0.3, 1.0, 2.0]), jumper.tau
    return str(save_tgem(path, tgem, both, bb, {k: cfg[k] for k in ("templates", "settings")}))


def test_depth_rows_equal_the_drop_rows_with_distilled_readouts(tmp_path, folder):
    from tgems.spec import PredictorSpec

    clf_d = PredictorSpec(tgem=_distilled_checkpoint(tmp_path / "dist"), labels=list(LABELS)).check()
    model = clf_d.build()
    assert model.profiles.distilled and model.profiles.reads_patch
    for sched in ("drop", "depth"):
        run_job(model, JobSpec(data=folder, out=str(tmp_path / sched), task="classify", batch_size=8, workers=1,
                               scheduler=sched), settings=predictor_settings(model), progress=False)
    a, b = read_parts(tmp_path / "drop"), read_parts(tmp_path / "depth")
    _same_rows(a, b)
    assert len(set(a.column("exit_layer").to_pylist())) > 2
