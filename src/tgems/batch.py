"""A whole batch job from its specs: `tgems classify|embed --data SPEC --out DIR` in Python.

`run_command(PredictorSpec(...), JobSpec(data="folder:photos", out="out/"))` writes
``out/part-NNNNN.parquet`` (one per input shard), ``out/_errors.parquet`` (unreadable inputs and why) and
``out/_SUCCESS`` (settings and totals); the folder reads back as its rows (`pd.read_parquet("out/")`: names
starting with `_` or `.` are not data to pyarrow). Every part is written under a temporary name and renamed
when complete, and ``out/_job.json`` holds the job's settings fingerprint from the start: a rerun with the
same settings skips finished parts, so a job killed at any moment (SIGKILL included) ends, once rerun, with
exactly the rows of an uninterrupted run; a rerun with other settings is refused. Batches never span shards,
so a part's rows do not depend on where an earlier run stopped. The stages are `tgems.jobs`'; a predictor
object of your own runs through `tgems.jobs.runner.run_job`.
"""
from __future__ import annotations

from tgems.errors import TGEMError
from tgems.io import write_json
from tgems.jobs.runner import run_job
from tgems.spec import JobSpec, PredictorSpec, predictor_settings, specs_from_options


def run_command(predictor: PredictorSpec | None = None, job: JobSpec | None = None, *, json_path: str | None = None,
                quiet: bool = False, log=None, **options) -> tuple[dict, int]:
    """The whole `tgems classify|embed --data SPEC --out DIR` job: returns (summary, exit code).

    Give the specs, or their options as keywords (`data=`, `out=`, `labels=`, `budget=`, ...: the fields of
    `PredictorSpec` and `JobSpec`, plus `labels_file=`). Exit code 0 when every input was read, 1 when some
    were listed in _errors.parquet (the rest are done). Bad arguments or inputs raise TGEMError before any work.
    """
    from tgems.jobs.sources import open_source

    if options:
        p, j = specs_from_options(**options)
        predictor, job = predictor or p, job or j
    if predictor is None or job is None:
        raise TGEMError("a streamed job needs both --data SPEC and --out DIR")
    predictor, job = predictor.check(), job.check()
    source = open_source(job.data, **job.reader_options())  # fails before work
    if job.engine == "ray":
        from tgems.integrations.ray import run_ray_job

        summary = run_ray_job(predictor, job, progress=not quiet, log=log, source=source)
    else:
        clf = predictor.build(log=log)
        summary = run_job(clf, job, settings=predictor_settings(clf), progress=not quiet, source=source)
    if json_path:
        write_json(json_path, summary)
    return summary, (1 if summary["errors"] else 0)


def summary_line(summary: dict) -> str:
    fr = summary["flops_ratio"]
    return (f"{summary['images']} images -> {summary['parts']} parts in {summary['out']} "
            f"(mean exit layer {summary['mean_exit_layer'] or 0:.2f}, FLOPs ratio {fr or 0:.3f}, "
            f"{summary['parts_skipped']} parts resumed, {summary['images_per_s'] or 0:.0f} img/s)")
