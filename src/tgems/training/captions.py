"""The text that goes with a streamed image: a class label and/or a caption, read beside the readers.

The streaming readers (`tgems.jobs.sources`) hand back decoded images and their ids. What fitting
also needs is each image's text target, read here from the same shard and matched by id:

- webdataset: the `.cls` member (label) and the `.txt` member or the `caption` field of the `.json`
  member (caption); `?label=NAME` / `?caption=NAME` name another member extension or JSON field;
- parquet: a caption column (`caption`, `text` or `txt`, or `?caption=COL`) and a label column
  (`label`, `cls` or `class`, or `?label=COL`);
- folder: the class sub-folder is the label (as the reader gives it); folders have no captions.

These options are taken off the spec before it reaches `open_source`, so the readers stay as they are.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from tgems.errors import TGEMError

TEXT_OPTIONS = ("caption", "label")
CAPTION_COLUMNS = ("caption", "text", "txt")
LABEL_COLUMNS = ("label", "cls", "class")
_AMBIGUOUS = object()  # an id held by several samples: its text cannot be matched


def split_text_options(spec: str) -> tuple[str, dict]:
    """(the spec for `open_source`, {"caption": NAME, "label": NAME} as given)."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec, {}
    kind, _, arg = spec.strip().partition(":")
    path, sep, query = arg.partition("?")
    if not sep:
        return spec.strip(), {}
    keep, mine = [], {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in TEXT_OPTIONS:
            keep.append((k, v))
            continue
        if not v:
            raise TGEMError(f"option '{k}' in '{spec}' has no value")
        if kind.lower() == "folder":
            raise TGEMError(f"option '{k}' in '{spec}': a folder's labels are its class sub-folders, and it "
                            f"has no captions")
        mine[k] = v
    return f"{kind}:{path}" + (f"?{urlencode(keep)}" if keep else ""), mine


@dataclass(frozen=True)
class Text:
    label: str | None = None
    caption: str | None = None


def _clean(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = " ".join(str(value).split())
    return text or None


class ShardText:
    """The label and caption of each item of one shard (`lookup(item)`)."""

    def __init__(self, by_id: dict | None = None, from_reader: bool = False):
        self.by_id, self.from_reader = by_id or {}, from_reader

    def lookup(self, item) -> Text | str:
        """The item's Text, or a reason why it has none that can be trusted."""
        if self.from_reader:
            return Text(label=_clean(item.source_label))
        got = self.by_id.get(item.id)
        if got is _AMBIGUOUS:
            return "id shared by several samples of the shard: its text cannot be matched"
        return got or Text()


def _put(by_id: dict, key: str, text: Text) -> None:
    by_id[key] = _AMBIGUOUS if key in by_id else text


def _json_field(raw: bytes | None, name: str):
    if raw is None:
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj.get(name) if isinstance(obj, dict) else None


def _tar_text(path: str, opts: dict) -> dict:
    """Text members of a tar shard by sample key (images are skipped over, not read)."""
    from webdataset.tariterators import base_plus_ext

    cap, lab = opts.get("caption"), opts.get("label")
    wanted = {"txt", "json", "cls"} | {x for x in (cap, lab) if x}
    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None or ext.lower() not in wanted:
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext.lower()] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError):
        pass  # the reader reports the damage; what was read before it stands
    by_id: dict = {}
    for key in order:
        s = samples[key]
        caption = s.get(cap) if cap and cap in s else (_json_field(s.get("json"), cap) if cap else None)
        if caption is None and not cap:
            caption = s.get("txt") if "txt" in s else _json_field(s.get("json"), "caption")
        label = s.get(lab) if lab and lab in s else (_json_field(s.get("json"), lab) if lab else None)
        if label is None and not lab:
            label = s.get("cls") if "cls" in s else _json_field(s.get("json"), "label")
        _put(by_id, key, Text(_clean(label), _clean(caption)))
    return by_id


def _column(names: list, given: str | None, defaults: tuple, what: str, path: str) -> str | None:
    if given is not None:
        if given not in names:
            raise TGEMError(f"parquet file {path} has no {what} column '{given}' (columns: {', '.join(names)})")
        return given
    return next((c for c in defaults if c in names), None)


def _parquet_text(path: str, source, opts: dict) -> dict:
    """Caption and label columns of one parquet file by row id (the reader's ids: the id column or FILE:ROW)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    cap = _column(names, opts.get("caption"), CAPTION_COLUMNS, "caption", path)
    lab = _column(names, opts.get("label"), LABEL_COLUMNS, "label", path)
    id_col = source.options.get("id", "id")
    has_id = id_col in names
    cols = [c for c in (cap, lab) if c] + ([id_col] if has_id else [])
    by_id: dict = {}
    if not cols or cols == [id_col]:
        return by_id
    row, stem = 0, os.path.basename(path)
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        data = {c: batch.column(i).to_pylist() for i, c in enumerate(cols)}
        for r in range(batch.num_rows):
            key = data[id_col][r] if has_id else None
            _put(by_id, f"{stem}:{row}" if key is None else str(key),
                 Text(_clean(data[lab][r]) if lab else None, _clean(data[cap][r]) if cap else None))
            row += 1
    return by_id


def shard_text(source, shard, opts: dict) -> ShardText:
    """The text of every item of `shard` of an opened stream source."""
    if source.kind == "folder":
        return ShardText(from_reader=True)
    if source.kind == "webdataset":
        return ShardText(_tar_text(shard.name, opts))
    return ShardText(_parquet_text(shard.name, source, opts))


def check_text_columns(source, opts: dict) -> None:
    """Refuse, before any work, a parquet caption or label column that is named but absent."""
    if source.kind != "parquet":
        return
    import pyarrow.parquet as pq

    for shard in source.shards:
        names = pq.ParquetFile(shard.name).schema_arrow.names
        _column(names, opts.get("caption"), CAPTION_COLUMNS, "caption", shard.name)
        _column(names, opts.get("label"), LABEL_COLUMNS, "label", shard.name)
