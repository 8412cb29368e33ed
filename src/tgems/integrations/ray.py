"""Ray Data for many machines: a `map_batches` predictor and a whole classify/embed job on an actor pool.

    import ray, tgems.integrations.ray as tr
    ds = ray.data.read_parquet("s3://bucket/images/")             # a column of image bytes (or uint8 arrays)
    out = ds.map_batches(tr.TGEMPredictor, fn_constructor_kwargs={"classifier": "my_classifier/"},
                         batch_size=64, batch_format="pyarrow", num_gpus=1, **tr.actor_pool(ray, 4))

`TGEMPredictor` builds the classifier once per actor (from a saved directory, a `ClassifierSpec` or
its fields as a dict) and returns the columns of the local runner's parts, plus `error` (null
for an image that was classified, the reason otherwise). `run_ray_job` is `tgems classify|embed
--engine ray`: shards are read by Ray tasks with the same readers as the local runner, the
predictor runs on `concurrency` actors, and the same OUT_DIR layout comes out. Installed with
``pip install "tgems[ray]"``; this module is the only one that imports ray.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from tgems.batch import (ClassifierSpec, _job_record, _locked, error_schema, finish_job,
                         part_name, predict_items, prepare_out_dir, result_schema, write_table_atomic)
from tgems.data.streaming import Item, Record, decode_records
from tgems.errors import TGEMError
from tgems.jobs.lister import ID_COLUMNS, find_image_column


def require_ray():
    """Import ray, or say how to install it (one line)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise TGEMError('the Ray engine needs the ray extra: pip install "tgems[ray]"') from None
    return ray


def actor_pool(ray, concurrency) -> dict:
    """The map_batches argument for an actor pool of `concurrency` actors (an int, or (min, max)) in the current
    API of the installed Ray: `compute=ActorPoolStrategy(...)` from Ray 2.51 (which deprecates `concurrency=`),
    `concurrency=` before it (which deprecated the strategy classes)."""
    version = tuple(int(x) for x in re.findall(r"\d+", ray.__version__)[:2])
    if version < (2, 51):
        return {"concurrency": concurrency}
    if isinstance(concurrency, tuple):
        return {"compute": ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])}
    return {"compute": ray.data.ActorPoolStrategy(size=int(concurrency))}


def build_classifier(classifier):
    """A saved-classifier directory, a ClassifierSpec (or its fields as a dict), or a ready classifier."""
    if isinstance(classifier, ClassifierSpec):
        return classifier.build()
    if isinstance(classifier, dict):
        return ClassifierSpec(**classifier).build()
    if isinstance(classifier, (str, os.PathLike)):
        return ClassifierSpec(classifier=str(classifier)).check().build()
    if hasattr(classifier, "predict"):
        return classifier
    raise TGEMError(f"cannot build a classifier from {type(classifier).__name__}")


def _column_lists(batch) -> dict:
    """pyarrow Table, pandas DataFrame or dict of numpy arrays -> {name: list or array}."""
    if hasattr(batch, "column_names") and hasattr(batch, "column"):  # pyarrow
        out = {}
        for name in batch.column_names:
            col = batch.column(name)
            try:
                out[name] = col.to_pylist()
            except Exception:
                out[name] = col.to_numpy()
        return out
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return {c: list(batch[c]) for c in batch.columns}
    return dict(batch)


class TGEMPredictor:
    """Callable class for `Dataset.map_batches`: one classifier per actor, batches of image bytes or arrays."""

    def __init__(self, classifier, task: str = "classify", image_column: str | None = None,
                 id_column: str | None = None):
        if task not in ("classify", "embed"):
            raise TGEMError(f"unknown task '{task}' (use classify or embed)")
        self.task, self.image_column, self.id_column = task, image_column, id_column
        self.classifier = build_classifier(classifier)
        self.schema = result_schema(task)

    def _items(self, batch) -> list:
        cols = _column_lists(batch)
        name = find_image_column(list(cols), self.image_column)
        if name is None or name not in cols:
            raise TGEMError(f"no image column in the batch (columns: {', '.join(cols)}; set image_column=)")
        images = cols[name]
        n = len(images)
        id_col = self.id_column or next((c for c in ID_COLUMNS if c in cols), None)
        ids = [str(x) for x in cols[id_col]] if id_col else [str(i) for i in range(n)]
        labels = cols.get("source_label", [None] * n)
        errors = cols.get("error", [None] * n)
        records, arrays = [], {}
        for i in range(n):
            img = images[i]
            if errors[i] is not None:
                records.append(Record(ids[i], source_label=labels[i], error=errors[i]))
            elif isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim in (2, 3):
                arrays[i] = img
                records.append(Record(ids[i], source_label=labels[i]))
            elif isinstance(img, list):  # a nested list from pyarrow's to_pylist of a tensor column
                arrays[i] = np.asarray(img, dtype=np.uint8)
                records.append(Record(ids[i], source_label=labels[i]))
            else:
                records.append(Record(ids[i], data=img, source_label=labels[i]))
        items = decode_records([r for i, r in enumerate(records) if i not in arrays])
        it = iter(items)
        from PIL import Image

        out = []
        for i, r in enumerate(records):
            out.append(Item(r.id, Image.fromarray(arrays[i]).convert("RGB"), r.source_label) if i in arrays
                       else next(it))
        return out

    def __call__(self, batch):
        import pyarrow as pa

        items = self._items(batch)
        good = [it for it in items if it.error is None]
        table, bad = predict_items(self.classifier, good, self.task)
        failed = [(it.id, it.source_label, it.error) for it in items if it.error is not None]
        failed += [(i, next((it.source_label for it in good if it.id == i), None), why) for i, why in bad]
        if table is None:
            table = self.schema.empty_table()
        table = table.append_column("error", pa.nulls(table.num_rows, pa.string()))
        if failed:
            cols = {f.name: pa.nulls(len(failed), f.type) for f in self.schema}
            cols["id"] = pa.array([f[0] for f in failed], pa.string())
            cols["source_label"] = pa.array([f[1] for f in failed], pa.string())
            cols["error"] = pa.array([f[2] for f in failed], pa.string())
            table = pa.concat_tables([table, pa.table(cols, schema=table.schema)])
        return table


def _read_units(source, batch_size: int) -> list:
    """Read tasks: a folder block is cut into batch-sized pieces (so every actor gets blocks to work on even when
    there are few shards); a tar or parquet file is read whole by one task."""
    units = []
    for s in source.shards:
        if source.kind == "folder":
            units += [{"shard": s.index, "start": a, "stop": a + batch_size} for a in range(0, len(s.files), batch_size)]
        else:
            units.append({"shard": s.index, "start": 0, "stop": -1})
    return units


def _read_shard(row: dict, source) -> list:
    """Ray task: the raw records of one shard or piece of one (bytes, not decoded: the actors decode)."""
    shard = source.shards[int(row["shard"])]
    if source.kind == "folder":
        shard = dataclasses.replace(shard, files=shard.files[int(row["start"]):int(row["stop"])])
    out = []
    for r in source.records(shard):
        data = r.data
        if data is None and r.path is not None and r.error is None:
            try:
                data = Path(r.path).read_bytes()
            except OSError as exc:
                r.error = f"cannot read file: {exc.strerror or exc}"
        out.append({"id": r.id, "bytes": data, "source_label": r.source_label, "error": r.error,
                    "source": shard.name})
    return out


def run_ray_job(classifier, data, out_dir, *, task: str = "classify", batch_size: int = 64,
                concurrency: int | tuple = 2, num_gpus: float = 0, address: str | None = None,
                progress: bool = True, settings: dict | None = None) -> dict:
    """A whole classify/embed job on Ray Data, writing the local runner's OUT_DIR layout.

    Ray Data has no per-shard resume: a rerun of a finished job only rewrites the summary, a rerun of an
    unfinished one starts over (its settings are checked exactly as for the local runner).
    """
    from tgems.batch import describe_predictor
    from tgems.data.streaming import StreamSource, open_source

    ray = require_ray()
    source = data if isinstance(data, StreamSource) else open_source(data)
    if hasattr(classifier, "build") and hasattr(classifier, "settings"):  # a ClassifierSpec: ship plain fields
        settings = settings or classifier.settings()
        classifier = dataclasses.asdict(classifier)
    elif isinstance(classifier, dict):
        settings = settings or ClassifierSpec(**classifier).settings()
    elif isinstance(classifier, (str, os.PathLike)):
        settings = settings or ClassifierSpec(classifier=str(classifier)).check().settings()
        classifier = {"classifier": str(classifier)}
    else:
        settings = settings or describe_predictor(classifier)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TGEMError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _locked(out):
        job = prepare_out_dir(out, _job_record(task, source, settings, batch_size, "ray"), "ray")
        if (out / "_SUCCESS").is_file():
            return finish_job(out, job, task, started, {"skipped": len(list(out.glob("part-*.parquet")))})
        for p in list(out.glob("part-*.parquet")) + list((out / "_errors").glob("*.parquet")):
            p.unlink()  # an unfinished earlier Ray run of this job: Ray starts over
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        tmp = out / f".ray.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            units = _read_units(source, batch_size)
            ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
            ds = ds.flat_map(_read_shard, fn_kwargs={"source": source}, num_cpus=0)  # I/O: leave the CPUs to the actors
            ds = ds.map_batches(TGEMPredictor, fn_constructor_kwargs={"classifier": classifier, "task": task},
                                batch_size=batch_size, batch_format="pyarrow", num_gpus=num_gpus or None,
                                **actor_pool(ray, concurrency))
            ds.write_parquet(str(tmp), ray_remote_args={"num_cpus": 0})
            n_images = _split_outputs(tmp, out, task)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return finish_job(out, job, task, started, {"written": len(list(out.glob("part-*.parquet"))),
                                                     "images": n_images})


def _split_outputs(tmp: Path, out: Path, task: str) -> int:
    """Ray's output files -> part-NNNNN.parquet (classified rows) and _errors/ (the rest), one file at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = result_schema(task)
    files = sorted(tmp.rglob("*.parquet"))
    errors, n = [], 0
    for i, f in enumerate(files):
        t = pq.read_table(f)
        n += t.num_rows
        bad = pc.is_valid(t.column("error"))
        e = t.filter(bad)
        if e.num_rows:
            errors.append(pa.table({"id": e.column("id").cast(pa.string()),
                                    "part": pa.nulls(e.num_rows, pa.string()),
                                    "source": pa.nulls(e.num_rows, pa.string()),
                                    "reason": e.column("error").cast(pa.string())}, schema=error_schema()))
        good = t.filter(pc.invert(bad)).select(schema.names).cast(schema)
        write_table_atomic(out / part_name(i), good)
    if errors:
        (out / "_errors").mkdir(exist_ok=True)
        write_table_atomic(out / "_errors" / part_name(0), pa.concat_tables(errors))
    return n
