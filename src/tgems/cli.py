"""`tgems` command line: demo, pretrain, fit, eval, classify.

Every failure the user can cause ends in one line on stderr and a non-zero exit; outputs are
written to a temporary name and renamed, so no partial file is ever left behind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tgems import __version__
from tgems.errors import TGEMError

EMBEDDED_TGEM = Path(__file__).parent / "assets" / "embedded_tgem"


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def _budget(value: str) -> float:
    try:
        b = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got '{value}'") from None
    if not 0 < b <= 1:
        raise argparse.ArgumentTypeError(f"budget must lie in (0, 1], got {b}")
    return b


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
        if flag == "out" and p.exists():
            if not p.is_dir():
                raise TGEMError(f"--out {value} exists and is not a directory")
            own = {"fit": ["tgem.json"], "pretrain": ["pretrain.json", "checkpoint/state.json"]}.get(args.command)
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


# ----------------------------------------------------------------------------- table


def format_table(results, num_layers: int) -> str:
    head = f"{'method':<11}{'budget':>7}{'split':>9}{'acc %':>8}{'agree %':>9}{'layers':>8}{'FLOPs':>8}{'img/s':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        budget = "" if r["budget"] is None else f"{r['budget']:.2f}"
        name = r["method"] + (f"@{r['layer']}" if r.get("layer") else "")
        ips = "" if r["images_per_second"] is None else f"{r['images_per_second']:.0f}"
        lines.append(f"{name:<11}{budget:>7}{r['split']:>9}{100 * r['accuracy']:>8.2f}{100 * r['agreement']:>9.2f}"
                     f"{r['mean_layers']:>8.2f}{r['flops_ratio']:>8.3f}{ips:>9}")
    return "\n".join(lines)


def _pick(results, method, budget=None, split="all"):
    for r in results:
        if r["method"] == method and r["split"] == split and (budget is None or r["budget"] == budget):
            return r
    return None


def summary_line(results, budget: float = 0.5) -> str:
    t, f = _pick(results, "tgem_cls", budget), _pick(results, "full")
    if t is None or f is None:
        return "no T-GEM result at that budget"
    speed = ""
    if t["images_per_second"] and f["images_per_second"]:
        speed = f", {t['images_per_second'] / f['images_per_second']:.2f} x measured throughput"
    return (f"T-GEM at budget {budget}: accuracy {100 * t['accuracy']:.2f}% (full {100 * f['accuracy']:.2f}%), "
            f"{1 / t['flops_ratio']:.2f} x fewer encoder FLOPs{speed}")


# ----------------------------------------------------------------------------- commands


def cmd_pretrain(args):
    from tgems.pretrain import pretrain

    info = pretrain(args.out, preset=args.preset, data=args.data, seed=args.seed, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, resume=not args.no_resume, progress=not args.quiet,
                    threads=args.threads, device=args.device, workers=args.workers)
    _log(args)(f"saved {args.out} ({info['train_seconds']:.0f} s, {info['samples_seen']} samples)")
    if args.json:
        write_json(args.json, {k: v for k, v in info.items() if k != "log"} | {"log": info["log"]})
    return 0


def cmd_fit(args):
    from tgems.backbones import load_backbone
    from tgems.data import load_dataset
    from tgems.fit import FitSettings, fit_tgem, save_tgem

    _seed(args.seed)
    log = _log(args)
    bb = load_backbone(args.model)
    data = load_dataset(args.data, n=args.n, seed=args.seed)
    s = FitSettings(space=args.space, layers=args.layers, hidden=args.hidden, epochs=args.epochs,
                    lam=args.lam, r_target=args.r_target, soft_tau=args.soft_tau, jumper_target=args.jumper_target,
                    seed=args.seed)
    t0 = time.time()
    tgem, jumper, info = fit_tgem(bb, data, s, progress=not args.quiet)
    info["fit_seconds"] = round(time.time() - t0, 1)
    save_tgem(args.out, tgem, jumper, bb, info, data_spec=args.data)
    for row in info["per_layer_holdout"]:
        log(f"  layer {row['layer']:>2}: accuracy {100 * row['accuracy']:6.2f}%  agreement {100 * row['agreement']:6.2f}%")
    log(f"saved T-GEM ({args.space}) to {args.out} in {info['fit_seconds']} s")
    if args.json:
        write_json(args.json, {"model": args.model, "data": args.data, "seed": args.seed, **info})
    return 0


def _eval_report(bb, model_name, tgem_dirs, test, calib, train, shots, budgets, seed, progress, speed, log):
    from tgems.evaluate import run_eval

    out = run_eval(bb, tgem_dirs, test, calib, train, shots, budgets, seed=seed, progress=progress, speed=speed,
                   log=log)
    report = {"model": model_name, "data": test.name, "num_layers": bb.num_layers, "seed": seed,
              "budgets": list(budgets), "results": out["results"], "extras": out["extras"]}
    return report, out


def _default_aux(spec: str, n_train: int, seed: int):
    """Calibration / training / shot sets that go with a test spec (scenes has its own splits)."""
    from tgems.data import load_dataset

    if spec.startswith("scenes"):
        return (load_dataset("scenes:calib", seed=seed), load_dataset("scenes:train", n=n_train, seed=seed),
                load_dataset("scenes:shots", seed=seed))
    return None, None, None


def _split_dataset(data, seed: int, frac: float = 0.5):
    import numpy as np

    perm = np.random.default_rng(seed).permutation(len(data))
    n = int(len(data) * frac)
    return data.subset(np.sort(perm[:n])), data.subset(np.sort(perm[n:]))


def cmd_eval(args):
    from tgems.backbones import load_backbone
    from tgems.data import load_dataset
    from tgems.fit import read_tgem_config

    _seed(args.seed)
    log = _log(args)
    for d in args.tgem:
        read_tgem_config(d)
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise TGEMError("--plot must name a .png file")
    bb = load_backbone(args.model)
    test = load_dataset(args.data, n=args.n, seed=args.seed)
    calib, train, shots = _default_aux(args.data, args.n_train, args.seed)
    if args.calib:
        calib = load_dataset(args.calib, seed=args.seed)
    if args.train:
        train = load_dataset(args.train, n=args.n_train, seed=args.seed)
    if args.shots:
        shots = load_dataset(args.shots, seed=args.seed)
    if calib is None:
        if len(test) < 2:
            raise TGEMError(f"{args.data} has {len(test)} image(s): too few to split into calibration and "
                            f"test halves (give --calib SPEC)")
        calib, test = _split_dataset(test, args.seed)
        log("no --calib given: half of the data calibrates, the other half is tested")
    budgets = [0.3, 0.4, 0.5, 0.6, 0.7] if args.sweep or args.budget is None else [args.budget]
    report, _ = _eval_report(bb, args.model, args.tgem, test, calib, train, shots, budgets, args.seed,
                             not args.quiet, not args.no_speed, log)
    print(format_table(report["results"], bb.num_layers))
    print(summary_line(report["results"], 0.5 if 0.5 in budgets else budgets[0]))
    if args.json:
        write_json(args.json, report)
    if args.plot:
        from tgems.plots import tradeoff_plot

        tradeoff_plot(report, args.plot, title=f"{args.model} on {args.data}")
    return 0


def cmd_classify(args):
    from tgems.backbones import load_backbone
    from tgems.classifier import EarlyExitClassifier
    from tgems.data import load_dataset, read_image
    from tgems.fit import read_tgem_config
    from tgems.profiles import check_labels

    if args.labels_file:
        try:
            labels = [ln.strip() for ln in Path(args.labels_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise TGEMError(f"cannot read labels file {args.labels_file}: {e.strerror}") from None
    else:
        labels = [t.strip() for t in (args.labels or "").split(",") if t.strip()]
    labels = check_labels(labels)
    read_tgem_config(args.tgem)
    bb = load_backbone(args.model)
    clf = EarlyExitClassifier(bb, args.tgem, labels)
    if args.budget is not None:
        if not args.calib:
            raise TGEMError("--budget needs --calib SPEC (held-out images to calibrate on)")
        clf.calibrate(load_dataset(args.calib, seed=args.seed), budget=args.budget, use_labels=False)
    elif args.tau is not None:
        clf.tau = args.tau
    images, paths, failed = [], [], 0
    for p in args.images:
        try:
            images.append(read_image(p))
            paths.append(p)
        except TGEMError as e:
            print(f"tgems: skipped: {e}", file=sys.stderr)
            failed += 1
    records = []
    if images:
        pred = clf.predict(images)
        for i, p in enumerate(paths):
            records.append({"path": str(p), "label": pred.labels[i], "probability": round(float(pred.probs[i].max()), 4),
                            "exit_layer": int(pred.exit_layers[i]), "flops_ratio": round(float(pred.flops_ratio[i]), 4)})
    for r in records:
        print(json.dumps(r) if args.jsonl else
              f"{r['path']}\t{r['label']}\t{r['probability']:.3f}\tlayer {r['exit_layer']}/{bb.num_layers}"
              f"\tFLOPs {r['flops_ratio']:.3f}")
    if args.json:
        write_json(args.json, {"model": args.model, "tgem": str(args.tgem), "labels": labels, "tau": clf.tau,
                               "num_layers": bb.num_layers, "results": records, "failed": failed})
    if failed:
        print(f"tgems: error: {failed} of {len(args.images)} images could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args):
    from tgems.backbones import load_backbone
    from tgems.data import load_dataset
    from tgems.evaluate import guarantee_pool, guarantee_study
    from tgems.fit import FitSettings, fit_tgem, save_tgem
    from tgems.plots import tradeoff_plot

    t0 = time.time()
    seed = args.seed
    _seed(seed)
    log = _log(args)
    out = Path(args.out)
    bb = load_backbone("embedded")
    log(f"model: embedded default ({bb.num_layers} blocks, width {bb.width}, {bb.image_size}px)")
    dirs = []
    for space in ("cls", "rates"):
        d = EMBEDDED_TGEM / space
        if not (d / "tgem.json").exists():
            d = out / f"tgem_{space}"
            log(f"no shipped T-GEM ({space}) found: fitting one quickly into {d}")
            data = load_dataset("scenes:train", n=6000, seed=seed)
            tgem, jumper, info = fit_tgem(bb, data, FitSettings(space=space, epochs=15, seed=seed),
                                          progress=not args.quiet)
            save_tgem(d, tgem, jumper, bb, info, "scenes:train:6000")
        dirs.append(d)
    n = args.n
    test = load_dataset("scenes:testall", n=n, seed=seed)
    calib, train, shots = _default_aux("scenes:test", 4000, seed)
    budgets = [0.3, 0.4, 0.5, 0.6, 0.7]
    report, raw = _eval_report(bb, "embedded", dirs, test, calib, train, shots, budgets, seed,
                               not args.quiet, not args.no_speed, log)
    ref = raw["classifiers"]["tgem_cls"]
    if n is None:  # as benchmarks/guarantee.py
        log("max-drop guarantee: 20 draws of 2,900 calibration / 20,000 test images, eps 0.01, delta 0.1")
        pool = guarantee_pool(bb, 2900, 20000, seed, progress=not args.quiet)
        frac = 2900 / len(pool)
    else:
        from tgems.features import LayerFeatures
        import torch

        log("max-drop guarantee: 20 calibration/test half-splits of the demo's images, eps 0.01, delta 0.1")
        ft, fc = raw["features"]["test"], raw["features"]["calib"]
        pool = LayerFeatures(torch.cat([fc.z, ft.z]), None, torch.cat([fc.labels, ft.labels]))
        frac = 0.5
    g = guarantee_study(ref, pool, eps=0.01, delta=0.1, n_splits=20, seed=seed, calib_fraction=frac)
    report["guarantee"] = g
    report["data"] = "scenes:testall"
    report["tgem"] = [str(d) for d in dirs]
    report["seconds"] = round(time.time() - t0, 1)
    print(format_table(report["results"], bb.num_layers))
    print(f"max_drop guarantee (eps {g['eps']}, delta {g['delta']}): disagreement <= eps on "
          f"{g['held']}/{g['n_splits']} draws of {g['n_calib']} calibration images "
          f"(test parts of {g['n_test']}), mean {g['mean_test_layers']:.2f} layers")
    write_json(out / "results.json", report)
    tradeoff_plot(report, out / "tradeoff.png", title="T-GEMs on the embedded default (scenes:testall)")
    log(f"wrote {out / 'results.json'} and {out / 'tradeoff.png'} in {report['seconds']:.0f} s")
    print(summary_line(report["results"], 0.5))
    if args.json:
        write_json(args.json, report)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tgems", description="Text-Guided Exit Modules for CLIP image encoders")
    p.add_argument("--version", action="version", version=f"tgems {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp, json_help="write the figures as JSON"):
        sp.add_argument("--json", metavar="PATH", help=json_help)
        sp.add_argument("--quiet", action="store_true", help="no progress bars or logs")
        sp.add_argument("--seed", type=_seed_value, default=0)

    d = sub.add_parser("demo", help="the whole story on the embedded default, offline")
    d.add_argument("--out", default="results/demo")
    d.add_argument("--n", type=_positive_int, default=None, help="number of test images (default: the whole split)")
    d.add_argument("--no-speed", action="store_true", help="skip throughput measurements")
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
    pt.add_argument("--no-resume", action="store_true")
    common(pt)
    pt.set_defaults(func=cmd_pretrain)

    f = sub.add_parser("fit", help="train T-GEMs and the Jumper for a backbone on a dataset")
    f.add_argument("--model", default="embedded")
    f.add_argument("--data", default="scenes:train")
    f.add_argument("--out", required=True)
    f.add_argument("--n", type=_positive_int, help="use the first N images")
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
    common(f)
    f.set_defaults(func=cmd_fit)

    e = sub.add_parser("eval", help="accuracy and compute of every method at a budget or a sweep")
    e.add_argument("--model", default="embedded")
    e.add_argument("--tgem", action="append", required=True, help="T-GEM checkpoint (repeat for cls and rates)")
    e.add_argument("--data", required=True)
    e.add_argument("--n", type=_positive_int, help="use N test images")
    e.add_argument("--calib", help="calibration data spec (default: scenes:calib for scenes, else half the data)")
    e.add_argument("--train", help="training data for the probe baseline")
    e.add_argument("--n-train", type=_positive_int, default=4000)
    e.add_argument("--shots", help="images for the k-shot baseline")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--budget", type=_budget)
    g.add_argument("--sweep", action="store_true", help="budgets 0.3 .. 0.7 (the default)")
    e.add_argument("--plot", metavar="PNG")
    e.add_argument("--no-speed", action="store_true")
    common(e)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("classify", help="label image files with early exit")
    c.add_argument("--model", default="embedded")
    c.add_argument("--tgem", default=str(EMBEDDED_TGEM / "cls"))
    lg = c.add_mutually_exclusive_group(required=True)
    lg.add_argument("--labels", help='comma-separated class texts, e.g. "a red circle,a blue star"')
    lg.add_argument("--labels-file", help="one class text per line")
    c.add_argument("--budget", type=_budget, help="calibrate for this budget on --calib")
    c.add_argument("--calib")
    c.add_argument("--tau", type=float, help="exit threshold (default: the checkpoint's)")
    c.add_argument("--jsonl", action="store_true", help="one JSON record per line")
    c.add_argument("images", nargs="+")
    common(c)
    c.set_defaults(func=cmd_classify)
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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        _check_outputs(args)
        return args.func(args)
    except TGEMError as e:
        print(f"tgems: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tgems: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line, the traceback on request
        if os.environ.get("TGEMS_DEBUG"):
            raise
        print(f"tgems: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(set TGEMS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
