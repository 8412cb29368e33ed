"""Folder / CIFAR readers, the restricted unpickler, the download checks and the dataset-spec parser."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

import tgems.data
from tgems.data import Dataset, download_cifar, load_cifar, load_dataset, load_folder, read_image
from tgems.data import cifar as cifar_mod
from tgems.errors import TGEMError

# ---------------------------------------------------------------- folder reader


def _png(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "a_red_star" / "b.png", (20, 10), (255, 0, 0))
    _png(root / "a_red_star" / "A.PNG", (8, 8), (250, 0, 0))
    _png(root / "dog" / "2.png", (12, 16), (0, 255, 0))
    _png(root / "dog" / "1.png", (5, 7), (0, 250, 0))
    _png(root / "cat" / "x.png", (9, 9), (0, 0, 255))
    _png(root / "cat" / "y.png", (30, 3), (0, 0, 250))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(b"")  # files directly under root are not a class
    return root


def test_folder_reader(image_root):
    ds = load_folder(image_root)
    assert isinstance(ds, Dataset)
    assert ds.classes == ["a red star", "cat", "dog"]
    assert len(ds) == 6 and ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.meta["files"] == ["a_red_star/A.PNG", "a_red_star/b.png", "cat/x.png", "cat/y.png",
                                "dog/1.png", "dog/2.png"]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in ds.images)
    assert [im.size for im in ds.images] == [(8, 8), (20, 10), (9, 9), (30, 3), (5, 7), (12, 16)]
    assert ds.pil(1).getpixel((0, 0)) == (255, 0, 0)


def test_folder_reader_is_deterministic_and_subsets(image_root):
    a, b = load_folder(image_root), load_folder(image_root)
    assert a.meta["files"] == b.meta["files"]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    s1, s2 = load_folder(image_root, n=3, seed=1), load_folder(image_root, n=3, seed=1)
    assert len(s1) == 3 and s1.meta["files"] == s2.meta["files"]
    assert set(s1.meta["files"]) <= set(a.meta["files"])


def test_folder_reader_errors(tmp_path, image_root):
    with pytest.raises(TGEMError, match="does not exist") as e:
        load_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TGEMError, match="no class sub-folders"):
        load_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "a.txt").write_text("x")
    with pytest.raises(TGEMError, match="has no images"):
        load_folder(tmp_path / "noimg")

    bad = image_root / "dog" / "3.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(TGEMError, match="cannot read image") as e:
        load_folder(image_root)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    ds = load_folder(image_root, skip_bad=True)
    assert len(ds) == 6 and ds.meta["skipped"] == [str(bad)]


def test_read_image(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (4, 3), 7).save(p)
    im = read_image(p)
    assert im.mode == "RGB" and im.size == (4, 3) and im.getpixel((0, 0)) == (7, 7, 7)
    truncated = tmp_path / "t.png"
    truncated.write_bytes(p.read_bytes()[:20])
    for f in (truncated, tmp_path / "missing.png"):
        with pytest.raises(TGEMError, match=f"cannot read image {f}"):
            read_image(f)


# ---------------------------------------------------------------- CIFAR fixtures in the real format


class _Py2StylePickler(pickle._Pickler):
    """Writes bytes as BINSTRING like Python 2's cPickle did for the official files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _dump(obj, path, style):
    if style == "py3":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        buf = io.BytesIO()
        _Py2StylePickler(buf, protocol=2).dump(obj)
        path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def _cifar_data(n, seed):
    """(N, 3072) channel-first rows; image i has R at (h=1, w=2) = i, G there = 100 + i, B = 200 + i."""
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        data[i, :, 1, 2] = (i, 100 + i, 200 + i)
    return data.reshape(n, 3072)


def _write_cifar10(folder, style="py2", per_batch=3):
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072},
          folder / "batches.meta", style)
    for k, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        _dump({b"batch_label": f"batch {k}".encode(), b"labels": [(k + i) % 10 for i in range(per_batch)],
               b"data": _cifar_data(per_batch, k), b"filenames": [f"f{k}_{i}.png".encode() for i in range(per_batch)]},
              folder / fname, style)


def _write_cifar100(folder, style="py3"):
    folder.mkdir(parents=True)
    fine = [f"class_{i}".encode() for i in range(100)]
    fine[3] = b"maple_tree"
    _dump({b"fine_label_names": fine, b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]},
          folder / "meta", style)
    for split, n in (("train", 5), ("test", 4)):
        _dump({b"batch_label": split.encode(), b"fine_labels": [3, 99, 0, 3, 50][:n],
               b"coarse_labels": [1, 2, 3, 4, 5][:n], b"data": _cifar_data(n, 9),
               b"filenames": [f"{split}{i}.png".encode() for i in range(n)]}, folder / split, style)


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar10_reader(tmp_path, style):
    _write_cifar10(tmp_path / "cifar-10-batches-py", style)
    test = load_cifar(tmp_path, "cifar10", "test")
    assert test.name == "cifar10-test"
    assert test.images.shape == (3, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.labels.dtype == np.int64 and test.labels.tolist() == [5, 6, 7]
    assert test.classes[0] == "airplane" and len(test.classes) == 10
    for i in range(3):
        assert tuple(test.images[i, 1, 2]) == (i, 100 + i, 200 + i)
    expected = _cifar_data(3, 5).reshape(3, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(test.images, expected)
    assert test.meta["files"] == ["f5_0.png", "f5_1.png", "f5_2.png"]

    train = load_cifar(tmp_path / "cifar-10-batches-py", split="train")  # the folder itself works too
    assert len(train) == 15 and train.labels[:4].tolist() == [0, 1, 2, 1]
    assert tuple(train.images[3, 1, 2]) == (0, 100, 200)
    assert len(load_cifar(tmp_path, split="train", n=4)) == 4


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar100_reader(tmp_path, style):
    _write_cifar100(tmp_path / "cifar-100-python", style)
    ds = load_cifar(tmp_path, which="cifar100", split="train")
    assert ds.images.shape == (5, 32, 32, 3)
    assert ds.labels.tolist() == [3, 99, 0, 3, 50]
    assert len(ds.classes) == 100 and ds.classes[3] == "maple tree" and ds.classes[ds.labels[0]] == "maple tree"
    assert tuple(ds.images[4, 1, 2]) == (4, 104, 204)
    assert ds.meta["coarse_labels"].tolist() == [1, 2, 3, 4, 5] and ds.meta["coarse_classes"][0] == "super 0"
    assert len(load_cifar(tmp_path, "cifar100", "test", n=2)) == 2


def test_cifar_missing_things(tmp_path):
    with pytest.raises(TGEMError, match="does not exist"):
        load_cifar(tmp_path / "nope")
    with pytest.raises(TGEMError, match="no cifar10 data"):
        load_cifar(tmp_path)
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(TGEMError, match="data_batch_4 is missing"):
        load_cifar(tmp_path, split="train")
    with pytest.raises(TGEMError, match="unknown CIFAR split"):
        load_cifar(tmp_path, split="val")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(TGEMError, match="cannot read CIFAR file"):
        load_cifar(tmp_path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("evil", ["os.system", "eval", "namespace", "object-array"])
def test_malicious_pickle_is_refused(tmp_path, evil):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Evil(marker),
        "eval": _EvilEval(),
        "namespace": types.SimpleNamespace(),
        "object-array": np.array([b"a", 1], dtype=object),
    }[evil]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _cifar_data(3, 0), b"labels": [0, 1, 2], b"x": payload}, f, protocol=2)
    with pytest.raises(TGEMError, match="refusing to load .*test_batch.*unexpected"):
        load_cifar(tmp_path)
    assert not marker.exists()


def test_ndarray_constructor_cannot_be_called(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    # numpy.ndarray((1 << 40,)) by hand: GLOBAL numpy.ndarray, then REDUCE on a tuple.
    raw = b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85\x85R."
    (folder / "test_batch").write_bytes(raw)
    with pytest.raises(TGEMError, match="refusing to load .*test_batch.*ndarray called directly"):
        load_cifar(tmp_path)


# ---------------------------------------------------------------- download helper


def _tar_gz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(url, dest):
        calls.append(url)
        dest.write_bytes(b"not the real archive")

    monkeypatch.setattr(cifar_mod, "_fetch", fake_fetch)
    dest = tmp_path / "dl"
    with pytest.raises(TGEMError, match="checksum mismatch"):
        download_cifar("cifar10", dest)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert list(dest.iterdir()) == []


def test_download_extracts_and_refuses_unsafe_members(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _write_cifar10(src / "cifar-10-batches-py")
    good = tmp_path / "good.tar.gz"
    members = [(f"cifar-10-batches-py/{p.name}", p.read_bytes()) for p in sorted((src / "cifar-10-batches-py").iterdir())]
    good_md5 = _tar_gz(good, members)
    evil = tmp_path / "evil.tar.gz"
    evil_md5 = _tar_gz(evil, [("cifar-10-batches-py/batches.meta", b"x"), ("../escaped.txt", b"x")])

    monkeypatch.setattr(cifar_mod, "_fetch", lambda url, dest: dest.write_bytes(evil.read_bytes()))
    monkeypatch.setitem(cifar_mod._ARCHIVES, "cifar10", ("cifar-10-python.tar.gz", evil_md5))
    dest = tmp_path / "dl"
    with pytest.raises(TGEMError, match="unsafe member path '../escaped.txt'"):
        download_cifar("cifar10", dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "escaped.txt").exists()

    monkeypatch.setattr(cifar_mod, "_fetch", lambda url, dest: dest.write_bytes(good.read_bytes()))
    monkeypatch.setitem(cifar_mod._ARCHIVES, "cifar10", ("cifar-10-python.tar.gz", good_md5))
    folder = download_cifar("cifar10", dest)
    assert folder == dest / "cifar-10-batches-py"
    assert [p.name for p in dest.iterdir()] == ["cifar-10-batches-py"]
    assert len(load_cifar(dest)) == 3
    monkeypatch.setattr(cifar_mod, "_fetch", lambda url, dest: pytest.fail("already there: no download"))
    assert download_cifar("cifar10", dest) == folder


# ---------------------------------------------------------------- spec parser


@pytest.fixture
def fake_scenes(monkeypatch):
    calls = []

    def load_split(split, n=None, seed=0):
        calls.append((split, n, seed))
        k = 2 if n is None else n
        return Dataset(name=f"scenes:{split}", images=np.zeros((k, 32, 32, 3), np.uint8),
                       labels=np.zeros(k, np.int64), classes=["a red star"])

    fake = types.SimpleNamespace(SPLITS=("train", "calib", "test", "heldout", "testall"), load_split=load_split)
    monkeypatch.setitem(sys.modules, "tgems.data.scenes", fake)
    monkeypatch.setattr(tgems.data, "scenes", fake, raising=False)
    return calls


def test_spec_scenes(fake_scenes):
    assert len(load_dataset("scenes:test")) == 2
    assert load_dataset("scenes:heldout:7", seed=3).meta["spec"] == "scenes:heldout:7"
    load_dataset("scenes:train:10", n=4)
    load_dataset("scenes:calib", n=5)
    assert fake_scenes == [("test", None, 0), ("heldout", 7, 3), ("train", 4, 0), ("calib", 5, 0)]


@pytest.mark.parametrize("spec, match", [
    ("", "empty dataset spec"),
    ("   ", "empty dataset spec"),
    ("mnist:/x", "unknown dataset kind 'mnist'.*scenes:SPLIT.*folder:DIR.*cifar10:DIR"),
    ("scenes", "no KIND: prefix"),
    ("scenes:", "missing scenes split.*train, calib, test, heldout, testall"),
    ("scenes:val", "unknown scenes split 'val'.*train, calib, test, heldout, testall"),
    ("scenes:test:abc", "bad sample count 'abc'"),
    ("scenes:test:0", "must be positive"),
    ("folder:", "missing its folder"),
    ("cifar10:", "missing its folder"),
])
def test_spec_errors(fake_scenes, spec, match):
    with pytest.raises(TGEMError, match=match):
        load_dataset(spec)
    assert fake_scenes == []


def test_spec_folder_and_cifar(tmp_path, image_root):
    with pytest.raises(TGEMError, match="use folder:"):
        load_dataset(str(image_root))
    ds = load_dataset(f"folder:{image_root}")
    assert ds.classes == ["a red star", "cat", "dog"] and len(ds) == 6
    assert len(load_dataset(f"folder:{image_root}", n=2)) == 2
    with pytest.raises(TGEMError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(TGEMError, match="positive"):
        load_dataset(f"folder:{image_root}", n=0)

    _write_cifar10(tmp_path / "c10" / "cifar-10-batches-py")
    _write_cifar100(tmp_path / "c100" / "cifar-100-python")
    assert load_dataset(f"cifar10:{tmp_path / 'c10'}").name == "cifar10-test"
    tr = load_dataset(f"CIFAR10-train:{tmp_path / 'c10'}", n=5)
    assert tr.name == "cifar10-train" and len(tr) == 5
    assert load_dataset(f"cifar100:{tmp_path / 'c100'}").classes[3] == "maple tree"
    assert len(load_dataset(f"cifar100-train:{tmp_path / 'c100'}")) == 5


def test_spec_real_scenes():
    scenes = pytest.importorskip("tgems.data.scenes")
    ds = load_dataset("scenes:test:3")
    assert len(ds) == 3 and ds.images.shape[1:] == (32, 32, 3)
    with pytest.raises(TGEMError, match=", ".join(scenes.SPLITS)):
        load_dataset("scenes:nope")


# ---------------------------------------------------------------- one listing for every folder: consumer


def test_load_dataset_and_the_streaming_reader_list_the_same_files(tmp_path):
    """fit / eval / calibrate (load_dataset) and batch jobs (open_source) read one folder the same way:
    nested sub-folders and .tif files included, the same order, the same labels."""
    from tgems.jobs.sources import open_source

    root = tmp_path / "imgs"
    _png(root / "cat" / "a.png", (9, 9), (0, 0, 255))
    _png(root / "cat" / "indoor" / "b.png", (9, 9), (0, 0, 250))  # nested: still a cat
    Image.new("RGB", (7, 7), (1, 2, 3)).save(root / "cat" / "c.tif")
    _png(root / "dog" / "z.png", (9, 9), (0, 255, 0))
    Image.new("RGB", (7, 7), (3, 2, 1)).save(root / "dog" / "y.TIFF")
    _png(root / ".hidden" / "h.png", (9, 9), (9, 9, 9))
    (root / "dog" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{root}")
    src = open_source(f"folder:{root}")
    streamed = [(rel, label) for s in src.shards for rel, label in s.files]
    assert ds.meta["files"] == [rel for rel, _ in streamed] == [
        "cat/a.png", "cat/c.tif", "cat/indoor/b.png", "dog/y.TIFF", "dog/z.png"]
    assert [ds.classes[i] for i in ds.labels] == [label for _, label in streamed]
