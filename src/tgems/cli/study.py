"""The study commands: `demo`, `pretrain`, `fit` and `eval` (the method's training and its measurements)."""
from __future__ import annotations

import argparse

from tgems.cli.common import (DEGENERATE_EXIT, common, degenerate_exit, goal, layer_list, logger, placement,
                              positive_int, show_progress)
from tgems.io import write_json
from tgems.options import RECIPES, SPACES
from tgems.spec import DEFAULT_MODEL
from tgems.training.settings import FIT_WORKERS, JUMPER_TARGETS, FitSettings, cli_fields, option


def _budgets(args):
    from tgems.evaluation.harness import DEFAULT_BUDGETS

    if args.max_drop is not None:
        return []
    return [args.budget] if args.budget is not None else list(DEFAULT_BUDGETS)


def cmd_pretrain(args):
    from tgems.training.pretrain import pretrain

    info = pretrain(args.out, preset=args.preset, data=args.data, seed=args.seed, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, resume=not args.no_resume, progress=show_progress(args),
                    threads=args.threads, device=args.device, workers=args.workers,
                    eval_every=args.eval_every)
    logger(args)(f"saved {args.out} ({info['train_seconds']:.0f} s, {info['samples_seen']} samples)")
    if args.json:
        write_json(args.json, info)
    return 0


def cmd_fit(args):
    from tgems.training.fit import fit_and_save

    log = logger(args)
    s = FitSettings(**{k: getattr(args, k) for k in cli_fields(FitSettings)}, seed=args.seed)
    info = fit_and_save(args.model, args.data, args.out, s, n=args.n, device=args.device, dtype=args.dtype,
                        progress=show_progress(args), cache=args.cache, max_images=args.max_images, workers=args.workers,
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
                      speed=not args.no_speed, progress=show_progress(args), device=args.device, dtype=args.dtype,
                      max_drop=args.max_drop, delta=args.delta, log=logger(args))
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
    return degenerate_exit(args, report.get("warnings"))


def cmd_demo(args):
    from tgems.evaluation.demo import run_demo
    from tgems.evaluation.report import format_table, guarantee_line, retrieval_line, summary_line

    report = run_demo(args.model, args.tgem or None, args.out, n=args.n, speed=not args.no_speed, seed=args.seed,
                      progress=show_progress(args), device=args.device, dtype=args.dtype, log=logger(args))
    print(format_table(report["results"], report["num_layers"]))
    print(guarantee_line(report["guarantee"]))
    if "retrieval" in report:
        print(retrieval_line(report["retrieval"]))
    print(summary_line(report["results"], 0.5, report.get("warnings")))
    if args.json:
        write_json(args.json, report)
    return 0


def add_parsers(sub):
    d = sub.add_parser("demo", help="the whole story on the embedded default, offline")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--tgem", action="append", help="T-GEM checkpoints (default: embedded:cls and embedded:rates)")
    d.add_argument("--out", default="results/demo")
    d.add_argument("--n", type=positive_int, default=None, help="number of test images (default: the whole split)")
    d.add_argument("--no-speed", action="store_true", help="skip throughput measurements")
    placement(d)
    common(d)
    d.set_defaults(func=cmd_demo)

    pt = sub.add_parser("pretrain", help="train a small CLIP (the embedded default is --preset embedded)")
    pt.add_argument("--preset", default="embedded")
    pt.add_argument("--data", default="scenes:train")
    pt.add_argument("--out", required=True)
    pt.add_argument("--steps", type=positive_int)
    pt.add_argument("--batch-size", type=positive_int)
    pt.add_argument("--lr", type=float)
    pt.add_argument("--threads", type=positive_int)
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
    f.add_argument("--n", type=positive_int, help="use the first N images (built-in datasets)")
    f.add_argument("--cache", metavar="DIR",
                   help="streamed data: keep the feature cache here, resume or reuse it (default: a temporary "
                        "one, removed at the end)")
    f.add_argument("--max-images", type=positive_int, help="streamed data: use the first N usable images")
    f.add_argument("--workers", type=int, default=None,
                   help=f"streamed data: processes that decode images ahead of the encoder (default: {FIT_WORKERS}; 0 = inline)")
    def fit_option(name, *flag, **kw):  # default and help: FitSettings'
        f.add_argument(*(flag or ["--" + name.replace("_", "-")]), dest=name, **option(FitSettings, name), **kw)

    fit_option("space", choices=SPACES)
    fit_option("layers", type=layer_list)
    fit_option("hidden", type=positive_int)
    fit_option("epochs", type=positive_int)
    fit_option("lam", type=float)
    fit_option("r_target", type=float)
    fit_option("soft_tau", type=float)
    fit_option("jumper_target", choices=JUMPER_TARGETS)
    fit_option("jumper_max", type=positive_int)
    fit_option("cross_fit", "--no-cross-fit", action="store_false")
    fit_option("recipe", choices=RECIPES)
    fit_option("readout_mix", "--no-readout-mix", action="store_false")
    fit_option("readout_patch", "--no-readout-patch", action="store_false")
    fit_option("trajectory", action=argparse.BooleanOptionalAction)
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
    e.add_argument("--n", type=positive_int, help="use N test images")
    e.add_argument("--calib", help="calibration data spec (default: scenes:calib for scenes, else half the data)")
    e.add_argument("--train", help="training data for the probe baseline")
    e.add_argument("--n-train", type=positive_int, default=4000)
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
