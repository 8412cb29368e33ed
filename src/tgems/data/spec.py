"""One string names a dataset everywhere (CLI, configs, reports): ``KIND:ARG``."""
from __future__ import annotations

from pathlib import Path

from tgems.data.dataset import Dataset
from tgems.errors import TGEMError

_CIFAR_KINDS = {
    "cifar10": ("cifar10", "test"),
    "cifar10-test": ("cifar10", "test"),
    "cifar10-train": ("cifar10", "train"),
    "cifar100": ("cifar100", "test"),
    "cifar100-test": ("cifar100", "test"),
    "cifar100-train": ("cifar100", "train"),
}
SPEC_FORMS = ("scenes:SPLIT[:N]", "folder:DIR", "cifar10:DIR", "cifar10-train:DIR", "cifar100:DIR",
              "cifar100-train:DIR")


def _forms() -> str:
    return ", ".join(SPEC_FORMS)


def _limit(n_spec: int | None, n: int | None) -> int | None:
    """Both a spec's N and the caller's n are caps, so the smaller one wins."""
    caps = [x for x in (n_spec, n) if x is not None]
    if not caps:
        return None
    for x in caps:
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise TGEMError(f"number of samples must be a positive integer, got {x!r}")
    return min(caps)


def _scenes(spec: str, arg: str, n: int | None, seed: int) -> Dataset:
    from tgems.data import scenes

    splits = tuple(scenes.SPLITS)
    split, _, count = arg.partition(":")
    if split not in splits:
        what = f"unknown scenes split '{split}'" if split else "missing scenes split"
        raise TGEMError(f"{what} in dataset '{spec}' (choose from {', '.join(splits)})")
    n_spec = None
    if count:
        try:
            n_spec = int(count)
        except ValueError:
            raise TGEMError(f"bad sample count '{count}' in dataset '{spec}' (expected scenes:SPLIT:N)") from None
        if n_spec < 1:
            raise TGEMError(f"sample count in dataset '{spec}' must be positive")
    return scenes.load_split(split, n=_limit(n_spec, n), seed=seed)


def load_dataset(spec: str, *, n: int | None = None, seed: int = 0) -> Dataset:
    """Parse a dataset spec and load it.

    ``n`` caps the number of samples: the first n for scenes and CIFAR (whose order is already
    random), a seeded random subset for folders (whose sorted order groups the classes).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TGEMError(f"empty dataset spec (use one of {_forms()})")
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind = kind.lower()
    if not sep:
        hint = f"; for an image folder use folder:{spec}" if Path(spec).expanduser().is_dir() else ""
        raise TGEMError(f"dataset spec '{spec}' has no KIND: prefix (use one of {_forms()}){hint}")
    if kind == "scenes":
        ds = _scenes(spec, arg, n, seed)
    elif kind in ("folder", *_CIFAR_KINDS):
        if not arg:
            raise TGEMError(f"dataset spec '{spec}' is missing its folder ({kind}:DIR)")
        n = _limit(None, n)
        if kind == "folder":
            from tgems.data.folder import load_folder

            ds = load_folder(arg, n=n, seed=seed)
        else:
            from tgems.data.cifar import load_cifar

            which, split = _CIFAR_KINDS[kind]
            ds = load_cifar(arg, which=which, split=split, n=n)
    else:
        raise TGEMError(f"unknown dataset kind '{kind}' in '{spec}' (use one of {_forms()})")
    ds.meta = {**ds.meta, "spec": spec}
    return ds
