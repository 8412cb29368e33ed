"""Runner: the stages of a batch job put together (`tgems.jobs.stages`), with the seconds each one took.

    lister / source -> readers (decode + resize / crop, in workers) -> normalise + encode (this process)
    -> writer (one part per shard, errors, _SUCCESS)

Stage seconds (in the summary, `_SUCCESS` and `--json` under "stages"): read_s (listing and reading
inputs), decode_s and preprocess_s (in the workers, summed over them), normalize_s and encode_s (the
predictor), write_s (parquet), wait_s (the encoder waiting for decoded images: the readers are the
bottleneck) and reader_wait_s (readers waiting for room in the queue: the encoder is).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from tgems.errors import TGEMError
from tgems.spec import JobSpec, predictor_settings
from tgems.jobs.stages import predict_items, reader_geometry
from tgems.jobs.writer import TOP_K, PartWriter, disk_full_is_user_error, finish_job, locked, shard_done

JOB_FORMAT = 1
ENCODER_STAGES = ("normalize_s", "encode_s", "write_s")


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


# ------------------------------------------------------------------------------------- the job


def job_record(task, source, settings, batch_size, engine, scheduler="drop"):
    """What a job is, fingerprinted for resume. The scheduler counts (its batches are not the drop path's, so
    a float can move in its last bits): a `depth` job is another job; `drop` is left out, so jobs started
    before the option keep their fingerprint."""
    record = {"format": JOB_FORMAT, "task": task, "engine": engine,
              "settings": {"data": source.spec, "input": source.manifest(), "predictor": settings,
                           "batch_size": batch_size, "top_k": TOP_K, "task": task}}
    if scheduler != "drop":
        record["settings"]["scheduler"] = scheduler
    return record


def check_job_predictor(job, predictor) -> None:
    """What the job's scheduler needs of the predictor (the depth queues: an early-exit classifier)."""
    if job.scheduler == "depth":
        from tgems.jobs.depth import check_depth_predictor

        check_depth_predictor(predictor)


@contextmanager
def open_job(out_dir, record: dict):
    """Lock OUT_DIR and check it holds this job or nothing (a rerun resumes, another job is refused); yields
    (out path, the job record with its fingerprint)."""
    from tgems.jobs.writer import prepare_out_dir

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TGEMError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        yield out, prepare_out_dir(out, record, record["engine"])


def run_job(predictor, job: JobSpec, *, settings: dict | None = None, progress: bool = True,
            source=None, prefetch: int | None = None) -> dict:
    """Stream `job.data` through `predictor` into `job.out`; resume what is there.

    Returns the summary also written to ``job.out/_SUCCESS``. `settings` describe the predictor for the
    resume check (default: `predictor_settings` of the object: its labels, threshold and weights). A
    predictor with a `backbone` gets its images resized and cropped by the decoding workers (its backbone's
    own geometry) and normalised here. `source`: `job.data` already opened (a StreamSource).
    """
    from tgems.jobs.sources import open_source
    from tgems.jobs.readers import stream_chunks

    job = job.check()
    check_job_predictor(job, predictor)
    task, batch_size, workers, scheduler = job.task, job.batch_size, job.workers, job.scheduler
    source = source or open_source(job.data, **job.reader_options())
    started = time.perf_counter()
    if settings is None:
        settings = predictor_settings(predictor)
    with open_job(job.out, job_record(task, source, settings, batch_size, "local", scheduler)) as (out, record):
        todo = [s for s in source.shards if not shard_done(out, s.index)]
        todo_index = {s.index for s in todo}
        done_items = sum(s.size or 0 for s in source.shards if s.index not in todo_index)
        bar = _Progress(source.num_items, done_items, progress)
        counts = {"written": 0, "skipped": len(source.shards) - len(todo), "images": 0}
        with disk_full_is_user_error(out, counts, len(source.shards)):
            stats = dict.fromkeys(ENCODER_STAGES, 0.0)
            part = None
            chunks = stream_chunks(source, todo, chunk_size=batch_size, workers=workers, prefetch=prefetch,
                                   geometry=reader_geometry(predictor), stats=stats)
            try:
                for chunk, table, bad in encoded(predictor, chunks, task, batch_size, scheduler, stats):
                    if part is None:
                        part = PartWriter(out, chunk.shard, task)
                    good = [it for it in chunk.items if it.error is None]
                    t = time.perf_counter()
                    part.add(table, [(it.id, it.error) for it in chunk.items if it.error is not None] + bad)
                    if chunk.last:
                        part.close()
                        part = None
                        counts["written"] += 1
                    stats["write_s"] += time.perf_counter() - t
                    counts["images"] += len(chunk.items)
                    bar.update(len(chunk.items), None if table is None else table.column("exit_layer").to_numpy(),
                               len(chunk.items) - len(good) + len(bad))
            finally:
                chunks.close()
                bar.close()
                if part is not None:
                    part.abort()
            return finish_job(out, record, task, started, counts, stats)


def encoded(predictor, chunks, task: str, batch_size: int, scheduler: str, stats: dict):
    """Chunks -> (chunk, table or None, encode errors), in order: one micro-batch at a time (`drop`) or
    through depth queues refilled from the chunks (`depth`, tgems.jobs.depth)."""
    if scheduler == "depth":
        from tgems.jobs.depth import depth_results

        yield from depth_results(predictor, chunks, task, batch_size, stats)
        return
    for chunk in chunks:
        yield (chunk, *predict_items(predictor, [it for it in chunk.items if it.error is None], task, stats))


__all__ = ["run_job", "encoded", "job_record", "open_job", "check_job_predictor", "JOB_FORMAT"]
