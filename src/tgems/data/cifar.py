"""CIFAR-10 / CIFAR-100 readers for the official "python version" batches, plus a verified downloader.

The batches are pickles, and a pickle can run arbitrary code when loaded. They are read with
a restricted unpickler that can build nothing but plain containers and uint8-style numpy
arrays, so a tampered file is refused instead of executed.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

import numpy as np

from tgems.data.dataset import Dataset
from tgems.errors import TGEMError

BASE_URL = "https://www.cs.toronto.edu/~kriz/"
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
_BATCHES = {
    ("cifar10", "train"): tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("cifar10", "test"): ("test_batch",),
    ("cifar100", "train"): ("train",),
    ("cifar100", "test"): ("test",),
}
# which -> (meta file, class-names key, labels key)
_META = {
    "cifar10": ("batches.meta", "label_names", "labels"),
    "cifar100": ("meta", "fine_label_names", "fine_labels"),
}
SPLITS = ("test", "train")
IMAGE_SIZE = 32

_np_reconstruct = np.zeros(0).__reduce__()[0]  # numpy.core or numpy._core, whichever this numpy has


class _Refused(Exception):
    pass


class _ArrayClass:
    """Stand-in for ``numpy.ndarray`` so a pickle cannot call the constructor itself (it may only
    hand it to ``_reconstruct``, whose array is then sized by the pickle's own data)."""

    def __new__(cls, *args, **kwargs):
        raise _Refused("numpy.ndarray called directly")


def _reconstruct(subtype, shape=None, dtype=None):
    if subtype is not _ArrayClass:
        raise _Refused(f"_reconstruct of {type(subtype).__name__}")
    return _np_reconstruct(np.ndarray, (0,), b"b")


def _dtype(spec, align=False, copy=False):
    if not isinstance(spec, (str, bytes)):
        raise _Refused(f"numpy dtype {spec!r}")
    d = np.dtype(spec.decode("latin1") if isinstance(spec, bytes) else spec, bool(align), bool(copy))
    if d.kind not in "biuf":
        raise _Refused(f"numpy dtype {d}")
    return d


def _latin1_encode(obj, encoding="utf-8"):
    """Protocol-2 pickles written by Python 3 store bytes as ``_codecs.encode(text, "latin1")``."""
    if not isinstance(obj, str) or str(encoding).lower().replace("-", "") != "latin1":
        raise _Refused(f"_codecs.encode with {type(obj).__name__}, {encoding!r}")
    return obj.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ArrayClass,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r}")


def _text(x) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else x


def _check_value(v, path: Path, key: str):
    if isinstance(v, np.ndarray):
        if v.dtype.hasobject:
            raise TGEMError(f"refusing to load {path}: unexpected object array under '{key}'")
    elif isinstance(v, list):
        for x in v:
            if not isinstance(x, (int, str, bytes)):
                raise TGEMError(f"refusing to load {path}: unexpected object {type(x).__name__} in '{key}'")
    elif not isinstance(v, (int, str, bytes)):
        raise TGEMError(f"refusing to load {path}: unexpected object {type(v).__name__} under '{key}'")


def safe_load_batch(path) -> dict:
    """Load one CIFAR pickle as a dict with str keys, refusing anything but arrays, lists, ints and text."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TGEMError(f"cannot read CIFAR file {path}: {exc.strerror or exc}") from None
    try:
        # latin1 is how Python 2 (which wrote the official files) strings map back to bytes losslessly.
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as exc:
        raise TGEMError(f"refusing to load {path}: unexpected object {exc} (CIFAR batches hold only arrays, "
                        "lists and text)") from None
    except Exception as exc:
        raise TGEMError(f"cannot read CIFAR file {path}: not a valid batch ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())})") from None
    if not isinstance(obj, dict):
        raise TGEMError(f"refusing to load {path}: unexpected object {type(obj).__name__} (expected a dict)")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, (str, bytes)):
            raise TGEMError(f"refusing to load {path}: unexpected key {type(k).__name__}")
        _check_value(v, path, _text(k))
        out[_text(k)] = v
    return out


def _normalise_which(which: str) -> str:
    w = str(which).lower().replace("-", "").replace("_", "")
    if w not in FOLDERS:
        raise TGEMError(f"unknown CIFAR variant '{which}' (choose from {', '.join(FOLDERS)})")
    return w


def find_cifar_folder(root, which: str) -> Path:
    """Accept either the extracted folder itself or its parent, since people point at both."""
    which = _normalise_which(which)
    root = Path(root).expanduser()
    meta_name = _META[which][0]
    if not root.exists():
        raise TGEMError(f"CIFAR folder {root} does not exist")
    if root.is_file():
        hint = " (extract the archive first, or use download_cifar)" if root.name.endswith((".tar.gz", ".tgz")) else ""
        raise TGEMError(f"CIFAR path {root} is a file, expected a folder{hint}")
    for cand in (root / FOLDERS[which], root):
        if (cand / meta_name).is_file():
            return cand
    raise TGEMError(f"no {which} data in {root}: expected {root}/{FOLDERS[which]}/ or a folder holding "
                    f"{meta_name} and {', '.join(_BATCHES[(which, 'test')])}")


def _batch_arrays(batch: dict, path: Path, labels_key: str, num_classes: int):
    data, labels = batch.get("data"), batch.get(labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise TGEMError(f"CIFAR file {path} has no uint8 'data' array of shape (N, 3072)")
    if labels is None:
        raise TGEMError(f"CIFAR file {path} has no '{labels_key}'")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise TGEMError(f"CIFAR file {path} has {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise TGEMError(f"CIFAR file {path} has labels outside 0..{num_classes - 1}")
    return data, labels


def load_cifar(root, which: str = "cifar10", split: str = "test", n: int | None = None) -> Dataset:
    """CIFAR-10 / CIFAR-100 (fine labels) as uint8 (N, 32, 32, 3) images; ``n`` keeps the first n.

    The official batches are already shuffled, so the first n are a fair sample and later
    batches need not be read at all.
    """
    which = _normalise_which(which)
    if split not in SPLITS:
        raise TGEMError(f"unknown CIFAR split '{split}' (choose from {', '.join(SPLITS)})")
    if n is not None and n < 1:
        raise TGEMError(f"n must be a positive number of images, got {n}")
    folder = find_cifar_folder(root, which)
    meta_name, names_key, labels_key = _META[which]
    meta = safe_load_batch(folder / meta_name)
    names = meta.get(names_key)
    if not isinstance(names, list) or not names:
        raise TGEMError(f"CIFAR file {folder / meta_name} has no '{names_key}' list")
    classes = [_text(c).replace("_", " ") for c in names]

    datas, labels, files, coarse = [], [], [], []
    have = 0
    for fname in _BATCHES[(which, split)]:
        path = folder / fname
        if not path.is_file():
            raise TGEMError(f"CIFAR file {path} is missing")
        batch = safe_load_batch(path)
        data, lab = _batch_arrays(batch, path, labels_key, len(classes))
        take = len(data) if n is None else min(len(data), n - have)
        datas.append(data[:take])
        labels.append(lab[:take])
        files.extend(_text(f) for f in batch.get("filenames", [])[:take])
        if which == "cifar100" and "coarse_labels" in batch:
            coarse.append(np.asarray(batch["coarse_labels"], dtype=np.int64)[:take])
        have += take
        if n is not None and have >= n:
            break

    data = np.concatenate(datas)
    images = np.ascontiguousarray(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
    info = {"root": str(folder), "split": split}
    if len(files) == len(images):
        info["files"] = files
    if which == "cifar100":
        coarse_names = meta.get("coarse_label_names")
        if isinstance(coarse_names, list):
            info["coarse_classes"] = [_text(c).replace("_", " ") for c in coarse_names]
        if coarse and sum(len(c) for c in coarse) == len(images):
            info["coarse_labels"] = np.concatenate(coarse)
    return Dataset(name=f"{which}-{split}", images=images, labels=np.concatenate(labels), classes=classes,
                   meta=info)


def _fetch(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
    except OSError as exc:
        raise TGEMError(f"cannot download {url}: {' '.join(str(exc).split())}") from None


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_members(tar: tarfile.TarFile, archive_name: str, top: str) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        p = PurePosixPath(m.name.replace("\\", "/"))
        if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
            raise TGEMError(f"refusing to extract {archive_name}: unsafe member path {m.name!r}")
        if not (m.isfile() or m.isdir()):
            raise TGEMError(f"refusing to extract {archive_name}: member {m.name!r} is not a plain file or folder")
        if not p.parts or p.parts[0] != top:
            raise TGEMError(f"refusing to extract {archive_name}: member {m.name!r} is outside {top}/")
    return members


def download_cifar(which: str = "cifar10", dest=".") -> Path:
    """Fetch and extract the official archive into ``dest``; returns the extracted folder.

    The md5 is checked before anything is extracted, members are vetted (no absolute paths,
    no "..", no links), and both the download and the extraction go to temporary names that
    are renamed only when complete, so an interrupted run never leaves a folder that looks valid.
    """
    which = _normalise_which(which)
    dest = Path(dest).expanduser()
    top = FOLDERS[which]
    folder = dest / top
    if (folder / _META[which][0]).is_file():
        return folder
    if folder.exists():
        raise TGEMError(f"{folder} exists but is incomplete; remove it and retry")
    dest.mkdir(parents=True, exist_ok=True)
    archive, expected = _ARCHIVES[which]
    url = BASE_URL + archive
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive}.", suffix=".part", dir=dest)
    os.close(fd)
    tmp = Path(tmp_name)
    work = None
    try:
        _fetch(url, tmp)
        got = _md5(tmp)
        if got != expected:
            raise TGEMError(f"checksum mismatch for {url}: md5 {got}, expected {expected} (nothing was extracted)")
        work = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=dest))
        try:
            with tarfile.open(tmp, "r:gz") as tar:
                members = _check_members(tar, archive, top)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(work, members=members, **extra)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise TGEMError(f"cannot extract {archive}: {' '.join(str(exc).split())}") from None
        os.replace(work / top, folder)
    finally:
        tmp.unlink(missing_ok=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return folder
