"""What an input holds, listed once for every consumer: `load_dataset("folder:...")` (fit, eval,
calibrate), the streaming reader of batch jobs and the Ray engine all see the same files, in the same
order, with the same labels, and look for the same image columns and tar members.

No torch, no PIL: the listing is cheap and imported by decoding workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tgems.errors import TGEMError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# webdataset member keys that hold an image: the extensions above, and the generic names writers use
WDS_IMAGE_KEYS = tuple(e[1:] for e in IMAGE_EXTENSIONS) + ("ppm", "image", "img")
# parquet columns tried, in this order, when no image column is named (local reader and Ray predictor)
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "bytes", "img", "png")
ID_COLUMNS = ("id", "path", "key")


@dataclass(frozen=True)
class FolderEntry:
    """One image file of a folder: its path relative to the root (posix), and the class text of its first
    sub-folder (None for a file directly under the root)."""

    rel: str
    label: str | None


def class_text(folder_name: str) -> str:
    """Folder names cannot hold every text comfortably, so underscores stand for spaces."""
    return " ".join(folder_name.replace("_", " ").split())


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_root(root) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise TGEMError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise TGEMError(f"image folder {root} is not a directory")
    return root


def class_folders(root) -> list[str]:
    """The names of the root's visible sub-folders, sorted: the classes of a labelled folder."""
    root = check_root(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_folder(root) -> list[FolderEntry]:
    """Every image under `root`, recursively (hidden files and folders skipped, symlinked folders followed
    once), sorted by relative path; the label is the first sub-folder's class text."""
    root = check_root(root)
    entries, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        label = class_text(rel_dir.parts[0]) if rel_dir.parts else None
        for f in filenames:
            if is_image_name(f):
                entries.append(FolderEntry((rel_dir / f).as_posix(), label or None))
    entries.sort(key=lambda e: e.rel)
    return entries


def find_image_column(names, wanted: str | None = None) -> str | None:
    """The image column of a table: `wanted` if given, else the first of PARQUET_IMAGE_COLUMNS present."""
    if wanted:
        return wanted if wanted in names else None
    return next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)


__all__ = ["IMAGE_EXTENSIONS", "WDS_IMAGE_KEYS", "PARQUET_IMAGE_COLUMNS", "ID_COLUMNS", "FolderEntry",
           "class_text", "list_folder", "class_folders", "find_image_column", "is_image_name"]
