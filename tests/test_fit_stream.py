"""Fitting from streamed data (tgems.training.fit.fit_and_save on folder:, webdataset:, parquet:) through the
feature cache on disk (tgems.training.feature_cache, tgems.features.FeatureCache). On the session's tiny
trained CLIP (tests/conftest.py) and a few dozen scenes images."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli
from stream_helpers import encode, make_folder
from tgems import TGEMError
from tgems.classifier import EarlyExitClassifier
from tgems.features import FeatureCache, LayerFeatures, extract_features
from tgems.training.feature_cache import build_cache
from tgems.training.fit import FitSettings, fit_and_save, fit_tgem, fit_tgem_cached

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
QUICK = dict(epochs=1, batch_size=32, cross_fit=False)


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def captioned_tars(root, data, n, per_shard, bad=False) -> str:
    """KEY.png + KEY.txt (odd i) or KEY.json {"caption"} (even i); with `bad`, an undecodable image and a
    sample without caption in the first shard."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards = (n + per_shard - 1) // per_shard
    for s in range(shards):
        with tarfile.open(root / f"cap-{s:03d}.tar", "w") as tf:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                _add(tf, f"k{i:04d}.png", encode(data.pil(i), "PNG"))
                cap = data.captions[i]
                if i % 2:
                    _add(tf, f"k{i:04d}.txt", cap.encode())
                else:
                    _add(tf, f"k{i:04d}.json", json.dumps({"caption": cap, "other": 1}).encode())
            if s == 0 and bad:
                _add(tf, "broken.png", b"this is not a png")
                _add(tf, "broken.txt", b"a red star")
                _add(tf, "silent.png", encode(data.pil(0), "PNG"))
    return str(root / f"cap-{{000..{shards - 1:03d}}}.tar")


def test_fit_from_captioned_tars_skips_and_counts_bad_items(trained_clip_dir, trained_bb, scenes_train, tmp_path):
    spec = captioned_tars(tmp_path / "tars", scenes_train, 60, 25, bad=True)
    out = tmp_path / "ckpt"
    info = fit_and_save(str(trained_clip_dir), f"webdataset:{spec}", out, FitSettings(**QUICK), progress=False,
                        workers=0)
    assert info["targets"] == "captions" and info["train_classes"] is None
    assert info["cache"]["images"] == 60 and info["cache"]["shards"] == 3 and info["cache"]["path"] is None
    assert info["num_train"] + info["num_jumper"] == 60
    sk = info["skipped"]
    assert sk["count"] == 2
    assert sk["reasons"] == {"not an image (unrecognised format)": 1, "no caption or label": 1}
    assert {e["id"] for e in sk["examples"]} == {"broken", "silent"}
    assert not list(tmp_path.glob(".tgems-fit-cache-*"))  # the temporary cache is gone
    saved = json.loads((out / "tgem.json").read_text())
    assert saved["skipped"] == sk and saved["data"] == f"webdataset:{spec}"
    labels = sorted(set(scenes_train.classes[c] for c in scenes_train.labels[:60]))[:6]
    clf = EarlyExitClassifier(trained_bb, str(out), labels, templates=info["templates"], jumper=None)
    pred = clf.predict([scenes_train.pil(i) for i in range(60, 68)])
    assert len(pred.labels) == 8 and set(pred.labels) <= set(labels)
    assert all(1 <= int(l) <= trained_bb.num_layers for l in pred.exit_layers)


def test_fit_from_parquet_uses_labels_and_captions(trained_clip_dir, trained_bb, scenes_train, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx = np.flatnonzero(np.isin(scenes_train.labels, np.unique(scenes_train.labels)[:6]))[:60]
    names = [scenes_train.classes[scenes_train.labels[i]] for i in idx]
    table = pa.table({"image": pa.array([encode(scenes_train.pil(i), "PNG") for i in idx], pa.binary()),
                      "name": names, "text": [scenes_train.captions[i] for i in idx]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=16)
    out = tmp_path / "ckpt"
    info = fit_and_save(str(trained_clip_dir), f"parquet:{tmp_path / 't.parquet'}?label=name", out,
                        FitSettings(**QUICK), progress=False, workers=0, cache=tmp_path / "cache")
    assert info["targets"] == "labels" and info["train_classes"] == sorted(set(names))
    assert info["skipped"]["count"] == 0 and info["cache"]["images"] == 60
    clf = EarlyExitClassifier(trained_bb, str(out), info["train_classes"], templates=info["templates"])
    pred = clf.predict([scenes_train.pil(i) for i in idx[:8]])
    assert len(pred.labels) == 8 and set(pred.labels) <= set(names)
    # the kept cache serves a later fit of another seed without encoding again
    again = fit_and_save(str(trained_clip_dir), f"parquet:{tmp_path / 't.parquet'}?label=name", tmp_path / "c2",
                         FitSettings(**QUICK, seed=1), progress=False, workers=0, cache=tmp_path / "cache")
    assert again["cache"]["encoded"] == 0 and again["cache"]["images"] == 60
    with pytest.raises(TGEMError, match="no label column 'nope'"):
        fit_and_save(str(trained_clip_dir), f"parquet:{tmp_path / 't.parquet'}?label=nope", tmp_path / "c3",
                     FitSettings(**QUICK), progress=False, workers=0)


def _state(tgem, jumper):
    out = dict(tgem.state_dict())
    out.update(jumper.state())
    return out


def test_fit_from_the_disk_cache_equals_the_in_memory_fit(trained_bb, scenes_train, tmp_path):
    """Same images, same seed: the minibatches read from the memory maps train the same modules and tau as the
    in-memory path, given the same (float16) features; the cache holds the readouts to float16 precision."""
    import tgems

    idx = np.flatnonzero(np.isin(scenes_train.labels, np.unique(scenes_train.labels)[:5]))
    n = len(idx)
    assert n > 40
    make_folder(tmp_path / "imgs", [scenes_train.pil(i) for i in idx],
                [scenes_train.classes[scenes_train.labels[i]] for i in idx])
    build_cache(trained_bb, f"folder:{tmp_path / 'imgs'}?block=20", tmp_path / "cache", rates=True,
                workers=0, progress=False)
    cache = FeatureCache.open(tmp_path / "cache", trained_bb, need_rates=True)
    assert len(cache) == n and len(cache.metas) == (n + 19) // 20
    ds = tgems.load_dataset(f"folder:{tmp_path / 'imgs'}")
    mem = extract_features(trained_bb, ds, rates=True, progress=False)
    assert cache.classes == [ds.classes[c] for c in np.unique(ds.labels)]
    assert torch.equal(torch.as_tensor(cache.labels), mem.labels)
    disk = cache.subset(np.arange(n))
    assert torch.allclose(disk.z, mem.z, rtol=2e-3, atol=2e-3)
    assert torch.equal(disk.rates, mem.rates)
    assert torch.allclose(disk.patch, mem.patch, rtol=2e-3, atol=2e-3)
    mem16 = LayerFeatures(mem.z.half().float(), mem.rates, mem.labels, classes=mem.classes,
                          patch=mem.patch.half().float())
    for space, cross, recipe in (("cls", True, "tgem"), ("rates", False, "tgem"), ("cls", True, "distilled")):
        s = FitSettings(space=space, epochs=2, batch_size=16, cross_fit=cross, seed=3, recipe=recipe)
        a = fit_tgem_cached(trained_bb, cache, s, progress=False, data_name="folder")
        b = fit_tgem(trained_bb, ds, s, feats=mem16, progress=False)
        sa, sb = _state(*a[:2]), _state(*b[:2])
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.allclose(sa[k], sb[k], atol=1e-5), (space, k)
        assert a[1].tau == pytest.approx(b[1].tau, abs=1e-5)
        assert a[2]["settings"] == b[2]["settings"] and a[2]["num_jumper"] == b[2]["num_jumper"]
    assert a[0].readout_patch and a[0].readout_weight.shape[1] == 2 * trained_bb.embed_dim
    manifest = tmp_path / "cache" / "manifest.json"  # a cache made before the mean-patch readouts
    m = json.loads(manifest.read_text())
    del m["settings"]["patch"]
    manifest.write_text(json.dumps(m))
    old = FeatureCache.open(tmp_path / "cache", trained_bb, need_rates=True)
    assert old.subset(np.arange(3)).patch is None
    with pytest.raises(TGEMError, match="holds no mean-patch readouts .*another --cache, or .*--no-readout-patch") as e:
        fit_tgem_cached(trained_bb, old, FitSettings(epochs=1, batch_size=16), progress=False)  # the default recipe
    assert "\n" not in str(e.value)
    for given in ({"recipe": "tgem"}, {"readout_patch": False}):
        fit_tgem_cached(trained_bb, old, FitSettings(epochs=1, batch_size=16, cross_fit=False, **given), progress=False)


CHILD = """
import sys, time
from tgems.backbones import load_backbone
from tgems.training import feature_cache as fc
orig = fc._ShardWriter.add
def slow_add(self, *a, **kw):
    orig(self, *a, **kw)
    if self.index == 2:
        print("ready", flush=True)
        time.sleep(600)
fc._ShardWriter.add = slow_add
fc.build_cache(load_backbone(sys.argv[1]), sys.argv[2], sys.argv[3], workers=0, progress=False)
"""


def test_killed_extraction_resumes_to_the_same_cache_and_checkpoint(trained_clip_dir, trained_bb, scenes_train,
                                                                     tmp_path):
    spec = "webdataset:" + captioned_tars(tmp_path / "tars", scenes_train, 100, 20)
    whole = tmp_path / "whole"
    build_cache(trained_bb, spec, whole, workers=0, progress=False)
    cut = tmp_path / "cut"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(trained_clip_dir), spec, str(cut)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert sorted(p.name for p in cut.glob("*.json")) == ["000000.json", "000001.json", "manifest.json"]
    assert list(cut.glob(".000002.*.tmp"))  # the shard being written was left as temporaries
    with pytest.raises(TGEMError, match="incomplete"):
        FeatureCache.open(cut, trained_bb)
    summary = build_cache(trained_bb, spec, cut, workers=0, progress=False)
    assert summary["encoded"] == 60 and summary["images"] == 100
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())
    for p in whole.iterdir():
        assert (cut / p.name).read_bytes() == p.read_bytes(), p.name
    fits = [fit_tgem_cached(trained_bb, FeatureCache.open(d, trained_bb), FitSettings(**QUICK), progress=False)
            for d in (whole, cut)]
    a, b = (_state(*f[:2]) for f in fits)
    assert all(torch.equal(a[k], b[k]) for k in a) and fits[0][1].tau == fits[1][1].tau


def test_a_cache_is_refused_for_another_backbone_or_settings(trained_clip_dir, trained_bb, tiny_clip_dir,
                                                             tiny_backbone, scenes_train, tmp_path, capsys):
    spec = "webdataset:" + captioned_tars(tmp_path / "tars", scenes_train, 30, 30)
    cache = tmp_path / "cache"
    build_cache(trained_bb, spec, cache, workers=0, progress=False, max_images=20)
    assert FeatureCache.open(cache, trained_bb).n == 20
    before = sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir())
    with pytest.raises(TGEMError, match="made for another backbone") as e:
        build_cache(tiny_backbone, spec, cache, workers=0, progress=False, max_images=20)
    assert "\n" not in str(e.value)
    with pytest.raises(TGEMError, match="made for another backbone"):
        FeatureCache.open(cache, tiny_backbone)
    with pytest.raises(TGEMError, match="other settings .*max_images 20 there, 10 here"):
        build_cache(trained_bb, spec, cache, workers=0, progress=False, max_images=10)
    with pytest.raises(TGEMError, match="holds no activation rates"):
        build_cache(trained_bb, spec, cache, rates=True, workers=0, progress=False, max_images=20)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir()) == before
    out = tmp_path / "ckpt"
    rc, _, err = run_cli(capsys, "fit", "--model", tiny_clip_dir, "--data", spec, "--cache", cache, "--out", out,
                         "--max-images", "20", "--workers", "0", "--quiet")
    assert "made for another backbone" in assert_one_line_error(rc, err) and not out.exists()


def test_stream_options_are_checked_before_any_work(tmp_path, capsys):
    for argv, words in ((["--data", f"folder:{tmp_path}", "--n", "5"], "--max-images"),
                        (["--data", "scenes:train:50", "--cache", tmp_path / "c"], "streamed data"),
                        (["--data", f"folder:{tmp_path}?caption=x"], "class sub-folders")):
        rc, _, err = run_cli(capsys, "fit", "--model", "no-such-model", "--out", tmp_path / "o", "--quiet", *argv)
        assert words in assert_one_line_error(rc, err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_reading_the_cache_keeps_memory_flat(tmp_path, monkeypatch):
    """A shard's pages are handed back as soon as its rows are read: reading a 64 MB cache through, and
    reading rows spread over every shard at once (the Jumper's images, a random minibatch), leaves about
    nothing of the cache's file mapped. Kept mapped instead (as before, until a release call; fault-around
    maps most of every shard a few rows were read from), the same reads map most of the cache. Measured as
    the process's resident file pages, which is what grew; its heap is not this test's business."""
    import mmap
    from types import SimpleNamespace

    import tgems.features as features
    from tgems.features import CACHE_FORMAT, CACHE_KIND, MANIFEST, shard_file

    rng = np.random.default_rng(0)
    n, L, D = 4000, 8, 1024  # 64 MB of float16 readouts in 4 shards
    for k in range(4):
        m = n // 4
        for what, a in {"z": rng.standard_normal((m, L, D), dtype=np.float32).astype(np.float16),
                        "text": np.zeros((m, 4), np.float16), "label": np.zeros(m, np.int32),
                        "key": np.zeros(m, np.int64)}.items():
            np.save(shard_file(tmp_path, k, what), a)
        shard_file(tmp_path, k, "json").write_text(json.dumps(
            {"index": k, "input": "x", "n": m, "label_names": ["a"], "complete": True, "skipped": []}))
    (tmp_path / MANIFEST).write_text(json.dumps({"format": CACHE_FORMAT, "kind": CACHE_KIND, "complete": True,
                                                 "settings": {"rates": False}, "shards_used": [0, 1, 2, 3]}))
    spread = np.sort(rng.choice(n, 200, replace=False))  # 200 rows from all four shards: 3 MB of float16

    def mapped_growth() -> float:
        cache = FeatureCache.open(tmp_path)
        cache.take(np.arange(4), "cls", range(1, L))  # code and library pages a first read touches
        before = peak = _rss_file_mb()
        for a in range(0, n, 250):
            x = cache.take(np.arange(a, a + 250), "cls", range(1, L))
            assert x.shape == (250, L - 1, D) and x.dtype == torch.float32
            peak = max(peak, _rss_file_mb())
        x = cache.take(spread, "cls", range(1, L))
        assert torch.equal(x[0], cache.take(spread[:1], "cls", range(1, L))[0])
        return max(peak, _rss_file_mb()) - before

    handed_back = mapped_growth()
    monkeypatch.setattr(features, "mmap", SimpleNamespace(MADV_DONTNEED=mmap.MADV_NORMAL))  # pages stay mapped
    kept = mapped_growth()
    assert handed_back < 12 and kept > 40, (handed_back, kept)
