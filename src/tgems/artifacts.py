"""One save / load for every saved thing: a directory of a JSON config and a safetensors file.

The config carries a format version, the backbone's name and fingerprint, and the sha256 of the tensors
file; a directory is written into a temporary sibling and swapped in (`tgems.io.atomic_dir`), and every
failure to read is one `TGEMError` line naming the damaged file. No pickles. Configs written before the
checksum existed (the shipped assets) are read as they are. Importing this module imports no torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tgems.errors import TGEMError


@dataclass(frozen=True)
class Kind:
    """A kind of artifact: its two files, what to call it in messages, and the newest format it has."""

    config: str
    tensors: str
    what: str
    format: int = 1


TGEM = Kind("tgem.json", "tgem.safetensors", "a T-GEM checkpoint", format=4)
CLASSIFIER = Kind("classifier.json", "classifier.safetensors", "a saved classifier", format=5)
RETRIEVAL = Kind("retrieval.json", "retrieval.safetensors", "a retrieval model", format=2)  # maps + scorer
INDEX = Kind("index.json", "index.safetensors", "a tgems index")
PRETRAIN_STATE = Kind("state.json", "model.safetensors", "a pretrain checkpoint")


def sha256_file(path) -> str:
    """The one checksum of a saved file (read in 1 MB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_artifact(path, kind: Kind) -> bool:
    path = Path(path)
    return (path / kind.config).is_file() and (path / kind.tensors).is_file()


def read_config(path, kind: Kind, required=()) -> dict:
    """The JSON config of an artifact directory, checked for its files, its format and `required` keys."""
    path = Path(path).expanduser()
    if not is_artifact(path, kind):
        raise TGEMError(f"{path} is not {kind.what} (expected {kind.config} and {kind.tensors})")
    try:
        cfg = json.loads((path / kind.config).read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TGEMError(f"cannot read {path / kind.config}: damaged ({str(e).splitlines()[0]})") from None
    fmt = cfg.get("format", 1)
    if not isinstance(fmt, int) or fmt > kind.format:
        raise TGEMError(f"{path / kind.config} has format {fmt!r}; this tgems reads {kind.what} up to format "
                        f"{kind.format} (upgrade tgems)")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise TGEMError(f"{path / kind.config} is damaged: missing {', '.join(missing)}")
    return cfg


def read_tensors(path, kind: Kind, cfg: dict | None = None) -> dict:
    """The tensors of an artifact directory; checked against the config's sha256 when it has one."""
    path = Path(path).expanduser()
    file = path / kind.tensors
    if cfg is not None and "sha256" in cfg and cfg["sha256"] != sha256_file(file):
        raise TGEMError(f"{file} is damaged (its checksum does not match {kind.config})")
    return load_tensors(file)


def read_extra(path, kind: Kind, cfg: dict, name: str) -> dict:
    """One more tensors file of an artifact (`write(..., extra=)`), checked against its sha256 in the config."""
    file = Path(path).expanduser() / name
    if not file.is_file():
        raise TGEMError(f"{file} is missing: {Path(path)} is not a whole {kind.what.split(' ', 1)[-1]}")
    want = (cfg.get("files") or {}).get(name)
    if want is not None and want != sha256_file(file):
        raise TGEMError(f"{file} is damaged (its checksum does not match {kind.config})")
    return load_tensors(file)


def load_tensors(file) -> dict:
    """A safetensors file, every failure one line naming the file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TGEMError(f"cannot read {file}: damaged or not a safetensors file ({why})") from None


def write(path, kind: Kind, cfg: dict, tensors: dict, extra: dict | None = None) -> Path:
    """Write tensors, then the config with their sha256 and the format, into a temporary directory that
    replaces `path` (an earlier artifact of the same kind or an empty directory, nothing else). `extra`: more
    tensors files {name: tensors} (a pretrain checkpoint's optimizer state), their sha256 under "files"."""
    from safetensors.torch import save_file

    from tgems.io import atomic_dir

    with atomic_dir(path, kind.config, kind.what) as tmp:
        sums = {}
        for name, more in {kind.tensors: tensors, **(extra or {})}.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in more.items()}, str(tmp / name))
            sums[name] = sha256_file(tmp / name)
        cfg = {"format": kind.format, **cfg, "sha256": sums.pop(kind.tensors)}
        if sums:
            cfg["files"] = sums
        (tmp / kind.config).write_text(json.dumps(cfg, indent=1, default=float))
    return Path(path)


def check_backbone(cfg: dict, backbone, path, what: str) -> None:
    """Refuse an artifact made for another backbone (by fingerprint), in one line."""
    if cfg.get("fingerprint") != backbone.fingerprint():
        raise TGEMError(f"{what} {path} was made for another backbone ('{cfg.get('backbone')}', fingerprint "
                        f"{str(cfg.get('fingerprint'))[:12]}), not for '{backbone.name}' "
                        f"(fingerprint {backbone.fingerprint()[:12]})")
