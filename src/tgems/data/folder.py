"""Image-folder datasets: one sub-folder per class, the sub-folder name is the class text."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tgems.data.dataset import Dataset
from tgems.images import open_rgb
from tgems.errors import TGEMError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_image(path) -> Image.Image:
    """Open one image as RGB as a viewer shows it (`tgems.images`), turning every decoder failure into a one-line TGEMError.

    The pixels are decoded here (not lazily) so a truncated file fails now, naming the file,
    rather than later inside a batch.
    """
    path = Path(path)
    try:
        return open_rgb(path)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise TGEMError(f"cannot read image {path}: {_one_line(exc)}") from None


def class_text(folder_name: str) -> str:
    """Folder names cannot hold every text comfortably, so underscores stand for spaces."""
    return " ".join(folder_name.replace("_", " ").split())


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def load_folder(root, *, n: int | None = None, seed: int = 0, skip_bad: bool = False) -> Dataset:
    """Read ``root/<class_text>/<image>``; classes and files are sorted so runs are reproducible.

    ``n`` keeps a seeded random subset of the files (chosen before decoding, so large folders
    stay cheap); plain "first n" would keep only the first classes. Class folders without
    images still count as classes: zero-shot labels need no examples. With ``skip_bad`` an
    unreadable file is left out and listed in ``meta["skipped"]`` instead of raising.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise TGEMError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise TGEMError(f"image folder {root} is not a directory")
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    if not class_dirs:
        raise TGEMError(f"image folder {root} has no class sub-folders (expected {root}/<class name>/<images>)")
    classes = [class_text(p.name) for p in class_dirs]
    if "" in classes:
        bad = class_dirs[classes.index("")].name
        raise TGEMError(f"class folder '{bad}' in {root} gives an empty class text")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise TGEMError(f"two class folders in {root} give the same class text '{dup}'")

    files, labels = [], []
    for label, d in enumerate(class_dirs):
        for f in sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name):
            files.append(f)
            labels.append(label)
    if not files:
        raise TGEMError(f"image folder {root} has no images "
                        f"(looked for {', '.join(e[1:] for e in IMAGE_EXTENSIONS)} in its class sub-folders)")
    if n is not None:
        if n < 1:
            raise TGEMError(f"n must be a positive number of images, got {n}")
        if n < len(files):
            keep = np.sort(np.random.default_rng(seed).choice(len(files), size=n, replace=False))
            files = [files[i] for i in keep]
            labels = [labels[i] for i in keep]

    images, kept_files, kept_labels, skipped = [], [], [], []
    for f, label in zip(files, labels):
        try:
            images.append(read_image(f))
        except TGEMError:
            if not skip_bad:
                raise
            skipped.append(str(f))
            continue
        kept_files.append(str(f.relative_to(root)))
        kept_labels.append(label)
    if not images:
        raise TGEMError(f"image folder {root} has no readable images ({len(skipped)} skipped)")
    meta = {"root": str(root), "files": kept_files}
    if skip_bad:
        meta["skipped"] = skipped
    return Dataset(name=f"folder:{root.name}", images=images, labels=np.asarray(kept_labels, dtype=np.int64),
                   classes=classes, meta=meta)
