"""Stream images from a folder, webdataset tars or parquet files into a feature cache on disk.

One cache shard per input shard: `NNNNNN.z.npy` (readouts, (n, L, D)), `NNNNNN.patch.npy` (mean-patch readouts,
(n, L, D); caches made before them lack it and say so in their manifest), `NNNNNN.rates.npy` (MLP activation
rates, (n, L, M), when asked for), `NNNNNN.text.npy` (unit caption embeddings, (n, D)), `NNNNNN.label.npy`
(int32 index into the shard's label names, -1 for none), `NNNNNN.key.npy` (int64 caption ids, equal for
equal captions, 0 for none), all float16 where they are features, then `NNNNNN.json` (the items' ids,
labels and captions, the skipped items with their reasons), written last: a shard is in the cache when
its JSON is. Every file is written under a temporary name and renamed, so a killed extraction leaves
whole shards and temporaries; a rerun removes the temporaries and extracts the shards that are missing.
`manifest.json` says what made the cache (backbone fingerprint, settings, the input listing); a cache
made otherwise is refused in one line. `tgems.features.FeatureCache` reads it. See docs/fit.md.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from tqdm.auto import tqdm

from tgems.errors import TGEMError
from tgems.features import CACHE_FORMAT, CACHE_KIND, MANIFEST, FeatureCache, read_manifest, shard_file
from tgems.io import commit, is_tmp, tmp_path, write_json
from tgems.training.captions import check_text_columns, shard_text, split_text_options
from tgems.training.settings import FIT_WORKERS

CHUNK = 64  # images per encoder call: one chunk of the reader
FEATURE_DTYPE = np.float16
STREAM_KINDS = ("folder", "webdataset", "wds", "parquet")
_HEADER = 128  # a fixed .npy header size, so a shard's length can be written after its rows


def is_stream_spec(spec) -> bool:
    return isinstance(spec, str) and spec.strip().partition(":")[0].lower() in STREAM_KINDS


def caption_key(text: str) -> int:
    """A 63-bit id of a caption (never 0, which stands for none): equal captions, equal ids."""
    k = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
    return k or 1


class _NpyRows:
    """A .npy file written row block by row block (its length is known only at the end)."""

    def __init__(self, path: Path, dtype, tail: tuple):
        self.path, self.tmp, self.dtype, self.tail, self.n = path, tmp_path(path), np.dtype(dtype), tuple(tail), 0
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * _HEADER)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.tail:
            raise ValueError(f"rows of shape {rows.shape[1:]} for a file of rows {self.tail}")
        self.f.write(rows.tobytes())
        self.n += len(rows)

    def close(self) -> None:
        shape = (self.n, *self.tail)
        text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(self.dtype),
                                                                         shape)
        text = text.ljust(_HEADER - 11) + "\n"
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER - 10) + text.encode("latin1"))
        self.f.close()
        commit(self.tmp, self.path)

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class _ShardWriter:
    def __init__(self, root: Path, index: int, backbone, rates: bool):
        L, D = backbone.num_layers, backbone.embed_dim
        self.root, self.index = root, index
        self.files = {"z": _NpyRows(shard_file(root, index, "z"), FEATURE_DTYPE, (L, D)),
                      "patch": _NpyRows(shard_file(root, index, "patch"), FEATURE_DTYPE, (L, D)),
                      "text": _NpyRows(shard_file(root, index, "text"), FEATURE_DTYPE, (D,)),
                      "label": _NpyRows(shard_file(root, index, "label"), np.int32, ()),
                      "key": _NpyRows(shard_file(root, index, "key"), np.int64, ())}
        if rates:
            self.files["rates"] = _NpyRows(shard_file(root, index, "rates"), FEATURE_DTYPE, (L, backbone.mlp_dim))
        self.ids, self.labels, self.captions, self.skipped, self.names = [], [], [], [], {}

    def add(self, backbone, items: list, texts: list) -> None:
        """Encode and append kept items (decoded images and their Text)."""
        out = backbone.hidden_states(backbone.preprocess([it.image for it in items]), rates="rates" in self.files,
                                     patch=True)
        self.files["z"].append(out["z"].float().cpu().numpy())
        self.files["patch"].append(out["patch"].float().cpu().numpy())
        if "rates" in self.files:
            self.files["rates"].append(out["rates"].float().cpu().numpy())
        emb = np.zeros((len(items), backbone.embed_dim), np.float32)
        with_caption = [i for i, t in enumerate(texts) if t.caption]
        if with_caption:
            enc = backbone.encode_text([texts[i].caption for i in with_caption])
            emb[with_caption] = F.normalize(enc.float(), dim=-1).cpu().numpy()
        self.files["text"].append(emb)
        self.files["label"].append(np.array([-1 if t.label is None else self.names.setdefault(t.label, len(self.names))
                                             for t in texts], np.int32))
        self.files["key"].append(np.array([caption_key(t.caption) if t.caption else 0 for t in texts], np.int64))
        self.ids += [it.id for it in items]
        self.labels += [t.label for t in texts]
        self.captions += [t.caption for t in texts]

    @property
    def n(self) -> int:
        return len(self.ids)

    def close(self, shard, complete: bool) -> dict:
        for f in self.files.values():
            f.close()
        meta = {"index": self.index, "input": shard.name, "n": self.n, "label_names": list(self.names),
                "complete": complete, "ids": self.ids, "labels": self.labels, "captions": self.captions,
                "skipped": self.skipped}
        write_json(shard_file(self.root, self.index, "json"), meta)
        return meta

    def discard(self) -> None:
        for f in self.files.values():
            f.discard()


def cache_identity(backbone, source, text_opts: dict, rates: bool, max_images: int | None) -> dict:
    """What a cache is made of; a rerun must match it (rates aside: a cache with rates serves cls fits; and
    mean-patch readouts, which caches made before them lack)."""
    return {"format": CACHE_FORMAT, "kind": CACHE_KIND, "backbone": backbone.name,
            "fingerprint": backbone.fingerprint(),
            "settings": {"rates": bool(rates), "patch": True, "dtype": np.dtype(FEATURE_DTYPE).name,
                         "model_dtype": str(backbone.dtype).replace("torch.", ""),
                         "image_size": backbone.image_size, "max_images": max_images, "text": dict(text_opts)},
            "input": source.manifest()}


def _check_same(root: Path, old: dict, new: dict) -> None:
    if old.get("kind") != CACHE_KIND or old.get("format") != CACHE_FORMAT:
        raise TGEMError(f"{root} is not a tgems feature cache of format {CACHE_FORMAT}; use another --cache")
    if old.get("fingerprint") != new["fingerprint"]:
        raise TGEMError(f"feature cache {root} was made for another backbone ('{old.get('backbone')}', fingerprint "
                        f"{str(old.get('fingerprint'))[:12]}), not for '{new['backbone']}' (fingerprint "
                        f"{new['fingerprint'][:12]}); use another --cache or remove it")
    a, b = dict(old.get("settings", {})), dict(new["settings"])
    if b.pop("rates") and not a.get("rates"):
        raise TGEMError(f"feature cache {root} holds no activation rates (it was made for a cls fit); a rates "
                        f"fit needs another --cache (a cache made for rates serves both spaces)")
    a.pop("rates", None)
    b.pop("patch"), a.pop("patch", None)  # made before mean-patch readouts: a fit that reads them says so
    diff = [f"{k} {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise TGEMError(f"feature cache {root} was made with other settings ({'; '.join(diff)}); use another "
                        f"--cache or remove it")
    if old.get("input") != new["input"]:
        raise TGEMError(f"feature cache {root} was made from other input ({old.get('input', {}).get('root')}, "
                        f"{old.get('input', {}).get('shards')} shards, digest {old.get('input', {}).get('digest')});"
                        f" use another --cache or remove it")


def build_cache(backbone, spec: str, cache_dir, *, rates: bool = False, max_images: int | None = None,
                workers: int = FIT_WORKERS, progress: bool = True) -> dict:
    """Extract the features of a streamed source into `cache_dir`, resuming a killed extraction.

    Returns a summary: images, shards, skipped items (with reasons), seconds and images per second of
    the encoding done by this call (0 images when every shard was already there)."""
    if max_images is not None and max_images < 1:
        raise TGEMError(f"--max-images must be a positive number, got {max_images}")
    reader_spec, text_opts = split_text_options(spec)
    from tgems.jobs.sources import open_source
    from tgems.jobs.readers import stream_chunks

    source = open_source(reader_spec)
    check_text_columns(source, text_opts)
    root = Path(cache_dir).expanduser()
    ident = cache_identity(backbone, source, text_opts, rates, max_images)
    old = read_manifest(root)
    if old is not None:
        _check_same(root, old, ident)
        ident = old
        rates = bool(old["settings"]["rates"])
    elif root.exists() and (not root.is_dir() or any(not is_tmp(p) for p in root.iterdir())):
        raise TGEMError(f"--cache {root} exists and is not a tgems feature cache (no {MANIFEST}); refusing to use it")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TGEMError(f"cannot make --cache {root}: {e.strerror or e}") from None
    for p in root.iterdir():
        if is_tmp(p):  # left by a killed extraction
            p.unlink()
    if old is None:
        write_json(root / MANIFEST, {**ident, "complete": False})

    done = {}
    for shard in source.shards:
        f = shard_file(root, shard.index, "json")
        if f.is_file():
            done[shard.index] = json.loads(f.read_text())
    kept_before = 0
    todo = []
    for shard in source.shards:
        if max_images is not None and kept_before >= max_images:
            break
        if shard.index in done:
            kept_before += done[shard.index]["n"]
        else:
            todo.append(shard)
    total = max_images if max_images is not None else source.num_items
    bar = tqdm(total=total, initial=min(kept_before, total or kept_before), desc="extract features", unit="img",
               disable=not progress, leave=False)
    t0, encoded = time.time(), 0
    if todo:
        kept = {s.index: done[s.index]["n"] for s in source.shards if s.index in done}
        writer, stop = None, False
        try:
            for chunk in stream_chunks(source, todo, chunk_size=CHUNK, workers=workers):
                shard = chunk.shard
                if writer is None:
                    writer = _ShardWriter(root, shard.index, backbone, rates)
                    text = shard_text(source, shard, text_opts)
                    quota = None if max_images is None else max_images - sum(
                        n for i, n in kept.items() if i < shard.index)
                    if quota is not None and quota <= 0:
                        writer.discard()
                        writer = None
                        break
                items, texts = [], []
                for it in chunk.items:
                    if quota is not None and writer.n + len(items) >= quota:
                        stop = True
                        break
                    if it.error is not None:
                        writer.skipped.append({"id": it.id, "reason": it.error})
                        continue
                    t = text.lookup(it)
                    if isinstance(t, str) or (t.label is None and t.caption is None):
                        writer.skipped.append({"id": it.id, "reason": t if isinstance(t, str) else
                                               "no caption or label"})
                        continue
                    items.append(it)
                    texts.append(t)
                if items:
                    writer.add(backbone, items, texts)
                    encoded += len(items)
                    bar.update(len(items))
                if chunk.last or stop:
                    kept[shard.index] = writer.close(shard, complete=not stop)["n"]
                    done[shard.index] = True
                    writer = None
                if stop:
                    break
        finally:
            if writer is not None:
                writer.discard()
    bar.close()
    seconds = time.time() - t0
    used = sorted(done)
    if max_images is None and len(used) < len(source.shards):
        raise TGEMError(f"feature extraction stopped before the end of {spec}")
    metas = [json.loads(shard_file(root, i, "json").read_text()) for i in used]
    skipped = [s for m in metas for s in m["skipped"]]
    write_json(root / MANIFEST, {**ident, "complete": True, "shards_used": used})
    return {"path": str(root), "images": sum(m["n"] for m in metas), "shards": len(used),
            "skipped": summarize_skipped(skipped), "encoded": encoded, "extract_seconds": round(seconds, 2),
            "images_per_second": round(encoded / seconds, 2) if encoded and seconds > 0 else None}


def summarize_skipped(skipped: list, most: int = 20) -> dict:
    """{count, reasons: {reason: count}, examples: the first `most` {id, reason}}."""
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    return {"count": len(skipped), "reasons": reasons, "examples": skipped[:most]}


def open_cache(backbone, spec: str, cache_dir, *, rates: bool, **kw) -> tuple[FeatureCache, dict]:
    """Build (or finish) the cache, then open it for reading."""
    summary = build_cache(backbone, spec, cache_dir, rates=rates, **kw)
    return FeatureCache.open(cache_dir, backbone, need_rates=rates), summary


__all__ = ["build_cache", "open_cache", "is_stream_spec", "cache_identity", "summarize_skipped", "STREAM_KINDS"]
