"""Contrastive pretraining (tgems.training.pretrain) with the "tiny" preset: a few dozen steps on one thread."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tgems.training import pretrain as pt
from tgems.data import scenes
from tgems.errors import TGEMError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # pretrain(threads=1) sets the global torch thread count; tiny models are fastest on one
    # thread (and the machine may be busy), and the previous setting is restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(out, **kw):
    kw = {"preset": "tiny", "seed": 0, "progress": False, "threads": 1, **kw}
    return pt.pretrain(out, **kw)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _assert_same_weights(a, b, atol=0.0):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if atol:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(wa[k], wb[k]), k


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "m"
    info = _run(out, steps=40)
    return out, info


# ------------------------------------------------------------------ a short real run

def test_loss_goes_down(tiny_run):
    _, info = tiny_run
    log = info["log"]
    assert [e["step"] for e in log] == [0, 25, 39]
    losses = [e["loss"] for e in log]
    assert all(np.isfinite(losses))
    assert np.mean(losses[1:]) < losses[0]
    assert losses[-1] < losses[0] - 0.2


def test_record(tiny_run):
    out, info = tiny_run
    rec = json.loads((out / "pretrain.json").read_text())
    assert rec == info
    recipe = asdict(pt.PRESETS["tiny"])
    recipe["steps"] = 40
    assert rec["recipe"] == recipe
    assert rec["preset"] == "tiny" and rec["seed"] == 0 and rec["data"] == "scenes:train"
    assert rec["samples_seen"] == 40 * recipe["batch_size"]
    assert rec["threads"] == 1
    assert "--preset tiny" in rec["command"] and "--seed 0" in rec["command"]


def test_output_directory(tiny_run):
    out, _ = tiny_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "pretrain.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists()  # removed at the end by default
    assert not out.with_name(out.name + ".tmp").exists()


def test_loads_as_a_standard_hf_clip(tiny_run):
    from transformers import AutoTokenizer, CLIPModel

    out, _ = tiny_run
    model = CLIPModel.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert cfg.vision_config.image_size == 32 and cfg.vision_config.num_hidden_layers == 4
    assert cfg.projection_dim == pt.PRESETS["tiny"].projection_dim
    assert cfg.text_config.vocab_size == len(tok)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)
    assert cfg.text_config.eos_token_id == 3

    data = scenes.generate("test", 0, 8)
    texts = list(scenes.CLASSES[:5]) + data.captions[:3]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert tok.unk_token_id not in batch["input_ids"]
    with torch.no_grad():
        img = _feat(model.get_image_features(pixel_values=pt.pixels_from_uint8(data.images)))
        txt = _feat(model.get_text_features(**batch))
        # features are pooled at the eos token: padding a text does not change its embedding
        alone = _feat(model.get_text_features(**tok(texts[:1], return_tensors="pt")))
    assert img.shape == (8, cfg.projection_dim) and txt.shape == (8, cfg.projection_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    torch.testing.assert_close(alone[0], txt[0], rtol=1e-4, atol=1e-5)
    assert img.std(0).mean() > 0 and txt.std(0).mean() > 0


def test_saved_preprocessor_matches_training_pixels(tiny_run):
    from transformers import AutoImageProcessor

    out, _ = tiny_run
    proc = AutoImageProcessor.from_pretrained(out)
    images = scenes.generate("test", 0, 4).images
    pixels = proc(images=list(images), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32)
    torch.testing.assert_close(pixels, pt.pixels_from_uint8(images), rtol=0, atol=1e-4)


def test_load_backbone(tiny_run):
    import tgems

    try:
        load_backbone = tgems.load_backbone
    except (AttributeError, ImportError):
        pytest.skip("tgems.backbones.load_backbone not available")
    from transformers import CLIPModel

    out, _ = tiny_run
    bb = load_backbone(str(out))
    assert bb.num_layers == 4 and bb.image_size == 32
    images = scenes.generate("test", 0, 6).images
    pixels = bb.preprocess(images)
    torch.testing.assert_close(pixels, pt.pixels_from_uint8(images), rtol=0, atol=1e-5)
    z = bb.encode_image(pixels)
    t = bb.encode_text(list(scenes.CLASSES[:4]))
    assert z.shape == (6, pt.PRESETS["tiny"].projection_dim) and torch.isfinite(z).all()
    assert t.shape == (4, pt.PRESETS["tiny"].projection_dim) and torch.isfinite(t).all()
    ref = CLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(z, _feat(ref.get_image_features(pixel_values=pixels)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ determinism and resume

def test_same_seed_same_weights(tmp_path):
    _run(tmp_path / "a", steps=6, batch_size=32, seed=3)
    _run(tmp_path / "b", steps=6, batch_size=32, seed=3)
    _assert_same_weights(tmp_path / "a", tmp_path / "b")
    a = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    b = json.loads((tmp_path / "b" / "pretrain.json").read_text())
    assert [e["loss"] for e in a["log"]] == [e["loss"] for e in b["log"]]
    _run(tmp_path / "c", steps=6, batch_size=32, seed=4)
    wa, wc = _weights(tmp_path / "a"), _weights(tmp_path / "c")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


class _Crash(RuntimeError):
    pass


def _crash_at(monkeypatch, crash_step):
    """Make the batch source fail at `crash_step`, as if the process died there."""
    real = pt._Batches.__call__

    def call(self, step):
        if step == crash_step:
            raise _Crash(step)
        return real(self, step)

    monkeypatch.setattr(pt._Batches, "__call__", call)


def test_resume_after_interruption(tmp_path, monkeypatch):
    kw = dict(steps=20, batch_size=32, ckpt_every=10, seed=1)
    info_a = _run(tmp_path / "a", **kw)
    assert not (tmp_path / "a" / "checkpoint").exists()

    out = tmp_path / "b"
    with monkeypatch.context() as m:
        _crash_at(m, 13)
        with pytest.raises(_Crash):
            _run(out, **kw)
    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 10 and state["seed"] == 1 and state["data"] == "scenes:train"
    assert {"model.safetensors", "optimizer.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert not (out / "model.safetensors").exists()
    # the optimizer file is part of the artifact: its checksum is in state.json, a damaged one is one line
    opt = (ckpt / "optimizer.safetensors").read_bytes()
    assert state["files"] == {"optimizer.safetensors": __import__("hashlib").sha256(opt).hexdigest()}
    (ckpt / "optimizer.safetensors").write_bytes(opt[:-1] + bytes([opt[-1] ^ 0xFF]))
    with pytest.raises(TGEMError, match=r"optimizer.safetensors is damaged") as e:
        _run(out, **kw, resume=True)
    assert "\n" not in str(e.value)
    (ckpt / "optimizer.safetensors").write_bytes(opt)

    # a checkpoint from another recipe, seed or data is refused (and left intact)
    with pytest.raises(TGEMError, match="another recipe"):
        _run(out, **{**kw, "seed": 2})
    with pytest.raises(TGEMError, match="another recipe"):
        _run(out, **{**kw, "steps": 30})
    with pytest.raises(TGEMError, match="another recipe"):
        _run(out, **{**kw, "lr": 1e-3})
    with pytest.raises(TGEMError, match="another recipe"):
        _run(out, **kw, data="scenes")
    assert json.loads((ckpt / "state.json").read_text()) == state

    # resuming picks up at step 10 and lands exactly where the uninterrupted run did
    calls = []
    real = pt._Batches.__call__
    with monkeypatch.context() as m:
        m.setattr(pt._Batches, "__call__", lambda self, step: calls.append(step) or real(self, step))
        info_b = _run(out, **kw, resume=True)
    assert calls == list(range(10, 20))
    _assert_same_weights(tmp_path / "a", out, atol=1e-6)
    assert [e["step"] for e in info_b["log"]] == [e["step"] for e in info_a["log"]]
    np.testing.assert_allclose([e["loss"] for e in info_b["log"]], [e["loss"] for e in info_a["log"]],
                               rtol=0, atol=1e-4)
    assert info_b["recipe"] == info_a["recipe"]
    assert not ckpt.exists()


def test_keep_checkpoint_and_no_resume(tmp_path):
    out = tmp_path / "m"
    kw = dict(steps=12, batch_size=32, ckpt_every=5, seed=0)
    _run(out, **kw, keep_checkpoint=True)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10  # the last checkpoint before the end
    first = _weights(out)
    # resuming from the kept checkpoint re-does steps 10..11 and reproduces the same model
    _run(out, **kw, keep_checkpoint=True)
    for k, v in _weights(out).items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=1e-6)
    # resume=False ignores the checkpoint (even one from another seed) and trains from scratch
    _run(out, **{**kw, "seed": 5}, resume=False)
    assert not (out / "checkpoint").exists()
    assert json.loads((out / "pretrain.json").read_text())["seed"] == 5


def test_pretrain_on_a_labelled_dataset(tmp_path):
    # a fixed dataset (not the stream): 5 steps of 32 cycle through 100 images more than once
    info = _run(tmp_path / "m", data="scenes:calib:100", steps=5, batch_size=32)
    assert info["data"] == "scenes:calib:100" and info["samples_seen"] == 160
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tok(list(scenes.CLASSES) + scenes.generate("calib", 0, 20).captions)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)


def test_unknown_preset(tmp_path):
    with pytest.raises(TGEMError, match="unknown preset"):
        pt.pretrain(tmp_path / "m", preset="huge", progress=False)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ recipe overrides, workers, device

def test_make_recipe_overrides():
    r = pt.make_recipe("embedded", {"vision": {"intermediate_size": 256}, "lr": 5e-4})
    base = pt.PRESETS["embedded"]
    assert r.vision == {**base.vision, "intermediate_size": 256} and r.lr == 5e-4
    assert r.text == base.text and r.steps == base.steps
    assert base.vision["intermediate_size"] == 512  # the preset itself is untouched
    with pytest.raises(TGEMError, match="unknown recipe field 'lr_max'"):
        pt.make_recipe("embedded", {"lr_max": 1.0})
    with pytest.raises(TGEMError, match="unknown preset"):
        pt.make_recipe("huge")


def test_workers_make_the_same_batches(tmp_path):
    # a worker process makes the batches ahead; the model must not notice
    _run(tmp_path / "inline", steps=7, batch_size=32, seed=2)
    info = _run(tmp_path / "worker", steps=7, batch_size=32, seed=2, workers=1)
    _assert_same_weights(tmp_path / "inline", tmp_path / "worker")
    assert "--workers 1" in info["command"] and info["device"] == "cpu"


def test_callback_sees_the_model_in_eval_mode(tmp_path):
    seen = []
    _run(tmp_path / "m", steps=7, batch_size=16, callback_every=3,
         callback=lambda step, model, tok: seen.append((step, model.training, len(tok))))
    assert [s for s, _, _ in seen] == [3, 6, 7]
    assert not any(training for _, training, _ in seen)


@pytest.mark.parametrize("kw, msg", [(dict(device="no-such-device"), "bad device .no-such-device."),
                                     (dict(workers=-1), "workers must be")])
def test_bad_device_or_workers(tmp_path, kw, msg):
    with pytest.raises(TGEMError, match=msg):
        _run(tmp_path / "m", steps=2, **kw)
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_gpu_is_refused(tmp_path):
    with pytest.raises(TGEMError, match="CUDA is not available"):
        _run(tmp_path / "m", steps=2, device="cuda")


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    """The resume checkpoint is one directory swapped in whole (tgems.artifacts): a run killed while writing
    the second checkpoint leaves the first one, its weights matching its state (checksum), resumable."""
    import tgems.artifacts as artifacts

    out, calls = tmp_path / "m", []
    real = artifacts.sha256_file

    def crash_in_the_second(path):  # a checkpoint checksums its model, then its optimizer file
        calls.append(path)
        if len(calls) == 3:
            raise _Crash()
        return real(path)

    monkeypatch.setattr(artifacts, "sha256_file", crash_in_the_second)
    with pytest.raises(_Crash):
        _run(out, steps=12, batch_size=16, ckpt_every=4, seed=0)
    ckpt = out / "checkpoint"
    state = pt._read_state(ckpt)
    assert state["step"] == 4
    artifacts.read_tensors(ckpt, artifacts.PRETRAIN_STATE, state)  # raises when the weights are another step's
    assert state["sha256"] == artifacts.sha256_file(ckpt / "model.safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]
