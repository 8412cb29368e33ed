"""Batch jobs at volume: stream images through an early-exit classifier into sharded parquet, with resume.

`run_job(predictor, "folder:photos", "out/")` writes ``out/part-NNNNN.parquet`` (one per input
shard), ``out/_errors.parquet`` (unreadable inputs and why) and ``out/_SUCCESS`` (settings and
totals); the folder reads back as its rows (`pd.read_parquet("out/")`: names starting with `_` or `.`
are not data to pyarrow). Every part is written under a temporary name and renamed when complete, and
``out/_job.json`` holds the job's settings fingerprint from the start: a rerun with the same
settings skips finished parts, so a job killed at any moment (SIGKILL included) ends, once rerun,
with exactly the rows of an uninterrupted run; a rerun with other settings is refused. Batches
never span shards, so a part's rows do not depend on where an earlier run stopped.

A *predictor* is anything with ``predict(list_of_pil_images) -> Prediction`` and ``labels``
(an `EarlyExitClassifier`); a `tgems.spec.PredictorSpec` builds one, the same way here, in the CLI and
in every Ray actor, and the job's fingerprint is taken from the built predictor.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tgems.errors import TGEMError
from tgems.io import atomic_path, commit, is_tmp, tmp_path, write_json
from tgems.spec import TASKS, JobSpec, PredictorSpec, predictor_settings, specs_from_args, specs_from_options

ERRORS = "_errors.parquet"  # beside the parts, but not read as data (a leading underscore)
TOP_K = 5
JOB_FORMAT = 1
ROW_GROUP = 8192


# ------------------------------------------------------------------------------------- schemas


def result_schema(task: str):
    """Columns of a part file; shared by the local runner and the Ray predictor."""
    import pyarrow as pa

    head = [("id", pa.string()), ("source_label", pa.string())]
    tail = [("exit_layer", pa.int16()), ("flops_ratio", pa.float32())]
    if task == "classify":
        mid = [("label", pa.string()), ("label_index", pa.int32()), ("probability", pa.float32()),
               ("top5_labels", pa.list_(pa.string())), ("top5_probs", pa.list_(pa.float32()))]
    elif task == "embed":
        mid = [("embedding", pa.list_(pa.float32()))]
    else:
        raise TGEMError(f"unknown task '{task}' (use one of {', '.join(TASKS)})")
    return pa.schema(head + mid + tail)


def error_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("part", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def _embeddings(predictor, images, pred):
    """The readout z at each image's exit layer: Prediction.embeddings when the classifier gives it,
    else the same engine run with the classifier's own policy (older classifiers)."""
    import numpy as np

    emb = getattr(pred, "embeddings", None)
    if emb is not None:
        return np.asarray(emb, dtype=np.float32)
    from tgems.engine import run_early_exit

    bb = predictor.backbone
    res = run_early_exit(bb, bb.preprocess(images), predictor.policy())
    if not np.array_equal(res.exit_layers.numpy(), np.asarray(pred.exit_layers)):
        raise TGEMError("internal: embedding run took other exits than predict")
    return res.features.float().cpu().numpy()


def predict_table(predictor, images, ids, source_labels, task: str):
    """Run the predictor on a list of PIL images and return the part columns as a pyarrow Table."""
    import numpy as np

    import pyarrow as pa

    pred = predictor.predict(images)
    exit_layers = np.asarray(pred.exit_layers, dtype=np.int16)
    flops_ratio = np.asarray(pred.flops_ratio, dtype=np.float32)
    cols = {"id": pa.array([str(i) for i in ids], pa.string()),
            "source_label": pa.array(list(source_labels), pa.string())}
    if task == "classify":
        probs = np.asarray(pred.probs, dtype=np.float32)
        idx = np.asarray(pred.indices, dtype=np.int64)
        k = min(TOP_K, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        labels = list(predictor.labels)
        cols.update(label=pa.array(list(pred.labels), pa.string()), label_index=pa.array(idx.astype(np.int32)),
                    probability=pa.array(probs[np.arange(len(idx)), idx]),
                    top5_labels=pa.array([[labels[j] for j in row] for row in order], pa.list_(pa.string())),
                    top5_probs=pa.array(list(np.take_along_axis(probs, order, 1)), pa.list_(pa.float32())))
    else:
        emb = _embeddings(predictor, images, pred)
        cols["embedding"] = pa.array(list(emb), pa.list_(pa.float32()))
    cols.update(exit_layer=pa.array(exit_layers), flops_ratio=pa.array(flops_ratio))
    return pa.table(cols, schema=result_schema(task))


def predict_items(predictor, items, task: str):
    """Decoded items (good ones) -> (table, [(id, reason)]). A batch the predictor refuses is retried image
    by image, so one odd image (say, smaller than the crop) is an error record, not a failed job."""
    if not items:
        return None, []
    images = [it.image for it in items]
    try:
        return predict_table(predictor, images, [it.id for it in items], [it.source_label for it in items], task), []
    except TGEMError as e:
        if len(items) == 1:
            return None, [(items[0].id, f"cannot encode image: {e}")]
    import pyarrow as pa

    tables, errors = [], []
    for it in items:
        try:
            tables.append(predict_table(predictor, [it.image], [it.id], [it.source_label], task))
        except TGEMError as e:
            errors.append((it.id, f"cannot encode image: {e}"))
    return (pa.concat_tables(tables) if tables else None), errors


# ------------------------------------------------------------------------------------- predictors


ClassifierSpec = PredictorSpec  # the earlier name, kept for Ray's actors and older scripts


def describe_predictor(predictor) -> dict:
    """The settings of a predictor object, for jobs started from Python without a spec."""
    return predictor_settings(predictor)


# ------------------------------------------------------------------------------------- files


def write_table_atomic(path, table):
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@contextmanager
def _locked(out: Path):
    """One job per output directory at a time (the lock dies with the process, even on SIGKILL)."""
    f = open(out / ".tgems.lock", "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TGEMError(f"another tgems job is writing to {out}") from None
        yield
    finally:
        f.close()


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _fingerprint(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(a: dict, b: dict, prefix="") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def prepare_out_dir(out: Path, job: dict, engine: str) -> dict:
    """Create or re-open OUT_DIR: the same job resumes, another job or a foreign directory is refused."""
    if out.exists() and not out.is_dir():
        raise TGEMError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    job = {**job, "fingerprint": _fingerprint(job)}
    meta = out / "_job.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError):
            raise TGEMError(f"{meta} is unreadable; use a new --out directory") from None
        if old.get("fingerprint") != job["fingerprint"]:
            what = ", ".join(_diff(old.get("settings", {}), job["settings"])[:4]) or "settings"
            raise TGEMError(f"{out} holds another job (different {what}); use a new --out directory or delete it")
    elif any(p for p in out.iterdir() if p.name != ".tgems.lock" and not is_tmp(p)):
        raise TGEMError(f"{out} is not empty and holds no tgems job (_job.json); use a new --out directory")
    write_json(meta, job)
    for d in (out, out / "_errors"):
        if d.is_dir():
            for p in d.iterdir():
                if is_tmp(p):  # left by a killed run
                    p.unlink()
    return job


# ------------------------------------------------------------------------------------- progress


class _Progress:
    """tqdm bar with images/s and the running exit-layer mix."""

    def __init__(self, total, done, enabled, num_layers=None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, unit="img", disable=not enabled, dynamic_ncols=True,
                        smoothing=0.1, desc="tgems")
        self.counts: dict[int, int] = {}
        self.errors = 0

    def update(self, n, exit_layers=None, errors=0):
        import numpy as np

        if exit_layers is not None:
            for l, c in zip(*np.unique(exit_layers, return_counts=True)):
                self.counts[int(l)] = self.counts.get(int(l), 0) + int(c)
        self.errors += errors
        total = sum(self.counts.values())
        if total:
            top = sorted(self.counts.items(), key=lambda kv: -kv[1])[:4]
            mix = " ".join(f"L{l}:{100 * c / total:.0f}%" for l, c in sorted(top))
            mean = sum(l * c for l, c in self.counts.items()) / total
            self.bar.set_postfix_str(f"exits {mix} mean {mean:.2f} err {self.errors}", refresh=False)
        self.bar.update(n)

    def close(self):
        self.bar.close()


# ------------------------------------------------------------------------------------- the local runner


def _job_record(task, source, settings, batch_size, engine):
    return {"format": JOB_FORMAT, "task": task, "engine": engine,
            "settings": {"data": source.spec, "input": source.manifest(), "predictor": settings,
                         "batch_size": batch_size, "top_k": TOP_K, "task": task}}


def _write_shard_errors(out: Path, shard, errors: list):
    import pyarrow as pa

    d = out / "_errors"
    d.mkdir(exist_ok=True)
    path = d / part_name(shard.index)
    if not errors:
        if path.exists():
            path.unlink()
        return
    name = part_name(shard.index)
    table = pa.table({"id": [e[0] for e in errors], "part": [name] * len(errors),
                      "source": [shard.name] * len(errors), "reason": [e[1] for e in errors]}, schema=error_schema())
    write_table_atomic(path, table)


def finish_job(out: Path, job: dict, task: str, started: float, counts: dict) -> dict:
    """Totals read back from the parts (so a resumed job reports the whole job), _errors.parquet, _SUCCESS."""
    import numpy as np

    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(out.glob("part-*.parquet"))
    n, layer_counts, flops_sum = 0, {}, 0.0
    for p in parts:
        t = pq.read_table(p, columns=["exit_layer", "flops_ratio"])
        n += t.num_rows
        if t.num_rows:
            layers = t.column("exit_layer").to_numpy()
            for l, c in zip(*np.unique(layers, return_counts=True)):
                layer_counts[int(l)] = layer_counts.get(int(l), 0) + int(c)
            flops_sum += float(t.column("flops_ratio").to_numpy().astype(np.float64).sum())
    err_files = sorted((out / "_errors").glob("part-*.parquet")) if (out / "_errors").is_dir() else []
    err_tables = [pq.read_table(p) for p in err_files]
    errors = pa.concat_tables(err_tables) if err_tables else error_schema().empty_table()
    write_table_atomic(out / ERRORS, errors)
    if (out / "errors.parquet").is_file():  # where tgems < 0.2 kept them: it hid the rows from pd.read_parquet
        (out / "errors.parquet").unlink()
    seconds = time.perf_counter() - started
    summary = {
        "task": task, "out": str(out), "engine": job["engine"], "fingerprint": job["fingerprint"],
        "settings": job["settings"], "parts": len(parts), "parts_written": counts.get("written", 0),
        "parts_skipped": counts.get("skipped", 0), "images": n, "errors": errors.num_rows,
        "mean_exit_layer": (sum(l * c for l, c in layer_counts.items()) / n) if n else None,
        "flops_ratio": flops_sum / n if n else None,
        "exit_layers": {str(l): c for l, c in sorted(layer_counts.items())},
        "seconds": round(seconds, 3), "images_this_run": counts.get("images", 0),
        "images_per_s": round(counts.get("images", 0) / seconds, 2) if seconds > 0 else None,
    }
    write_json(out / "_SUCCESS", summary)
    return summary


def run_job(predictor, data, out_dir, *, task: str = "classify", batch_size: int = 64, workers: int = 2,
            prefetch: int | None = None, settings: dict | None = None, progress: bool = True,
            source_options: dict | None = None) -> dict:
    """Stream `data` (a spec or a StreamSource) through `predictor` into `out_dir`; resume what is there.

    Returns the summary also written to ``out_dir/_SUCCESS``. `settings` describe the predictor for the
    resume check (default: a fingerprint of the object's labels, threshold and weights).
    """
    from tgems.data.streaming import StreamSource, open_source, stream_chunks

    if task not in TASKS:
        raise TGEMError(f"unknown task '{task}' (use one of {', '.join(TASKS)})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TGEMError(f"batch size must be a positive integer, got {batch_size!r}")
    source = data if isinstance(data, StreamSource) else open_source(data, **(source_options or {}))
    out = Path(out_dir).expanduser()
    started = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise TGEMError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        job = prepare_out_dir(out, _job_record(task, source, settings or describe_predictor(predictor),
                                               batch_size, "local"), "local")
        todo = [s for s in source.shards if not (out / part_name(s.index)).is_file()]
        skipped = len(source.shards) - len(todo)
        todo_index = {s.index for s in todo}
        done_items = sum(s.size or 0 for s in source.shards if s.index not in todo_index)
        bar = _Progress(source.num_items, done_items, progress)
        counts = {"written": 0, "skipped": skipped, "images": 0}
        writer = tmp = None
        pending, pending_rows, errors = [], 0, []
        schema = result_schema(task)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq

            for chunk in stream_chunks(source, todo, chunk_size=batch_size, workers=workers, prefetch=prefetch):
                good = [it for it in chunk.items if it.error is None]
                errors += [(it.id, it.error) for it in chunk.items if it.error is not None]
                table, bad = predict_items(predictor, good, task)
                errors += bad
                if table is not None:
                    pending.append(table)
                    pending_rows += table.num_rows
                if pending_rows >= ROW_GROUP or (chunk.last and pending):
                    if writer is None:
                        tmp = tmp_path(out / part_name(chunk.shard.index))
                        writer = pq.ParquetWriter(tmp, schema)
                    writer.write_table(pa.concat_tables(pending))
                    pending, pending_rows = [], 0
                counts["images"] += len(chunk.items)
                bar.update(len(chunk.items), None if table is None else table.column("exit_layer").to_numpy(),
                           len(chunk.items) - len(good) + len(bad))
                if chunk.last:
                    path = out / part_name(chunk.shard.index)
                    if writer is None:
                        tmp = tmp_path(path)
                        writer = pq.ParquetWriter(tmp, schema)
                    writer.close()
                    writer = None
                    _write_shard_errors(out, chunk.shard, errors)  # before the part: the part commits the shard
                    commit(tmp, path)
                    errors = []
                    counts["written"] += 1
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            if tmp is not None and tmp.exists():
                tmp.unlink()
        return finish_job(out, job, task, started, counts)


# ------------------------------------------------------------------------------------- the CLI job


def run_command(predictor: PredictorSpec | None = None, job: JobSpec | None = None, *, json_path: str | None = None,
                quiet: bool = False, log=None, **options) -> tuple[dict, int]:
    """The whole `tgems classify|embed --data SPEC --out DIR` job: returns (summary, exit code).

    Give the specs, or their options as keywords (`data=`, `out=`, `labels=`, `budget=`, ...: the fields of
    `PredictorSpec` and `JobSpec`, plus `labels_file=`). Exit code 0 when every input was read, 1 when some
    were listed in _errors.parquet (the rest are done). Bad arguments or inputs raise TGEMError before any work.
    """
    from tgems.data.streaming import open_source

    if options:
        p, j = specs_from_options(**options)
        predictor, job = predictor or p, job or j
    if predictor is None or job is None:
        raise TGEMError("a streamed job needs both --data SPEC and --out DIR")
    predictor.check()
    job.check()
    source = open_source(job.data, **job.reader_options())  # fails before work
    if job.engine == "ray":
        from tgems.integrations.ray import run_ray_job

        summary = run_ray_job(predictor, source, job.out, task=job.task, batch_size=predictor.batch_size,
                              concurrency=job.concurrency, num_gpus=job.num_gpus, address=job.address,
                              progress=not quiet)
    else:
        clf = predictor.build(log=log)
        summary = run_job(clf, source, job.out, task=job.task, batch_size=predictor.batch_size,
                          workers=job.workers, settings=predictor_settings(clf), progress=not quiet)
    if json_path:
        write_json(json_path, summary)
    return summary, (1 if summary["errors"] else 0)


def summary_line(summary: dict) -> str:
    fr = summary["flops_ratio"]
    return (f"{summary['images']} images -> {summary['parts']} parts in {summary['out']} "
            f"(mean exit layer {summary['mean_exit_layer'] or 0:.2f}, FLOPs ratio {fr or 0:.3f}, "
            f"{summary['parts_skipped']} parts resumed, {summary['images_per_s'] or 0:.0f} img/s)")


def cmd_batch(args, log=None) -> int:
    """argparse namespace -> job; prints one summary line (and one error line when inputs failed)."""
    predictor, job = specs_from_args(args)
    summary, code = run_command(predictor, job, json_path=args.json, quiet=args.quiet, log=log)
    if not args.quiet:
        print(f"tgems: {summary_line(summary)}", file=sys.stderr)
    if code:
        print(f"tgems: error: {summary['errors']} inputs could not be read (listed with their reason in "
              f"{Path(summary['out']) / ERRORS})", file=sys.stderr)
    return code
