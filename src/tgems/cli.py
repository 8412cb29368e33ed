"""`tgems` command line: argument parsing and one library call per command.

Every failure the user can cause ends in one line on stderr and a non-zero exit; outputs are
written to a temporary name and renamed, so no partial file is ever left behind.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

from tgems import __version__
from tgems.errors import TGEMError
from tgems.io import write_json
from tgems.spec import DEFAULT_MODEL, DEFAULT_TGEM, DTYPES, ENGINES, SCHEDULERS, default


def _budget(value: str) -> float:
    try:
        b = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got '{value}'") from None
    if not 0 < b <= 1:
        raise argparse.ArgumentTypeError(f"budget must lie in (0, 1], got {b}")
    return b


def _int_arg(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{value}'") from None


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{value}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _seed_value(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer in 0 .. 2**32 - 1, got '{value}'") from None
    if not 0 <= n < 2 ** 32:
        raise argparse.ArgumentTypeError(f"seed must be an integer in 0 .. 2**32 - 1, got {n}")
    return n


def _layers(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got '{value}'") from None


def _log(args):
    return (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


def _seed(seed: int):
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def _check_outputs(args) -> None:
    """Refuse unwritable outputs before the work (not after minutes of it), and never let --out
    replace an existing directory that is not a previous output of the same command."""
    for flag in ("json", "plot", "out"):
        value = getattr(args, flag, None)
        if not value:
            continue
        p = Path(value).expanduser().absolute()
        if flag != "out" and p.is_dir():
            raise TGEMError(f"--{flag} {value} is a directory")
        if flag == "plot" and p.suffix.lower() != ".png":
            raise TGEMError("--plot must name a .png file")
        if flag == "out" and p.exists():
            if not p.is_dir():
                raise TGEMError(f"--out {value} exists and is not a directory")
            own = {"fit": ["tgem.json"], "pretrain": ["pretrain.json", "checkpoint/state.json"],
                   "calibrate": ["classifier.json"], "index-fit": ["retrieval.json"]}.get(args.command)
            if own and any(p.iterdir()) and not any((p / f).is_file() for f in own):
                raise TGEMError(f"--out {value} is a non-empty directory that is not a previous "
                                f"`tgems {args.command}` output; refusing to replace it")
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise TGEMError(f"cannot write --{flag} {value}: {parent} is not a directory")
        if not os.access(parent, os.W_OK):
            raise TGEMError(f"cannot write --{flag} {value}: {parent} is not writable")


# ----------------------------------------------------------------------------- commands


def _progress(args) -> bool:
    return not args.quiet


def _budgets(args):
    from tgems.evaluation.harness import DEFAULT_BUDGETS

    if args.max_drop is not None:
        return []
    return [args.budget] if args.budget is not None else list(DEFAULT_BUDGETS)


def cmd_pretrain(args):
    from tgems.training.pretrain import pretrain

    info = pretrain(args.out, preset=args.preset, data=args.data, seed=args.seed, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, resume=not args.no_resume, progress=_progress(args),
                    threads=args.threads, device=args.device, workers=args.workers,
                    eval_every=args.eval_every)
    _log(args)(f"saved {args.out} ({info['train_seconds']:.0f} s, {info['samples_seen']} samples)")
    if args.json:
        write_json(args.json, info)
    return 0


def cmd_fit(args):
    from tgems.training.fit import FitSettings, fit_and_save

    log = _log(args)
    s = FitSettings(space=args.space, layers=args.layers, hidden=args.hidden, epochs=args.epochs,
                    lam=args.lam, r_target=args.r_target, soft_tau=args.soft_tau, jumper_target=args.jumper_target,
                    cross_fit=not args.no_cross_fit, seed=args.seed, recipe=args.recipe,
                    readout_mix=not args.no_readout_mix, trajectory=args.trajectory,
                    **({"jumper_max": args.jumper_max} if args.jumper_max is not None else {}))
    info = fit_and_save(args.model, args.data, args.out, s, n=args.n, device=args.device, dtype=args.dtype,
                        progress=_progress(args), cache=args.cache, max_images=args.max_images, workers=args.workers,
                        near_chance="warn" if args.accept_degenerate else "refuse")
    if "cache" in info:
        c, sk = info["cache"], info["skipped"]
        log(f"{c['images']} images from {c['shards']} shard(s), {c['encoded']} encoded now"
            + (f" ({c['images_per_second']} images/s)" if c["images_per_second"] else "")
            + (f"; {sk['count']} skipped: " + "; ".join(f"{k} ({v})" for k, v in sk["reasons"].items())
               if sk["count"] else ""))
    if info.get("cross_fit_skipped"):
        log(f"cross-fitting skipped: {info['cross_fit_skipped']}")
    for row in info["per_layer_holdout"]:
        log(f"  layer {row['layer']:>2}: accuracy {100 * row['accuracy']:6.2f}%  agreement {100 * row['agreement']:6.2f}%")
    log(f"saved T-GEM ({args.space}) to {args.out} in {info['fit_seconds']} s")
    if args.json:
        write_json(args.json, {"model": args.model, "data": args.data, "seed": args.seed, **info})
    return 0


def cmd_eval(args):
    from tgems.evaluation.harness import evaluate
    from tgems.evaluation.report import format_table, max_drop_line, summary_line

    budgets = _budgets(args)
    report = evaluate(args.model, args.tgem, args.data, n=args.n, calib=args.calib, train=args.train,
                      shots=args.shots, n_train=args.n_train, budgets=budgets, seed=args.seed,
                      speed=not args.no_speed, progress=_progress(args), device=args.device, dtype=args.dtype,
                      max_drop=args.max_drop, delta=args.delta, log=_log(args))
    print(format_table(report["results"], report["num_layers"]))
    if budgets:
        print(summary_line(report["results"], 0.5 if 0.5 in budgets else budgets[0], report.get("warnings")))
    else:
        print(max_drop_line(report["results"], args.max_drop, args.delta, report.get("warnings")))
    if args.json:
        write_json(args.json, report)
    if args.plot:
        from tgems.evaluation.plots import tradeoff_plot

        tradeoff_plot(report, args.plot, title=f"{args.model} on {args.data}")
    return _degenerate_exit(args, report.get("warnings"))


DEGENERATE_EXIT = 4  # the command ran and wrote its record, but its result is degenerate (docs/design.md)


def _degenerate_exit(args, warnings) -> int:
    """A degenerate result (the full model at chance, or one class for almost every image) is said on
    stderr even with --quiet, and ends in DEGENERATE_EXIT unless --accept-degenerate."""
    from tgems.evaluation.harness import DEGENERATE_KINDS

    found = [w["message"] for w in warnings or [] if w.get("kind") in DEGENERATE_KINDS]
    if not found:
        return 0
    if args.accept_degenerate:
        print(f"tgems: warning: degenerate result (accepted): {found[0]}", file=sys.stderr)
        return 0
    print(f"tgems: error: degenerate result: {found[0]} (the record is written; --accept-degenerate "
          f"exits 0)", file=sys.stderr)
    return DEGENERATE_EXIT


def cmd_calibrate(args):
    from tgems.spec import specs_from_args

    spec, _ = specs_from_args(args, job=False)
    clf = spec.check().build(progress=_progress(args), log=_log(args))
    clf.save(args.out)
    _log(args)(f"saved the calibrated classifier to {args.out}")
    if args.json:
        write_json(args.json, {"model": clf.backbone.name, "tgem": spec.tgem or DEFAULT_TGEM, "labels": clf.labels,
                               "calibration": clf.calibration})
    return 0


def cmd_classify(args):
    from tgems.pipeline import classify_files
    from tgems.spec import specs_from_args

    if args.data or args.out:  # a streamed job: --data SPEC --out DIR (tgems.batch)
        return cmd_embed(args, task="classify")
    spec, _ = specs_from_args(args)  # the same spec, and the same checks, as a streamed job
    spec.check()
    if args.scheduler != default("scheduler"):
        raise TGEMError(f"--scheduler {args.scheduler} is for a streamed job (--data SPEC --out DIR)")
    if not args.images:
        raise TGEMError("no image files given")
    clf = spec.build(log=_log(args))
    records, failures = classify_files(clf, args.images, batch_size=spec.batch_size)
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
    from tgems.batch import cmd_batch

    if getattr(args, "images", None):
        raise TGEMError("give image files or --data SPEC --out DIR, not both")
    args.task = task
    return cmd_batch(args, log=_log(args))


def cmd_demo(args):
    from tgems.evaluation.demo import run_demo
    from tgems.evaluation.report import format_table, guarantee_line, retrieval_line, summary_line

    report = run_demo(args.model, args.tgem or None, args.out, n=args.n, speed=not args.no_speed, seed=args.seed,
                      progress=_progress(args), device=args.device, dtype=args.dtype, log=_log(args))
    print(format_table(report["results"], report["num_layers"]))
    print(guarantee_line(report["guarantee"]))
    if "retrieval" in report:
        print(retrieval_line(report["retrieval"]))
    print(summary_line(report["results"], 0.5, report.get("warnings")))
    if args.json:
        write_json(args.json, report)
    return 0


def cmd_index(args):
    from tgems.retrieval import build_index

    info = build_index(args.model, args.tgem, args.data, args.out, budget=args.budget, max_drop=args.max_drop,
                       delta=args.delta, rank=args.rank, calib=args.calib, n_calib=args.n_calib, n=args.n,
                       seed=args.seed, device=args.device, dtype=args.dtype, progress=_progress(args),
                       workers=args.workers)
    print(f"indexed {info['images']} images into {info['index']}: {info['mean_layers']:.2f} of "
          f"{info['num_layers']} layers on average, FLOPs ratio {info['flops_ratio']:.3f}")
    if info["skipped"]:
        first = info["skipped"][0]
        print(f"tgems: skipped {len(info['skipped'])} unreadable image(s), listed in {info['index']}/index.json "
              f"(meta.skipped); first: {first['id']}: {first['reason']}", file=sys.stderr)
    if args.json:
        write_json(args.json, info)
    return 0


def cmd_search(args):
    from tgems.retrieval import search

    res = search(args.index, args.query, image=args.image, k=args.k, model=args.model, device=args.device,
                 dtype=args.dtype)
    for h in res["hits"]:
        print(f"{h['rank']}\t{h.get('path', h['id'])}\t{h['score']:.4f}\tlayer {h['exit_layer']}")
    if args.json:
        write_json(args.json, res)
    return 0


def cmd_serve(args):
    from dataclasses import replace

    from tgems.serve.models import ServeSettings
    from tgems.serve.server import parse_sources, run_server

    ray_only = {k: getattr(args, k) for k in ("replicas", "replica_cpus") if getattr(args, k) is not None}
    if ray_only and args.engine != "ray":
        flags = " and ".join("--" + k.replace("_", "-") for k in ray_only)
        raise TGEMError(f"{flags} {'needs' if len(ray_only) == 1 else 'need'} --engine ray")
    settings = replace(ServeSettings(), **ray_only, **{k: getattr(args, k) for k in (
        "host", "port", "max_batch_size", "max_wait_ms", "queue_size", "max_client_batch", "max_inflight",
        "audit_rate", "seed", "device", "dtype", "tgem", "engine", "max_body_mb", "scheduler")})
    sources, log = parse_sources(args.classifier), lambda msg: print(msg, file=sys.stderr, flush=True)
    if settings.engine == "ray":
        from tgems.integrations.ray_serve import run_ray_server

        return run_ray_server(sources, settings, log)
    return run_server(sources, settings, log)


def cmd_index_fit(args):
    from tgems.training.index_fit import IndexFitSettings, fit_and_save_index

    given = {"epochs": args.epochs} if args.epochs else {}
    info = fit_and_save_index(args.model, args.data, args.out, IndexFitSettings(**given, seed=args.seed),
                              n=args.n, device=args.device, dtype=args.dtype, progress=_progress(args))
    _log(args)(f"saved retrieval maps for {args.model} to {args.out} ({info['images']} images, "
               f"{info['fit_seconds']} s); index with `tgems index --model {args.model} --tgem {args.out}`")
    if args.json:
        write_json(args.json, {"model": args.model, "data": args.data, "seed": args.seed, **info})
    return 0


def cmd_vocab(args):
    from tgems.pipeline import vocabulary

    words, note = vocabulary(args.model, device=args.device, dtype=args.dtype)
    if words is not None:
        print("\n".join(words))
    _log(args)(note) if words is not None else print(note)
    return 0


# ----------------------------------------------------------------------------- parser


def _fraction(what):
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number in (0, 1), got '{value}'") from None
        if not 0 < x < 1:
            raise argparse.ArgumentTypeError(f"{what} must lie in (0, 1), got {x}")
        return x
    return parse


def _positive_float(what):
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a positive number, got '{value}'") from None
        if not (x > 0 and math.isfinite(x)):
            raise argparse.ArgumentTypeError(f"{what} must be a positive number, got {x}")
        return x
    return parse


def _unit_interval(what):
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number in [0, 1], got '{value}'") from None
        if not 0 <= x <= 1:
            raise argparse.ArgumentTypeError(f"{what} must lie in [0, 1], got {x}")
        return x
    return parse


def _tau(value: str) -> float:
    from tgems.spec import NEVER_EXIT, _number

    try:
        return _number(value, f"tau ({NEVER_EXIT:g} never exits early)", 0, NEVER_EXIT, lo_open=False)
    except TGEMError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other tgems error (argparse prints the usage block first)."""

    def error(self, message):
        self.exit(2, f"tgems: error: {message} (see `{self.prog} --help`)\n")


def add_stream_arguments(p: argparse.ArgumentParser, required: bool = True):
    """The JobSpec options of `tgems classify|embed --data SPEC --out DIR` (defaults: tgems.spec.JobSpec's)."""
    p.add_argument("--data", required=required, help="folder:DIR[?block=N] | webdataset:PATTERN | parquet:PATH")
    p.add_argument("--out", required=required,
                   help="output directory: part-NNNNN.parquet, _errors.parquet, _SUCCESS (a rerun resumes)")
    p.add_argument("--workers", type=_int_arg, default=default("workers"),
                   help=f"image decoding processes, at most the CPUs (0: decode in a thread; default "
                        f"{default('workers')})")
    p.add_argument("--batch-size", type=_positive_int, default=default("batch_size"),
                   help=f"images per encoder batch (default {default('batch_size')})")
    p.add_argument("--engine", default=default("engine"), choices=ENGINES, help="local (default) or Ray Data")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--concurrency", type=_positive_int, default=default("concurrency"),
                   help="Ray: predictor actors (default: chosen from the cluster's CPUs, or GPUs with --num-gpus)")
    p.add_argument("--num-gpus", type=float, default=default("num_gpus"), help="Ray: GPUs per actor (default 0)")
    p.add_argument("--image-column", help="parquet: the image-bytes column (default: image, jpg, bytes, img or png)")
    p.add_argument("--id-column", help="parquet: the id column (default: id, else FILE:ROW)")
    p.add_argument("--block", type=_positive_int, help="folder: files per output part (default 1000)")
    p.add_argument("--scheduler", default=default("scheduler"), choices=SCHEDULERS,
                   help=f"drop: micro-batches, rows that exit leave the batch; depth: every block on a full batch, "
                        f"refilled from the stream (for accelerators; docs/batch.md) (default {default('scheduler')})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tgems", description="Text-Guided Exit Modules for CLIP image encoders")
    p.add_argument("--version", action="version", version=f"tgems {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp, json_help="write the figures as JSON"):
        sp.add_argument("--json", metavar="PATH", help=json_help)
        sp.add_argument("--quiet", action="store_true", help="no progress bars or logs")
        sp.add_argument("--seed", type=_seed_value, default=0)

    def placement(sp):
        sp.add_argument("--device", default=default("device"), help="cpu, cuda or cuda:N (default: cpu)")
        sp.add_argument("--dtype", default=default("dtype"), choices=DTYPES)

    def goal(sp, required=False):
        g = sp.add_mutually_exclusive_group(required=required)
        g.add_argument("--budget", type=_budget, help="calibrate for this compute budget (mean layers / L) on --calib")
        g.add_argument("--max-drop", type=_fraction("max-drop"),
                       help="calibrate for at most this disagreement with the full model, w.p. >= 1 - delta")
        sp.add_argument("--delta", type=_fraction("delta"), default=default("delta"),
                        help=f"confidence of --max-drop (default {default('delta')})")
        return g

    def labelled(sp):
        """The options of a PredictorSpec (tgems.spec): their defaults are the spec's."""
        sp.add_argument("--model", default=default("model"),
                        help=f"{DEFAULT_MODEL} (default; with --classifier: the backbone it was saved with), "
                             f"a local HF CLIP/SigLIP dir or a hub id")
        sp.add_argument("--tgem", default=default("tgem"),
                        help=f"T-GEM checkpoint: {DEFAULT_TGEM} (default), embedded:rates or a dir")
        sp.add_argument("--labels", help='comma-separated class texts, e.g. "a red circle,a blue star"')
        sp.add_argument("--labels-file", help="one class text per line")
        sp.add_argument("--calib", help="calibration data spec (images of the label set's classes)")
        sp.add_argument("--label-free", action="store_true",
                        help="calibrate on agreement with the full model (images of any classes, no labels used)")

    d = sub.add_parser("demo", help="the whole story on the embedded default, offline")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--tgem", action="append", help="T-GEM checkpoints (default: embedded:cls and embedded:rates)")
    d.add_argument("--out", default="results/demo")
    d.add_argument("--n", type=_positive_int, default=None, help="number of test images (default: the whole split)")
    d.add_argument("--no-speed", action="store_true", help="skip throughput measurements")
    placement(d)
    common(d)
    d.set_defaults(func=cmd_demo)

    pt = sub.add_parser("pretrain", help="train a small CLIP (the embedded default is --preset embedded)")
    pt.add_argument("--preset", default="embedded")
    pt.add_argument("--data", default="scenes:train")
    pt.add_argument("--out", required=True)
    pt.add_argument("--steps", type=_positive_int)
    pt.add_argument("--batch-size", type=_positive_int)
    pt.add_argument("--lr", type=float)
    pt.add_argument("--threads", type=_positive_int)
    pt.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default: cpu)")
    pt.add_argument("--workers", type=int, default=1,
                    help="processes that make batches ahead of the training step (default: 1; 0 = inline)")
    pt.add_argument("--eval-every", type=int, default=0,
                    help="zero-shot top-1 on scenes:testall every N steps, kept in pretrain.json (default: off)")
    pt.add_argument("--no-resume", action="store_true")
    common(pt)
    pt.set_defaults(func=cmd_pretrain)

    f = sub.add_parser("fit", help="train T-GEMs and the Jumper for a backbone on a dataset (scenes:, cifar*:, or "
                                   "streamed: folder:DIR, webdataset:PATTERN, parquet:PATH[?caption=COL&label=COL])")
    f.add_argument("--model", default="embedded")
    f.add_argument("--data", default="scenes:train")
    f.add_argument("--out", required=True)
    f.add_argument("--n", type=_positive_int, help="use the first N images (built-in datasets)")
    f.add_argument("--cache", metavar="DIR",
                   help="streamed data: keep the feature cache here, resume or reuse it (default: a temporary "
                        "one, removed at the end)")
    f.add_argument("--max-images", type=_positive_int, help="streamed data: use the first N usable images")
    f.add_argument("--workers", type=int, default=None,
                   help="streamed data: processes that decode images ahead of the encoder (default: 2; 0 = inline)")
    f.add_argument("--space", choices=("cls", "rates"), default="cls")
    f.add_argument("--layers", type=_layers, help="candidate exit layers, e.g. 2,4,6 (default: all)")
    f.add_argument("--hidden", type=_positive_int, default=256)
    f.add_argument("--epochs", type=_positive_int, default=30)
    f.add_argument("--lam", type=float, default=0.0, help="rate-based regularizer strength (0 = off)")
    f.add_argument("--r-target", type=float, default=0.4, help="target expected fraction of layers run")
    f.add_argument("--soft-tau", type=float, default=None,
                   help="top-1 probability at which the training-time soft exits fire (default: the full "
                        "model's median on the training images)")
    f.add_argument("--jumper-target", choices=("goal", "agree", "no_loss"), default="goal",
                   help="what the exit score estimates: agreement with the full model (label-free), that "
                        "exiting costs no accuracy (needs labels), or per goal: the first for max_drop, the "
                        "second for budgets (the default)")
    f.add_argument("--jumper-max", type=_positive_int,
                   help="at most this many held-out images fit the Jumper and set tau (default: 4,000; its memory "
                        "and time grow with it, not with the number of images)")
    f.add_argument("--no-cross-fit", action="store_true",
                   help="fit the budget Jumper on the main modules only (about half the fit time; it then "
                        "transfers less well to classes known only by text)")
    f.add_argument("--recipe", choices=("tgem", "distilled"), default="tgem",
                   help="exit readouts: T-GEM profiles alone (default), or mixed with distilled readouts (label-free "
                        "maps from z_l toward the final embedding; cls only; no gain measured, docs/design.md)")
    f.add_argument("--trajectory", action="store_true",
                   help="the Jumper also reads trajectory signals (patience, agreement of the two readouts)")
    f.add_argument("--no-readout-mix", action="store_true",
                   help="distilled recipe: the T-GEM profiles alone predict; the distilled readout only informs "
                        "the Jumper (an ablation)")
    f.add_argument("--accept-degenerate", action="store_true",
                   help="fit even when the full model's accuracy on the labels is at or near chance (default: "
                        "refused before training)")
    placement(f)
    common(f)
    f.set_defaults(func=cmd_fit)

    e = sub.add_parser("eval", help="accuracy and compute of every method at a budget, a sweep or a max drop")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--tgem", action="append", required=True, help="T-GEM checkpoint (repeat for cls and rates)")
    e.add_argument("--data", required=True)
    e.add_argument("--n", type=_positive_int, help="use N test images")
    e.add_argument("--calib", help="calibration data spec (default: scenes:calib for scenes, else half the data)")
    e.add_argument("--train", help="training data for the probe baseline")
    e.add_argument("--n-train", type=_positive_int, default=4000)
    e.add_argument("--shots", help="images for the k-shot baseline")
    g = goal(e)
    g.add_argument("--sweep", action="store_true", help="budgets 0.3 .. 0.7 (the default)")
    e.add_argument("--plot", metavar="PNG")
    e.add_argument("--no-speed", action="store_true")
    e.add_argument("--accept-degenerate", action="store_true",
                   help=f"exit 0 when the full model is at chance on the labels or gives one class to almost "
                        f"every image (default: exit {DEGENERATE_EXIT}, after writing the report)")
    placement(e)
    common(e)
    e.set_defaults(func=cmd_eval)

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
        sp.add_argument("--tau", type=_tau, help="exit threshold in [0, 2] (default: the checkpoint's; 2 never exits)")

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

    ix = sub.add_parser("index", help="encode images with early exit into a retrieval index (searched by text)")
    ix.add_argument("--model", default=DEFAULT_MODEL, help="embedded, a local HF CLIP dir or a hub id")
    ix.add_argument("--tgem", default="embedded:retrieval",
                    help="retrieval maps + scorer: embedded:retrieval, or a dir from `tgems index-fit` for "
                         "another model")
    ix.add_argument("--data", required=True, help="the images to index: folder:DIR (any layout), "
                                                  "webdataset:PATTERN, parquet:PATH or a dataset spec")
    ix.add_argument("--out", required=True, help="index directory (written atomically)")
    ix.add_argument("--n", type=_positive_int, help="index the first N images")
    goal(ix)
    ix.add_argument("--rank", type=_positive_int, default=1,
                    help="--max-drop: full CLIP's best reference text must stay in the index's top RANK (default 1)")
    ix.add_argument("--calib", help="calibration data spec (default: a random subset of --data; no labels used)")
    ix.add_argument("--n-calib", type=_positive_int, default=2000)
    ix.add_argument("--workers", type=int, help="image decoding processes for folder, webdataset and parquet input "
                                                "(default: as streamed jobs; 0: decode in a thread)")
    placement(ix)
    common(ix)
    ix.set_defaults(func=cmd_index)

    ixf = sub.add_parser("index-fit", help="fit retrieval maps + scorer for a model (what `tgems index --tgem` takes)")
    ixf.add_argument("--model", required=True, help="a local HF CLIP/SigLIP dir or a hub id (embedded has its maps)")
    ixf.add_argument("--data", required=True, help="training images: a dataset spec, folder:DIR (any layout), "
                                                   "webdataset:PATTERN or parquet:PATH; no labels used")
    ixf.add_argument("--out", required=True, help="directory of the maps (written atomically)")
    ixf.add_argument("--n", type=_positive_int, help="a seeded random sample of N images")
    ixf.add_argument("--epochs", type=_positive_int,
                     help="training epochs of the maps (default: tgems.training.index_fit.IndexFitSettings')")
    placement(ixf)
    common(ixf)
    ixf.set_defaults(func=cmd_index_fit)

    se = sub.add_parser("search", help="top-k images of an index for a text (or --image)")
    se.add_argument("--index", required=True, help="index directory written by `tgems index`")
    se.add_argument("query", nargs="?", help='the text, e.g. "a small red star near the top left"')
    se.add_argument("--image", help="search by this image file instead (image-to-image)")
    se.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    se.add_argument("--model", help="backbone (default: the one the index was built with)")
    placement(se)
    common(se)
    se.set_defaults(func=cmd_search)

    from tgems.serve.models import SCHEDULERS, ServeSettings

    sd = ServeSettings()
    sv = sub.add_parser("serve", help="HTTP service: classify and embed images with early exit (tgems[serve])")
    sv.add_argument("--classifier", action="append", metavar="[NAME=]DIR",
                    help="a saved classifier (tgems calibrate); repeat with NAME=DIR to serve several")
    sv.add_argument("--tgem", default=sd.tgem, help="T-GEM checkpoint that gives other label sets their profiles "
                    "(default: the shipped one on the embedded model, else only the saved labels)")
    sv.add_argument("--host", default=sd.host, help=f"default {sd.host} (loopback only)")
    sv.add_argument("--port", type=int, default=sd.port)
    sv.add_argument("--max-batch-size", type=_positive_int, default=sd.max_batch_size,
                    help="rows per block step (default %(default)s)")
    sv.add_argument("--max-wait-ms", type=float, default=sd.max_wait_ms,
                    help="longest a partial batch waits for more rows (default %(default)s)")
    sv.add_argument("--max-inflight", type=_positive_int, default=sd.max_inflight,
                    help="rows past layer 0 at once (default: max batch size x layers)")
    sv.add_argument("--queue-size", type=_positive_int, default=sd.queue_size,
                    help="images waiting to enter; more are refused with 429 (default %(default)s)")
    sv.add_argument("--max-client-batch", type=_positive_int, default=sd.max_client_batch,
                    help="images in one request; more are refused with 413 (default %(default)s)")
    sv.add_argument("--max-body-mb", type=_positive_float("max-body-mb"), default=sd.max_body_mb,
                    help="largest request body in MB; a larger one is refused with 413 (default %(default)s)")
    sv.add_argument("--scheduler", choices=SCHEDULERS, default=sd.scheduler,
                    help="depth: depth queues, every block on a full batch (default); drop: exit-and-drop "
                    "micro-batches, for comparison")
    sv.add_argument("--audit-rate", type=_unit_interval("audit-rate"), default=sd.audit_rate,
                    help="fraction of early exits also run to full depth to check the guarantee live (seeded)")
    sv.add_argument("--engine", default=sd.engine, choices=ENGINES,
                    help="local (default) or ray: replicas on Ray Serve (the cluster at RAY_ADDRESS, else a local Ray)")
    sv.add_argument("--replicas", type=_positive_int, help=f"--engine ray: replicas (default {sd.replicas})")
    sv.add_argument("--replica-cpus", type=float, help="--engine ray: CPUs per replica (default: an equal share)")
    sv.add_argument("--quiet", action="store_true")
    sv.add_argument("--seed", type=_seed_value, default=sd.seed)
    placement(sv)
    sv.set_defaults(func=cmd_serve)
    return p


def _quiet_libraries():
    """transformers' weight-loading bars and torchvision notices are noise for tgems users."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@contextlib.contextmanager
def _warnings_as_lines():
    """tgems' own warnings (unknown label words, look-alike labels) as one `tgems: warning:` line each, not
    Python's two-line format; shown even with --quiet, which silences progress, not problems."""
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message) not in seen:  # the same label check runs once per classifier built
            seen.add(str(message))
            print(f"tgems: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        _check_outputs(args)
        _seed(args.seed)
        with _warnings_as_lines():
            return args.func(args)
    except TGEMError as e:
        print(f"tgems: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tgems: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # a bug, not bad input: still one line, the traceback on request
        if os.environ.get("TGEMS_DEBUG"):
            raise
        print(f"tgems: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(set TGEMS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
