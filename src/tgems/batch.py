"""Batch jobs at volume: stream images through an early-exit classifier into sharded parquet, with resume.

`run_job(predictor, "folder:photos", "out/")` writes ``out/part-NNNNN.parquet`` (one per input
shard), ``out/errors.parquet`` (unreadable inputs and why) and ``out/_SUCCESS`` (settings and
totals). Every part is written under a temporary name and renamed when complete, and
``out/_job.json`` holds the job's settings fingerprint from the start: a rerun with the same
settings skips finished parts, so a job killed at any moment (SIGKILL included) ends, once rerun,
with exactly the rows of an uninterrupted run; a rerun with other settings is refused. Batches
never span shards, so a part's rows do not depend on where an earlier run stopped.

A *predictor* is anything with ``predict(list_of_pil_images) -> Prediction`` and ``labels``
(an `EarlyExitClassifier`); `ClassifierSpec` builds one from a saved classifier directory or
from model / T-GEM / labels / budget, the same way here, in the CLI and in every Ray actor.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tgems.backbones import as_dtype
from tgems.errors import TGEMError
from tgems.io import is_tmp, write_json
# The reading / encoding / writing loop lives in tgems.jobs; its names stay importable from here.
from tgems.jobs.runner import (JOB_FORMAT, _embeddings, _Progress, job_record as _job_record,  # noqa: F401
                               predict_items, predict_table, run_job)
from tgems.jobs.writer import (ROW_GROUP, TASKS, TOP_K, error_schema, finish_job, locked as _locked,  # noqa: F401
                               part_name, result_schema, write_shard_errors as _write_shard_errors,
                               write_table_atomic)
from tgems.pipeline import read_labels
from tgems.pretrained import tgem_path
from tgems.profiles import check_labels


# ------------------------------------------------------------------------------------- predictors


def _hash_dir(path: Path) -> str:
    """Content hash of a checkpoint directory (so a changed checkpoint is a changed job)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


DEFAULT_TGEM = "embedded:cls"


def _check_labels(labels) -> list[str]:
    labels = check_labels([str(t).strip() for t in (labels or [])])
    if len(labels) < 2:
        raise TGEMError("give at least two class texts")
    return labels


@dataclass
class ClassifierSpec:
    """How to build the classifier: a saved directory, or model + T-GEM + labels (+ calibration).

    Plain data, so it travels to Ray actors and into the job fingerprint; `build()` makes the classifier.
    """

    classifier: str | None = None
    model: str = "embedded"
    tgem: str | None = None
    labels: list | None = None
    budget: float | None = None
    max_drop: float | None = None
    delta: float = 0.1
    calib: str | None = None
    tau: float | None = None
    label_free: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def check(self) -> "ClassifierSpec":
        if self.classifier is not None:
            if not Path(self.classifier).is_dir():
                raise TGEMError(f"saved classifier {self.classifier} is not a directory")
            return self
        self.labels = _check_labels(self.labels)
        if self.budget is not None and self.max_drop is not None:
            raise TGEMError("give --budget or --max-drop, not both")
        if (self.budget is not None or self.max_drop is not None) and not self.calib:
            raise TGEMError("--budget/--max-drop need --calib SPEC (held-out images to calibrate on)")
        if self.tau is not None and (self.budget is not None or self.max_drop is not None):
            raise TGEMError("--tau sets the threshold directly; it cannot be combined with --budget/--max-drop")
        tgem = tgem_path(self.tgem or DEFAULT_TGEM)
        if not tgem.exists():
            raise TGEMError(f"T-GEM checkpoint {tgem} does not exist")
        return self

    def settings(self) -> dict:
        """What determines the rows: goes into the job fingerprint and _SUCCESS."""
        d = asdict(self)
        if self.classifier is not None:
            keep = ("classifier", "device", "dtype")
            d = {k: d[k] for k in keep}
            d["classifier_hash"] = _hash_dir(Path(self.classifier))
            return d
        d["tgem"] = str(self.tgem or DEFAULT_TGEM)
        if tgem_path(d["tgem"]).exists():
            d["tgem_hash"] = _hash_dir(tgem_path(d["tgem"]))
        if Path(self.model).is_dir():
            d["model_hash"] = _hash_dir(Path(self.model))
        return d

    def build(self):
        """The library's own builder (tgems.pipeline.build_classifier), as `tgems classify` uses it."""
        from tgems.pipeline import build_classifier

        return build_classifier(self.model, self.tgem or DEFAULT_TGEM, self.labels, classifier=self.classifier,
                                calib=self.calib, budget=self.budget, max_drop=self.max_drop, delta=self.delta,
                                tau=self.tau, label_free=self.label_free, seed=self.seed, device=self.device,
                                dtype=self.dtype)


def describe_predictor(predictor) -> dict:
    """A fingerprint of a predictor object, for jobs started from Python without a ClassifierSpec."""
    import numpy as np

    h = hashlib.sha256()

    def feed(obj, depth=0):
        if depth > 3:
            return
        if hasattr(obj, "state_dict") and callable(obj.state_dict):
            for k, v in sorted(obj.state_dict().items()):
                h.update(k.encode())
                feed(v, depth + 1)
        elif hasattr(obj, "detach") and hasattr(obj, "cpu"):
            h.update(obj.detach().float().cpu().numpy().tobytes())
        elif isinstance(obj, np.ndarray):
            h.update(obj.tobytes())
        elif isinstance(obj, (int, float, str, bool)) or obj is None:
            h.update(repr(obj).encode())
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                feed(v, depth + 1)
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                feed(obj[k], depth + 1)
        elif hasattr(obj, "__dict__"):
            feed(vars(obj), depth + 1)

    for name in ("labels", "tau", "goal", "profiles", "jumper"):
        h.update(name.encode())
        feed(getattr(predictor, name, None))
    bb = getattr(predictor, "backbone", None)
    fp = getattr(bb, "fingerprint", None)
    desc = {"type": type(predictor).__name__, "labels": list(getattr(predictor, "labels", []))}
    if callable(fp):
        try:
            desc["backbone"] = fp()
        except Exception:  # a backbone without a fingerprint only weakens the resume check
            desc["backbone"] = getattr(bb, "name", None)
    desc["state"] = h.hexdigest()[:16]
    return desc


# ------------------------------------------------------------------------------------- files


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


# ------------------------------------------------------------------------------------- the CLI job


def run_command(*, data: str, out: str, task: str = "classify", classifier: str | None = None,
                model: str = "embedded", tgem: str | None = None, labels=None, labels_file: str | None = None,
                budget: float | None = None, max_drop: float | None = None, delta: float = 0.1,
                calib: str | None = None, tau: float | None = None, label_free: bool = False, workers: int = 2,
                batch_size: int = 64,
                device: str = "cpu", dtype: str = "float32", engine: str = "local", address: str | None = None,
                concurrency: int | None = None, num_gpus: float = 0, json_path: str | None = None, quiet: bool = False,
                seed: int = 0, image_column: str | None = None, id_column: str | None = None,
                block: int | None = None) -> tuple[dict, int]:
    """The whole `tgems classify|embed --data SPEC --out DIR` job: returns (summary, exit code).

    Exit code 0 when every input was read, 1 when some were listed in errors.parquet (the rest are done).
    Bad arguments or inputs raise TGEMError before any work.
    """
    from tgems.data.streaming import open_source

    if engine not in ("local", "ray"):
        raise TGEMError(f"unknown engine '{engine}' (use local or ray)")
    if classifier is None:
        labels = read_labels(labels, labels_file) if labels_file or isinstance(labels, str) else list(labels or [])
    spec = ClassifierSpec(classifier=classifier, model=model, tgem=tgem, labels=labels if classifier is None else None,
                          budget=budget, max_drop=max_drop, delta=delta, calib=calib, tau=tau, label_free=label_free,
                          device=device, dtype=dtype, seed=seed).check()
    as_dtype(dtype)
    source = open_source(data, block=block, image_column=image_column, id_column=id_column)  # fails before work
    if engine == "ray":
        from tgems.integrations.ray import run_ray_job

        summary = run_ray_job(spec, source, out, task=task, batch_size=batch_size, concurrency=concurrency,
                              num_gpus=num_gpus, address=address, progress=not quiet, workers=workers)
    else:
        predictor = spec.build()
        summary = run_job(predictor, source, out, task=task, batch_size=batch_size, workers=workers,
                          settings=spec.settings(), progress=not quiet)
    if json_path:
        write_json(json_path, summary)
    return summary, (1 if summary["errors"] else 0)


def summary_line(summary: dict) -> str:
    fr = summary["flops_ratio"]
    return (f"{summary['images']} images -> {summary['parts']} parts in {summary['out']} "
            f"(mean exit layer {summary['mean_exit_layer'] or 0:.2f}, FLOPs ratio {fr or 0:.3f}, "
            f"{summary['parts_skipped']} parts resumed, {summary['images_per_s'] or 0:.0f} img/s)")


def add_stream_arguments(p: argparse.ArgumentParser, required: bool = True):
    """The streamed-job options of `tgems classify|embed --data SPEC --out DIR` (the CLI adds model, labels,
    goal, --device/--dtype and --json/--quiet/--seed itself)."""
    p.add_argument("--data", required=required, help="folder:DIR[?block=N] | webdataset:PATTERN | parquet:PATH")
    p.add_argument("--out", required=required,
                   help="output directory: part-NNNNN.parquet, errors.parquet, _SUCCESS (a rerun resumes)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (0: decode in a thread)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    p.add_argument("--engine", default="local", choices=("local", "ray"), help="local (default) or Ray Data")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="Ray: predictor actors (default: chosen from the cluster's CPUs, or GPUs with --num-gpus)")
    p.add_argument("--num-gpus", type=float, default=0, help="Ray: GPUs per actor (default 0)")
    p.add_argument("--image-column", help="parquet: the image-bytes column (default: image, jpg, bytes, img or png)")
    p.add_argument("--id-column", help="parquet: the id column (default: id, else FILE:ROW)")
    p.add_argument("--block", type=int, help="folder: files per output part (default 1000)")


def cmd_batch(args) -> int:
    """argparse namespace -> job; prints one summary line (and one error line when inputs failed)."""
    if not args.data or not args.out:
        raise TGEMError("a streamed job needs both --data SPEC and --out DIR")
    summary, code = run_command(
        data=args.data, out=args.out, task=args.task, classifier=args.classifier, model=args.model, tgem=args.tgem,
        labels=args.labels, labels_file=args.labels_file, budget=args.budget, max_drop=args.max_drop,
        delta=args.delta, calib=args.calib, tau=args.tau, label_free=getattr(args, "label_free", False),
        workers=args.workers, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, engine=args.engine, address=args.address,
        concurrency=args.concurrency, num_gpus=args.num_gpus, json_path=args.json, quiet=args.quiet,
        seed=args.seed, image_column=args.image_column, id_column=args.id_column, block=args.block)
    if not args.quiet:
        print(f"tgems: {summary_line(summary)}", file=sys.stderr)
    if code:
        print(f"tgems: error: {summary['errors']} inputs could not be read (listed with their reason in "
              f"{Path(summary['out']) / 'errors.parquet'})", file=sys.stderr)
    return code
