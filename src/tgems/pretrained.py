"""Shipped assets by name, so users never type a source-tree path: "embedded", "embedded:cls", "embedded:rates"."""
from __future__ import annotations

from pathlib import Path

from tgems.errors import TGEMError

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODEL = ASSETS / "embedded"
EMBEDDED_RETRIEVAL = ASSETS / "embedded_retrieval"
EMBEDDED_TGEMS = {"embedded:cls": ASSETS / "embedded_tgem" / "cls", "embedded:rates": ASSETS / "embedded_tgem" / "rates"}


def model_path(name: str) -> Path | None:
    """The directory of a shipped model name, or None when `name` is not one."""
    if name != "embedded":
        return None
    if not (EMBEDDED_MODEL / "config.json").is_file():
        raise TGEMError("the embedded default model is not shipped in this install "
                        "(run `tgems pretrain --preset embedded`)")
    return EMBEDDED_MODEL


def tgem_path(name_or_path) -> Path:
    """A T-GEM checkpoint directory from a shipped name ("embedded:cls") or a path."""
    name = str(name_or_path)
    if name in EMBEDDED_TGEMS:
        return EMBEDDED_TGEMS[name]
    if name.startswith("embedded:"):
        raise TGEMError(f"unknown shipped T-GEM '{name}' (choose from {', '.join(EMBEDDED_TGEMS)})")
    return Path(name).expanduser()
