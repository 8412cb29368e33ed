"""Where a checkpoint comes from: a shipped name, a local directory, or a hub id (the HF cache first).

Every failure is one line: a directory that is not a checkpoint, an unknown id while offline."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tgems.errors import TGEMError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def first_line(exc) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test, so an unreachable hub fails at once instead of after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_config(path: Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise TGEMError(f"{path} is not a model checkpoint: no config.json")
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise TGEMError(f"{path} is not a model checkpoint: unreadable config.json ({first_line(exc)})") from exc
    if not isinstance(cfg, dict):
        raise TGEMError(f"{path} is not a model checkpoint: config.json is not an object")
    return cfg


def check_weights(path: Path) -> None:
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise TGEMError(f"{path} is not a model checkpoint: no weights ({', '.join(WEIGHT_FILES)})")


def resolve(name: str) -> tuple[str, Path | None, dict]:
    """(source, local dir or None, config) for a shipped name, a local directory or a hub id."""
    from tgems.pretrained import model_path

    shipped = model_path(name)
    if shipped is not None:
        return name, shipped, read_config(shipped)
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        return name, path, read_config(path)
    from transformers.utils import cached_file

    error = None
    for local_only in ([True] if offline() or not hub_reachable() else [True, False]):
        try:
            config = cached_file(name, "config.json", local_files_only=local_only)
            return name, None, json.loads(Path(config).read_text())
        except Exception as exc:
            error = exc
    raise TGEMError(f"cannot load model '{name}': not a local directory and not reachable "
                    f"on the Hugging Face hub (offline?)") from error


def load_parts(source: str, path: Path | None, model_cls, dtype):
    """(model, tokenizer, preprocessor dict or None, directory) through transformers' from_pretrained."""
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    where = str(path) if path is not None else source
    local_only = path is not None or offline() or not hub_reachable()
    try:
        model = model_cls.from_pretrained(where, dtype=dtype, local_files_only=local_only)
    except Exception as exc:
        raise TGEMError(f"{where} is not a {model_cls.__name__} checkpoint: {first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    except Exception as exc:
        raise TGEMError(f"{where}: cannot load the tokenizer: {first_line(exc)}") from exc
    if path is not None:
        pre = path / "preprocessor_config.json"
        pre = pre if pre.is_file() else None
    else:
        pre = cached_file(source, "preprocessor_config.json", local_files_only=local_only,
                          _raise_exceptions_for_missing_entries=False)
        path = Path(cached_file(source, "config.json", local_files_only=local_only)).parent
    preprocessor = json.loads(Path(pre).read_text()) if pre else None
    return model, tokenizer, preprocessor, path
