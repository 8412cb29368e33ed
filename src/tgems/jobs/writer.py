"""Writer: a job's output folder. Parts (one per input shard), the unreadable inputs and `_SUCCESS`.

Every file is written under a temporary name and renamed when complete; a shard's errors are written
before its part, so the part's rename is what commits the shard (a rerun skips it).
"""
from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path

from tgems.errors import TGEMError
from tgems.io import atomic_path, commit, is_disk_full, is_tmp, tmp_path, write_json
from tgems.spec import TASKS, fingerprint

TOP_K = 5
ROW_GROUP = 8192
# Where unreadable inputs are listed: per shard while the job runs, then gathered into one file.
ERRORS_DIR = "_errors"
ERRORS_FILE = "_errors.parquet"  # beside the parts, not read as data (a leading underscore)


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def errors_path(out: Path) -> Path:
    return Path(out) / ERRORS_FILE


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


def write_table_atomic(path, table):
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@contextmanager
def locked(out: Path):
    """One job per output directory at a time (the lock dies with the process, even on SIGKILL)."""
    f = open(Path(out) / ".tgems.lock", "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TGEMError(f"another tgems job is writing to {out}") from None
        yield
    finally:
        f.close()


@contextmanager
def disk_full_is_user_error(out: Path, counts: dict, total: int):
    """A full disk ends the job in one line that says where, how far it got and that a rerun resumes (the
    finished parts are whole: each was renamed into place only when complete)."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        done = counts.get("written", 0) + counts.get("skipped", 0)
        raise TGEMError(f"no space left on the device of {out}: {done} of {total} parts are done (kept whole); "
                        f"free space and rerun the same command to resume") from None


def shard_done(out: Path, index: int) -> bool:
    return (Path(out) / part_name(index)).is_file()


def write_shard_errors(out: Path, shard, errors: list):
    """The unreadable inputs of one shard, [(id, reason)]; an earlier run's list for the shard is replaced."""
    import pyarrow as pa

    d = Path(out) / ERRORS_DIR
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


class PartWriter:
    """The part of one shard, written in row groups under a temporary name; `close` commits it, errors first."""

    def __init__(self, out: Path, shard, task: str):
        self.out, self.shard, self.schema = Path(out), shard, result_schema(task)
        self.path = self.out / part_name(shard.index)
        self.tmp = tmp_path(self.path)
        self.writer, self.pending, self.rows, self.errors = None, [], 0, []

    def add(self, table, errors=()):
        self.errors += list(errors)
        if table is not None and table.num_rows:
            self.pending.append(table)
            self.rows += table.num_rows
        if self.rows >= ROW_GROUP:
            self._flush()

    def _flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending))
        self.pending, self.rows = [], 0

    def close(self):
        self._flush()
        self.writer.close()
        self.writer = None
        write_shard_errors(self.out, self.shard, self.errors)  # before the part: the part commits the shard
        commit(self.tmp, self.path)

    def abort(self):
        if self.writer is not None:
            self.writer.close()
        if self.tmp.exists():
            self.tmp.unlink()


def finish_job(out: Path, job: dict, task: str, started: float, counts: dict, stages: dict | None = None,
               extra: dict | None = None) -> dict:
    """Totals read back from the parts (so a resumed job reports the whole job), the errors file, _SUCCESS.

    `stages` are this run's seconds per stage (read, decode, preprocess, encode, write, queue waits)."""
    import numpy as np

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
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
    err_dir = out / ERRORS_DIR
    err_files = sorted(err_dir.glob("part-*.parquet")) if err_dir.is_dir() else []
    err_tables = [pq.read_table(p) for p in err_files]
    errors = pa.concat_tables(err_tables) if err_tables else error_schema().empty_table()
    write_table_atomic(errors_path(out), errors)
    if (out / "errors.parquet").is_file():  # where tgems < 0.2 kept them: it hid the rows from pd.read_parquet
        (out / "errors.parquet").unlink()
    seconds = time.perf_counter() - started
    images_now = counts.get("images", 0)
    summary = {
        "task": task, "out": str(out), "engine": job["engine"], "fingerprint": job["fingerprint"],
        "settings": job["settings"], "parts": len(parts), "parts_written": counts.get("written", 0),
        "parts_skipped": counts.get("skipped", 0), "images": n, "errors": errors.num_rows,
        "mean_exit_layer": (sum(l * c for l, c in layer_counts.items()) / n) if n else None,
        "flops_ratio": flops_sum / n if n else None,
        "exit_layers": {str(l): c for l, c in sorted(layer_counts.items())},
        "seconds": round(seconds, 3), "images_this_run": images_now,
        "images_per_s": round(images_now / seconds, 2) if seconds > 0 else None,
    }
    if stages is not None:
        summary["stages"] = {k: round(float(v), 3) for k, v in stages.items()}
    summary.update(extra or {})
    write_json(out / "_SUCCESS", summary)
    return summary


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
    job = {**job, "fingerprint": fingerprint(job)}
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
    for d in (out, out / ERRORS_DIR):
        if d.is_dir():
            for p in d.iterdir():
                if is_tmp(p):  # left by a killed run
                    p.unlink()
    return job


__all__ = ["prepare_out_dir", "TASKS", "TOP_K", "ROW_GROUP", "ERRORS_DIR", "ERRORS_FILE", "part_name", "errors_path", "result_schema",
           "error_schema", "write_table_atomic", "locked", "disk_full_is_user_error", "shard_done", "write_shard_errors", "PartWriter",
           "finish_job"]
