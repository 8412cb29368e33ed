"""Ray for many machines: a `map_batches` predictor for Ray Data, and a whole classify/embed job on actors.

    import ray, tgems.integrations.ray as tr
    ds = ray.data.read_parquet("s3://bucket/images/")             # a column of image bytes (or uint8 arrays)
    out = ds.map_batches(tr.TGEMPredictor, fn_constructor_kwargs={"classifier": "my_classifier/"},
                         batch_size=64, batch_format="pyarrow", num_gpus=1, **tr.actor_pool(ray, 4))

`TGEMPredictor` builds the classifier once per actor (from a `PredictorSpec`, a saved directory, or a
spec's fields as a dict) and returns the columns of the local runner's parts, plus `error` (null
for an image that was classified, the reason otherwise).

`run_ray_job` is `tgems classify|embed --engine ray`: the spec is built (and calibrated) once, here; each
actor gets its plain options, or the calibrated classifier saved, and builds it once;
the actors read, decode, preprocess and encode the input shard by shard (a folder's blocks in pieces of
whole batches), and this process writes each part when its shard is complete, with the local runner's
writer. So a Ray job resumes as a local one does (finished parts are skipped; a killed job, rerun, ends
with exactly the rows of an uninterrupted run), and its rows are those of the local engine. Actors and
threads per actor are chosen from the cluster's CPUs (and said); a job of fewer than two batches per
actor runs locally. Installed with ``pip install "tgems[ray]"``; this module is the only one that imports
ray, and nothing imports it but `--engine ray`.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from tgems.jobs.sources import Item, Record, _one_line
from tgems.errors import TGEMError
from tgems.jobs.lister import ID_COLUMNS, find_image_column
from tgems.jobs.readers import prepare_records
from tgems.jobs.runner import check_job_predictor, job_record, open_job, run_job
from tgems.jobs.stages import predict_items, reader_geometry
from tgems.jobs.writer import PartWriter, disk_full_is_user_error, finish_job, result_schema, shard_done
from tgems.spec import JobSpec, predictor_settings

SMALL_JOB_BATCHES = 2  # per actor: fewer images than this many batches per actor run locally


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
    """A `PredictorSpec`, a saved-classifier directory, a spec's fields as a dict, or a ready predictor (anything
    with `predict`) -> the predictor."""
    from tgems.spec import Predictor, PredictorSpec

    if isinstance(classifier, PredictorSpec):
        return classifier.check().build()
    if isinstance(classifier, dict):
        return PredictorSpec(**classifier).check().build()
    if isinstance(classifier, (str, os.PathLike)):
        return PredictorSpec(classifier=str(classifier)).check().build()
    if isinstance(classifier, Predictor):
        return classifier
    raise TGEMError(f"cannot build a classifier from {type(classifier).__name__}")


def actor_payload(spec, clf) -> dict:
    """What each actor receives to make its predictor: a spec's plain options; for a calibrated spec the
    classifier calibrated here, saved (its files as bytes, so that every node can load it): a job calibrates
    once, not once per actor; a ready predictor object as it is."""
    from tgems.spec import PredictorSpec

    if not isinstance(spec, PredictorSpec):
        return {"predictor": clf}
    if not spec.calibrated:
        return {"options": spec.options()}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tgems-ray-") as tmp:
        saved = Path(clf.save(Path(tmp) / "classifier"))
        files = {p.name: p.read_bytes() for p in sorted(saved.iterdir()) if p.is_file()}
    return {"saved": files, "options": {"model": spec.model, "device": spec.device, "dtype": spec.dtype}}


def predictor_from_payload(payload: dict):
    """The predictor an actor runs, from `actor_payload`."""
    from tgems.spec import PredictorSpec

    if "predictor" in payload:
        return payload["predictor"]
    if "saved" not in payload:
        spec = PredictorSpec(**payload["options"])
        if spec.calibrated:
            raise TGEMError("internal: an actor was asked to calibrate (the driver calibrates once)")
        return spec.check().build()
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="tgems-ray-"))
    try:
        for name, data in payload["saved"].items():
            (tmp / name).write_bytes(data)
        return PredictorSpec(classifier=str(tmp), **payload["options"]).check().build()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        geometry = reader_geometry(self.classifier)
        records, arrays = [], {}
        for i in range(n):
            img = images[i]
            if errors[i] is not None:
                records.append(Record(ids[i], source_label=labels[i], error=errors[i]))
            elif isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim in (2, 3):
                arrays[i] = img
            elif isinstance(img, list):  # a nested list from pyarrow's to_pylist of a tensor column
                arrays[i] = np.asarray(img, dtype=np.uint8)
            else:
                records.append(Record(ids[i], data=img, source_label=labels[i]))
        decoded = iter(prepare_records(records, geometry)[0])
        out = []
        for i in range(n):
            if i not in arrays:
                out.append(next(decoded))
                continue
            try:
                from PIL import Image

                img = geometry.apply(arrays[i]) if geometry is not None else Image.fromarray(arrays[i]).convert("RGB")
                out.append(Item(ids[i], img, labels[i]))
            except (TGEMError, ValueError, TypeError) as exc:
                out.append(Item(ids[i], None, labels[i], f"cannot encode image: {_one_line(exc)}"))
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


# ------------------------------------------------------------------------------------- the Ray job


def connect(ray, address: str | None, quiet: bool) -> bool:
    """Start a local Ray or join the cluster at `address`; one line when there is none. True if started here."""
    if ray.is_initialized():
        return False
    import logging

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=not quiet, configure_logging=quiet,
                 logging_level=logging.ERROR if quiet else logging.INFO)
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        where = f"at --address {address}" if address else "(local)"
        raise TGEMError(f"cannot reach a Ray cluster {where}: {_one_line(exc)}") from None
    return True


def plan_actors(cpus: float, gpus: float, concurrency: int | None, num_gpus: float) -> tuple[int, int, str]:
    """(actors, torch threads per actor, why) from the cluster's CPUs and GPUs.

    On CPUs, one thread per actor up to 8 CPUs (decoding runs in the actor too, so more actors overlap it
    with the encoder), then two; with GPUs, one actor per `num_gpus` share of the GPUs. Actors never ask for
    more CPUs than the cluster has (they would wait forever)."""
    cpus = max(1, int(cpus))
    if isinstance(concurrency, tuple):  # (min, max) as actor_pool takes it: the job uses the max
        concurrency = concurrency[-1]
    if num_gpus:
        actors = concurrency or max(1, int(gpus // num_gpus))
        threads = max(1, min(8, cpus // actors))
        return actors, threads, f"{gpus:g} GPUs / {num_gpus:g} per actor, {cpus} CPUs"
    if concurrency:
        actors = min(int(concurrency), cpus)
        why = f"--concurrency {concurrency}, {cpus} CPUs" + (" (capped at the CPUs)" if actors < concurrency else "")
        return actors, max(1, cpus // actors), why
    threads = 1 if cpus < 8 else 2
    return max(1, cpus // threads), threads, f"{cpus} CPUs"


class ShardWorker:
    """A Ray actor: makes the predictor once (`predictor_from_payload`), then reads, decodes, preprocesses and encodes
    pieces of shards with the local runner's own functions."""

    def __init__(self, payload: dict, task: str, threads: int):
        import torch

        torch.set_num_threads(int(threads))
        self.predictor = predictor_from_payload(payload)
        self.task = task
        self.geometry = reader_geometry(self.predictor)

    def run(self, source, unit: dict, batch_size: int, scheduler: str = "drop"):
        """One piece of one shard -> (table or None, [(id, reason)], seconds per stage); the encoding as the
        local runner's (`encoded`: micro-batches, or depth queues refilled from the piece)."""
        import dataclasses

        import pyarrow as pa

        from tgems.jobs.sources import Chunk
        from tgems.jobs.runner import encoded

        shard = source.shards[unit["shard"]]
        if source.kind == "folder":
            shard = dataclasses.replace(shard, files=shard.files[unit["start"]:unit["stop"]])
        stats = {"read_s": 0.0, "decode_s": 0.0, "preprocess_s": 0.0}

        def chunks():
            recs, records = [], iter(source.records(shard))
            while True:
                t = time.perf_counter()
                rec = next(records, None)
                stats["read_s"] += time.perf_counter() - t
                if rec is not None:
                    recs.append(rec)
                if recs and (rec is None or len(recs) == batch_size):
                    items, spent = prepare_records(recs, self.geometry)
                    for k, v in spent.items():
                        stats[k] += v
                    yield Chunk(shard, items, rec is None)
                    recs = []
                if rec is None:
                    return

        tables, errors = [], []
        for chunk, table, bad in encoded(self.predictor, chunks(), self.task, batch_size, scheduler, stats):
            errors += [(it.id, it.error) for it in chunk.items if it.error is not None] + bad
            if table is not None:
                tables.append(table)
        return (pa.concat_tables(tables) if tables else None), errors, stats


def _units(source, shards, batch_size: int, actors: int, scheduler: str = "drop") -> list:
    """Pieces of work: a tar or parquet shard whole; a folder block in pieces of whole batches, so the
    batches are the local runner's and every actor has work even when there are few shards. With depth
    queues a folder block stays whole too: the scheduler is drained at the end of a piece, and the local
    runner drains it at the end of a shard."""
    units = []
    for s in shards:
        if source.kind == "folder":
            n = len(s.files)
            per = batch_size * max(1, -(-n // (batch_size * actors))) if scheduler == "drop" else n
            units += [{"shard": s.index, "start": a, "stop": min(a + per, n)} for a in range(0, n, per)]
        else:
            units.append({"shard": s.index, "start": 0, "stop": -1})
    return units


def _say(progress: bool, text: str):
    if progress:
        print(f"tgems: {text}", file=sys.stderr, flush=True)


def run_ray_job(classifier, job: JobSpec, *, settings: dict | None = None, progress: bool = True,
                log=None, source=None) -> dict:
    """A whole classify/embed job on Ray actors, writing the local runner's OUT_DIR layout, resumable by shard.

    `classifier` is a `PredictorSpec` (built once here; each actor gets its plain options, or, when it is
    calibrated, the classifier calibrated here, saved), a saved classifier directory, a spec's fields as a
    dict, or a ready predictor (sent to the actors as it is). With `progress` False Ray's own logs are
    silenced too. `job.workers` are the decoding processes of a small job run locally.
    """
    from tgems.jobs.sources import open_source
    from tgems.spec import PredictorSpec

    ray = require_ray()
    job = job.check()
    task, batch_size, scheduler = job.task, job.batch_size, job.scheduler
    if isinstance(classifier, dict):
        classifier = PredictorSpec(**classifier)
    elif isinstance(classifier, (str, os.PathLike)):
        classifier = PredictorSpec(classifier=str(classifier))
    if isinstance(classifier, PredictorSpec):
        classifier = classifier.check()
    source = source or open_source(job.data, **job.reader_options())
    clf = classifier.build(log=log) if isinstance(classifier, PredictorSpec) else classifier
    check_job_predictor(job, clf)
    if settings is None:
        settings = predictor_settings(clf)
    n = source.num_items

    def run_locally(actors):
        _say(progress, f"small job ({n} images, fewer than {SMALL_JOB_BATCHES} batches of {batch_size} for each "
                       f"of {actors} Ray actors): running locally")
        return run_job(clf, job, settings=settings, progress=progress, source=source)

    def small(actors):
        return n is not None and n < SMALL_JOB_BATCHES * batch_size * actors

    if job.address is None and not job.num_gpus and not ray.is_initialized():  # a local Ray would have these CPUs
        actors = plan_actors(os.cpu_count() or 1, 0, job.concurrency, 0)[0]
        if small(actors):
            return run_locally(actors)  # without starting Ray at all
    started = time.perf_counter()
    connect(ray, job.address, quiet=not progress)  # before OUT_DIR is touched: no cluster, no _job.json
    ray_ready = time.perf_counter()
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if job.num_gpus and gpus < job.num_gpus:
        raise TGEMError(f"--num-gpus {job.num_gpus:g} asks for GPUs, but the Ray cluster has {gpus:g}; "
                        f"leave out --num-gpus to run on its {cpus:g} CPUs")
    actors, threads, why = plan_actors(cpus, gpus, job.concurrency, job.num_gpus)
    if small(actors):
        return run_locally(actors)
    _say(progress, f"Ray: {actors} actors x {threads} threads ({why})")
    with open_job(job.out, job_record(task, source, settings, batch_size, "ray", scheduler)) as (out, record):
        todo = [s for s in source.shards if not shard_done(out, s.index)]
        counts = {"written": 0, "skipped": len(source.shards) - len(todo), "images": 0}
        stats = {"ray_startup_s": ray_ready - started}
        with disk_full_is_user_error(out, counts, len(source.shards)):
            if todo:
                _run_actors(ray, actor_payload(classifier, clf), source, todo, out, task, batch_size, actors,
                            threads, job.num_gpus, counts, stats, progress, scheduler)
            return finish_job(out, record, task, started, counts, stats, {"actors": actors, "threads": threads})


def _run_actors(ray, payload, source, todo, out, task, batch_size, actors, threads, num_gpus, counts, stats,
                progress, scheduler="drop"):
    """Pieces go to the actors (two in flight each); a shard's part is written when all its pieces are back,
    in order, so its rows do not depend on which actor finished first."""
    from tgems.jobs.runner import _Progress

    remote = ray.remote(ShardWorker).options(num_cpus=threads, num_gpus=num_gpus or 0)
    payload_ref = ray.put(payload)
    pool = [remote.remote(payload_ref, task, threads) for _ in range(actors)]
    t = time.perf_counter()
    ray.get([a.__ray_ready__.remote() for a in pool])  # each has built its predictor
    stats["actor_startup_s"] = time.perf_counter() - t
    src_ref = ray.put(source)
    units = _units(source, todo, batch_size, actors, scheduler)
    by_shard: dict = {}
    for k, u in enumerate(units):
        by_shard.setdefault(u["shard"], []).append(k)
    results: dict = {}
    shards = {s.index: s for s in todo}
    bar = _Progress(source.num_items, sum(s.size or 0 for s in source.shards if s.index not in shards), progress)
    pending, queue, t_start = {}, list(enumerate(units)), time.perf_counter()
    wait = 0.0
    try:
        while queue or pending:
            while queue and len(pending) < 2 * actors:
                k, unit = queue.pop(0)
                pending[pool[k % actors].run.remote(src_ref, unit, batch_size, scheduler)] = k
            t = time.perf_counter()
            [ref], _ = ray.wait(list(pending), num_returns=1)
            wait += time.perf_counter() - t
            k = pending.pop(ref)
            table, errors, spent = ray.get(ref)
            for key, v in spent.items():
                stats[key] = stats.get(key, 0.0) + v
            unit = units[k]
            results[k] = (table, errors)
            done = len(errors) + (table.num_rows if table is not None else 0)
            counts["images"] += done
            bar.update(done, None if table is None else table.column("exit_layer").to_numpy(), len(errors))
            index = unit["shard"]
            ks = by_shard[index]
            if all(j in results for j in ks):
                t = time.perf_counter()
                part = PartWriter(out, shards[index], task)
                try:
                    for j in ks:
                        part.add(*results.pop(j))
                    part.close()
                except BaseException:
                    part.abort()
                    raise
                stats["write_s"] = stats.get("write_s", 0.0) + time.perf_counter() - t
                counts["written"] += 1
    finally:
        bar.close()
        for a in pool:
            ray.kill(a)
    stats["wait_s"] = wait
    stats["ray_run_s"] = time.perf_counter() - t_start
