"""Streaming image sources for batch jobs: a folder, webdataset tar shards or parquet files.

Unlike `load_dataset`, nothing here holds the whole set in memory. A source is cut into *shards*
(a tar file, a parquet file, or a fixed block of files of a folder) so that a job writes one output
part per shard and can resume shard by shard. Images are decoded (and resized / cropped) ahead of the
encoder, in worker processes behind a bounded queue: see `tgems.jobs.readers`. A bad item (truncated file, text named .png, empty tar member,
null bytes) becomes a record with an error reason rather than an exception; a missing or unreadable
shard is a `TGEMError` raised by `open_source`, before any work.

Spec strings (one each), with optional settings after ``?``:

    folder:DIR[?block=1000]                       recursive; label = first sub-folder name, if any
    webdataset:PATTERN                            e.g. shards/{000000..000099}.tar; id = sample key
    parquet:PATH[?image=image&id=id]              a file or a directory of .parquet files
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl

from tgems.errors import TGEMError
from tgems.jobs.lister import IMAGE_EXTENSIONS, PARQUET_IMAGE_COLUMNS, WDS_IMAGE_KEYS, find_image_column, list_folder

STREAM_FORMS = ("folder:DIR[?block=N]", "webdataset:PATTERN", "parquet:PATH[?image=COL&id=COL]")
DEFAULT_BLOCK = 1000


@dataclass(frozen=True)
class Shard:
    """One unit of input that maps to one output part."""

    index: int
    name: str  # a file path, or "DIR[first..last]" for a block of a folder
    size: int | None  # number of items when known up front (tar shards: unknown)
    files: tuple = ()  # a folder block: (relative path, label) pairs


@dataclass
class Record:
    """One item as read (not yet decoded): bytes, or a path to read in the worker."""

    id: str
    data: bytes | None = None
    path: str | None = None
    source_label: str | None = None
    error: str | None = None


@dataclass
class Item:
    """One decoded item: an RGB PIL image (or, preprocessed by the reader, the model-size uint8 array),
    or the reason it has none."""

    id: str
    image: object = None
    source_label: str | None = None
    error: str | None = None


@dataclass
class Chunk:
    """Up to `chunk_size` consecutive items of one shard; `last` closes the shard."""

    shard: Shard
    items: list
    last: bool


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)  # object addresses would make reasons differ run to run


def decode_image(data: bytes):
    """Bytes -> RGB PIL image; raises ValueError with a stable, one-line reason."""
    from PIL import UnidentifiedImageError

    from tgems.images import open_rgb

    if data is None:
        raise ValueError("no image bytes (null)")
    if len(data) == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        return open_rgb(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised format)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"cannot decode image: {_one_line(exc)}") from None


# ------------------------------------------------------------------------------------- sources


@dataclass
class StreamSource:
    """A named, sharded, streaming image source. Use `open_source(spec)` to make one."""

    spec: str
    kind: str
    root: str
    shards: list
    options: dict = field(default_factory=dict)

    @property
    def num_items(self) -> int | None:
        sizes = [s.size for s in self.shards]
        return None if any(s is None for s in sizes) else sum(sizes)

    def manifest(self) -> dict:
        """What identifies the input: a job refuses to resume onto a changed input."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.index}\t{s.name}\t{s.size}\n".encode())
            for rel, _ in s.files:
                h.update(rel.encode() + b"\n")
            if self.kind != "folder":
                h.update(str(os.path.getsize(s.name)).encode())
        return {"kind": self.kind, "root": self.root, "shards": len(self.shards), "items": self.num_items,
                "options": dict(self.options), "digest": h.hexdigest()[:16]}

    def records(self, shard: Shard) -> Iterator[Record]:
        if self.kind == "folder":
            for rel, label in shard.files:
                yield Record(rel, path=os.path.join(self.root, rel), source_label=label)
        elif self.kind == "webdataset":
            yield from _tar_records(shard.name)
        else:
            yield from _parquet_records(shard.name, self.options["image"], self.options["id"],
                                        self.options.get("id_default", False))


def _split_options(arg: str, allowed: tuple, spec: str) -> tuple[str, dict]:
    path, sep, query = arg.partition("?")
    opts = {}
    if sep:
        for k, v in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            if k not in allowed:
                raise TGEMError(f"unknown option '{k}' in '{spec}' (allowed: {', '.join(allowed) or 'none'})")
            if not v:
                raise TGEMError(f"option '{k}' in '{spec}' has no value")
            opts[k] = v
    if not path:
        raise TGEMError(f"'{spec}' names no path")
    return path, opts


def open_source(spec: str, *, block: int | None = None, image_column: str | None = None,
                id_column: str | None = None) -> StreamSource:
    """Parse a streaming spec, list its shards and check they can be read (cheaply: names and headers)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise TGEMError(f"bad streaming data spec {spec!r} (use one of {', '.join(STREAM_FORMS)})")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "folder":
        path, opts = _split_options(arg, ("block",), spec)
        try:
            size = int(block or opts.get("block", DEFAULT_BLOCK))
        except ValueError:
            raise TGEMError(f"block in '{spec}' must be a whole number of files") from None
        if size < 1:
            raise TGEMError(f"block in '{spec}' must be a positive number of files")
        return _open_folder(spec, path, size)
    if kind in ("webdataset", "wds"):
        path, _ = _split_options(arg, (), spec)
        return _open_webdataset(spec, path)
    if kind == "parquet":
        path, opts = _split_options(arg, ("image", "id"), spec)
        return _open_parquet(spec, path, image_column or opts.get("image"), id_column or opts.get("id"))
    raise TGEMError(f"unknown streaming data kind '{kind}' in '{spec}' (use one of {', '.join(STREAM_FORMS)})")


def _open_folder(spec: str, path: str, block: int) -> StreamSource:
    root = Path(path).expanduser()
    files = [(e.rel, e.label) for e in list_folder(root)]
    if not files:
        raise TGEMError(f"image folder {root} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    shards = [Shard(i, f"{root}[{files[s][0]}..{files[min(s + block, len(files)) - 1][0]}]",
                    len(files[s:s + block]), tuple(files[s:s + block]))
              for i, s in enumerate(range(0, len(files), block))]
    return StreamSource(spec, "folder", str(root), shards, {"block": block})


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    try:
        return list(braceexpand(pattern))
    except Exception as exc:
        raise TGEMError(f"bad shard pattern '{pattern}': {_one_line(exc)}") from None


def _open_webdataset(spec: str, pattern: str) -> StreamSource:
    paths = _expand(str(Path(pattern).expanduser()))
    if not paths:
        raise TGEMError(f"shard pattern '{pattern}' names no files")
    for p in paths:
        if not os.path.isfile(p):
            raise TGEMError(f"tar shard {p} does not exist ({len(paths)} shards in '{pattern}')")
        try:
            with tarfile.open(p, "r:*") as tf:
                tf.next()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise TGEMError(f"tar shard {p} is not a readable tar file: {_one_line(exc)}") from None
    root = os.path.dirname(paths[0])
    return StreamSource(spec, "webdataset", root, [Shard(i, p, None) for i, p in enumerate(paths)])


def _tar_records(path: str) -> Iterator[Record]:
    """Samples of one tar shard via webdataset's reader: members grouped by key, the image by extension."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def members(f):
        for m in tar_file_iterator(f):
            m["__url__"] = path
            yield m

    n = 0
    try:
        with open(path, "rb") as f:
            for sample in group_by_keys(members(f)):
                n += 1
                key = sample["__key__"]
                ext = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
                label = sample.get("cls", sample.get("txt"))
                if isinstance(label, bytes):
                    label = label.decode("utf-8", "replace").strip() or None
                if ext is None:
                    yield Record(key, source_label=label, error="no image member in sample (looked for "
                                 + ", ".join("." + e for e in WDS_IMAGE_KEYS) + ")")
                else:
                    yield Record(key, data=sample[ext], source_label=label)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        # A shard cut short: the samples before the damage stand, the rest is one error record.
        yield Record(f"{os.path.basename(path)}#after-{n}", error=f"tar shard unreadable after {n} samples: "
                     f"{_one_line(exc)}")


def _parquet_files(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
        if not files:
            raise TGEMError(f"parquet directory {path} has no .parquet files")
        return files
    if not path.exists():
        raise TGEMError(f"parquet file {path} does not exist")
    return [str(path)]


def _open_parquet(spec: str, path: str, image_col: str | None, id_col: str | None) -> StreamSource:
    import pyarrow.parquet as pq

    files = _parquet_files(Path(path).expanduser())
    image_col = image_col or None
    id_default = id_col is None
    shards = []
    for i, f in enumerate(files):
        try:
            meta = pq.ParquetFile(f)
        except Exception as exc:
            raise TGEMError(f"cannot read parquet file {f}: {_one_line(exc)}") from None
        names = meta.schema_arrow.names
        if image_col is None:
            image_col = find_image_column(names)
            if image_col is None:
                raise TGEMError(f"parquet file {f} has no image column (looked for "
                                f"{', '.join(PARQUET_IMAGE_COLUMNS)}; name it with {spec.split('?')[0]}?image=COLUMN)")
        if image_col not in names:
            raise TGEMError(f"parquet file {f} has no column '{image_col}' (columns: {', '.join(names)})")
        if not id_default and id_col not in names:
            raise TGEMError(f"parquet file {f} has no id column '{id_col}' (columns: {', '.join(names)})")
        shards.append(Shard(i, f, meta.metadata.num_rows))
    root = os.path.dirname(files[0]) if len(files) == 1 else str(Path(path).expanduser())
    return StreamSource(spec, "parquet", root, shards,
                        {"image": image_col, "id": id_col or "id", "id_default": id_default})


def _parquet_records(path: str, image_col: str, id_col: str, id_default: bool) -> Iterator[Record]:
    """Rows of one parquet file, read in record batches; ids from `id_col`, or FILE:ROW when it is absent."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    has_id = id_col in pf.schema_arrow.names
    cols = [image_col] + ([id_col] if has_id else [])
    row = 0
    stem = os.path.basename(path)
    for batch in pf.iter_batches(batch_size=256, columns=cols):
        images = batch.column(0)
        if hasattr(images.type, "get_field_index") and images.type.get_field_index("bytes") >= 0:
            images = images.field("bytes")  # Hugging Face datasets' {bytes, path} image struct
        images = images.to_pylist()
        ids = batch.column(1).to_pylist() if has_id else [None] * len(images)
        for data, key in zip(images, ids):
            rid = f"{stem}:{row}" if key is None else str(key)
            row += 1
            if data is None:
                yield Record(rid, error="no image bytes (null)")
            elif isinstance(data, str):
                yield Record(rid, error="image column holds text, not bytes")
            else:
                yield Record(rid, data=bytes(data))


__all__ = ["open_source", "StreamSource", "Shard", "Record", "Item", "Chunk", "decode_image", "STREAM_FORMS"]
