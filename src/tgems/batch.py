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

import sys
from pathlib import Path

from tgems.errors import TGEMError
from tgems.io import write_json
# The reading / encoding / writing loop lives in tgems.jobs; its names stay importable from here.
from tgems.jobs.runner import (JOB_FORMAT, _embeddings, _Progress, job_record as _job_record,  # noqa: F401
                               predict_items, predict_table, run_job)
from tgems.jobs.writer import (ERRORS_DIR, ERRORS_FILE as ERRORS, ROW_GROUP, TOP_K,  # noqa: F401
                               _diff, _fingerprint, error_schema, finish_job, locked as _locked, part_name,
                               prepare_out_dir, result_schema,
                               write_shard_errors as _write_shard_errors, write_table_atomic)
from tgems.spec import TASKS, JobSpec, PredictorSpec, predictor_settings, specs_from_args, specs_from_options


# ------------------------------------------------------------------------------------- predictors


ClassifierSpec = PredictorSpec  # the earlier name, kept for Ray's actors and older scripts


def describe_predictor(predictor) -> dict:
    """The settings of a predictor object, for jobs started from Python without a spec."""
    return predictor_settings(predictor)


# ------------------------------------------------------------------------------------- files


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
                              progress=not quiet, workers=job.workers, scheduler=job.scheduler)
    else:
        clf = predictor.build(log=log)
        summary = run_job(clf, source, job.out, task=job.task, batch_size=predictor.batch_size,
                          workers=job.workers, settings=predictor_settings(clf), progress=not quiet,
                          scheduler=job.scheduler)
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
