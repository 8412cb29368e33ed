"""The predictor commands: `calibrate`, `classify` (image files, or a streamed job), `embed` and `vocab`. Each
builds a `PredictorSpec` (and a `JobSpec` for a streamed job) from the options and makes one library call."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tgems.cli.common import int_arg, logger, positive_int, show_progress, tau_arg, common, goal, labelled, placement
from tgems.errors import TGEMError
from tgems.io import write_json
from tgems.options import ENGINES, SCHEDULERS
from tgems.spec import DEFAULT_MODEL, DEFAULT_TGEM, default


def specs_from_args(args, job: bool = True):
    """The namespace -> (PredictorSpec, JobSpec or None), unchecked. `job=False`: `--out` is not a job's (as
    for `tgems calibrate`)."""
    from tgems.spec import JOB_FIELDS, PREDICTOR_FIELDS, specs_from_options

    names = set(PREDICTOR_FIELDS) | {"labels_file"} | (set(JOB_FIELDS) if job else set())
    return specs_from_options(**{k: v for k, v in vars(args).items() if k in names})


def cmd_calibrate(args):
    spec, _ = specs_from_args(args, job=False)
    clf = spec.check().build(progress=show_progress(args), log=logger(args))
    clf.save(args.out)
    logger(args)(f"saved the calibrated classifier to {args.out}")
    if args.json:
        write_json(args.json, {"model": clf.backbone.name, "tgem": spec.tgem or DEFAULT_TGEM, "labels": clf.labels,
                               "calibration": clf.calibration})
    return 0


def cmd_classify(args):
    from tgems.pipeline import classify_files

    if args.data or args.out:  # a streamed job: --data SPEC --out DIR
        return cmd_embed(args, task="classify")
    spec = specs_from_args(args)[0].check()  # the same spec, and the same checks, as a streamed job
    for name in STREAM_ONLY:  # a job's option in file mode would be silently ignored: refused instead
        if getattr(args, name, None) is not None:
            raise TGEMError(f"--{name.replace('_', '-')} {getattr(args, name)} is for a streamed job "
                            f"(--data SPEC --out DIR)")
    if not args.images:
        raise TGEMError("no image files given")
    clf = spec.build(log=logger(args))
    records, failures = classify_files(clf, args.images, batch_size=args.batch_size)
    L = clf.backbone.num_layers
    for f in failures:
        print(f"tgems: skipped: {f['reason']}", file=sys.stderr)
    for r in records:
        print(json.dumps(r) if args.jsonl else
              f"{r['path']}\t{r['label']}\t{r['probability']:.3f}\tlayer {r['exit_layer']}/{L}"
              f"\tFLOPs {r['flops_ratio']:.3f}")
    if args.json:
        write_json(args.json, {"model": clf.backbone.name, "labels": clf.labels, "calibration": clf.calibration,
                               "num_layers": L, "results": records, "failed": failures})
    if failures:
        print(f"tgems: error: {len(failures)} of {len(args.images)} images could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_embed(args, task="embed"):
    """A streamed job: prints one summary line (and one error line when inputs failed)."""
    from tgems.batch import run_command, summary_line
    from tgems.jobs.writer import ERRORS_FILE

    if getattr(args, "images", None):
        raise TGEMError("give image files or --data SPEC --out DIR, not both")
    args.task = task
    predictor, job = specs_from_args(args)
    summary, code = run_command(predictor, job, json_path=args.json, quiet=args.quiet, log=logger(args))
    if not args.quiet:
        print(f"tgems: {summary_line(summary)}", file=sys.stderr)
    if code:
        print(f"tgems: error: {summary['errors']} inputs could not be read (listed with their reason in "
              f"{Path(summary['out']) / ERRORS_FILE})", file=sys.stderr)
    return code


def cmd_vocab(args):
    from tgems.pipeline import vocabulary

    words, note = vocabulary(args.model, device=args.device, dtype=args.dtype)
    if words is not None:
        print("\n".join(words))
    logger(args)(note) if words is not None else print(note)
    return 0


STREAM_ONLY = ("workers", "engine", "address", "concurrency", "num_gpus", "image_column", "id_column", "block",
               "scheduler")  # the JobSpec options: argparse leaves them None when not given, the spec fills in


def add_stream_arguments(p: argparse.ArgumentParser, required: bool = True):
    """The JobSpec options of `tgems classify|embed --data SPEC --out DIR` (defaults: tgems.spec.JobSpec's,
    applied by the spec, so that an option given in file mode can be refused)."""
    p.add_argument("--data", required=required, help="folder:DIR[?block=N] | webdataset:PATTERN | parquet:PATH")
    p.add_argument("--out", required=required,
                   help="output directory: part-NNNNN.parquet, _errors.parquet, _SUCCESS (a rerun resumes)")
    p.add_argument("--workers", type=int_arg,
                   help=f"image decoding processes, at most the CPUs (0: decode in a thread; default "
                        f"{default('workers')})")
    p.add_argument("--batch-size", type=positive_int, default=default("batch_size"),
                   help=f"images per encoder batch (default {default('batch_size')})")
    p.add_argument("--engine", choices=ENGINES, help=f"local or Ray Data (default {default('engine')})")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--concurrency", type=positive_int,
                   help="Ray: predictor actors (default: chosen from the cluster's CPUs, or GPUs with --num-gpus)")
    p.add_argument("--num-gpus", type=float, help=f"Ray: GPUs per actor (default {default('num_gpus'):g})")
    p.add_argument("--image-column", help="parquet: the image-bytes column (default: image, jpg, bytes, img or png)")
    p.add_argument("--id-column", help="parquet: the id column (default: id, else FILE:ROW)")
    p.add_argument("--block", type=positive_int, help="folder: files per output part (default 1000)")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help=f"drop: micro-batches, rows that exit leave the batch; depth: every block on a full batch, "
                        f"refilled from the stream (for accelerators; docs/batch.md) (default {default('scheduler')})")


def add_parsers(sub):
    cb = sub.add_parser("calibrate", help="calibrate a classifier for a label set and save it (for --classifier)")
    labelled(cb)
    goal(cb, required=True)
    cb.add_argument("--out", required=True, help="directory of the saved classifier")
    placement(cb)
    common(cb)
    cb.set_defaults(func=cmd_calibrate)

    def classifier_source(sp):
        """A classifier from --model/--tgem/--labels and a goal or --tau, or a saved one (--classifier)."""
        labelled(sp)
        sp.add_argument("--classifier", help="a saved calibrated classifier (from tgems calibrate)")
        goal(sp)
        sp.add_argument("--tau", type=tau_arg, help="exit threshold in [0, 2] (default: the checkpoint's; 2 never exits)")

    c = sub.add_parser("classify", help="label image files, or stream --data SPEC to sharded parquet in --out DIR")
    classifier_source(c)
    c.add_argument("--jsonl", action="store_true", help="one JSON record per line")
    c.add_argument("images", nargs="*")
    add_stream_arguments(c, required=False)
    placement(c)
    common(c)
    c.set_defaults(func=cmd_classify)

    em = sub.add_parser("embed", help="stream --data SPEC to parquet in --out DIR: the embedding each image exits with")
    classifier_source(em)
    add_stream_arguments(em)
    placement(em)
    common(em)
    em.set_defaults(func=cmd_embed)

    vo = sub.add_parser("vocab", help="the words a model's tokenizer knows (word-level tokenizers, e.g. embedded)")
    vo.add_argument("--model", default=DEFAULT_MODEL)
    placement(vo)
    common(vo)
    vo.set_defaults(func=cmd_vocab)
