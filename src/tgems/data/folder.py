"""Image-folder datasets: one sub-folder per class, the sub-folder name is the class text."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tgems.data.dataset import Dataset
from tgems.images import open_rgb
from tgems.errors import TGEMError
from tgems.jobs.lister import IMAGE_EXTENSIONS, class_folders, class_text, list_folder  # noqa: F401 (re-exported)


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


def load_folder(root, *, n: int | None = None, seed: int = 0, skip_bad: bool = False) -> Dataset:
    """Read ``root/<class_text>/[sub-folders/]<image>``; classes and files are sorted so runs are reproducible.

    The files are those `tgems.jobs.lister.list_folder` gives a batch job, less the ones directly under
    the root (they have no class).

    ``n`` keeps a seeded random subset of the files (chosen before decoding, so large folders
    stay cheap); plain "first n" would keep only the first classes. Class folders without
    images still count as classes: zero-shot labels need no examples. With ``skip_bad`` an
    unreadable file is left out and listed in ``meta["skipped"]`` instead of raising.
    """
    root = Path(root).expanduser()
    class_dirs = class_folders(root)
    if not class_dirs:
        raise TGEMError(f"image folder {root} has no class sub-folders (expected {root}/<class name>/<images>)")
    classes = [class_text(name) for name in class_dirs]
    if "" in classes:
        bad = class_dirs[classes.index("")]
        raise TGEMError(f"class folder '{bad}' in {root} gives an empty class text")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise TGEMError(f"two class folders in {root} give the same class text '{dup}'")

    index = {c: i for i, c in enumerate(classes)}
    listed = [e for e in list_folder(root) if e.label is not None]  # the listing batch jobs stream
    files = [root / e.rel for e in listed]
    labels = [index[e.label] for e in listed]
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
