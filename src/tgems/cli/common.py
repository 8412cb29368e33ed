"""What every command shares: argparse types (the checks of `tgems.options`), the one-line parser, the common
options, logging, the output checks made before any work, and the degenerate-result exit."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from tgems.errors import TGEMError
from tgems.options import DTYPES, NEVER_EXIT, SEED_MAX, integer, number
from tgems.spec import DEFAULT_MODEL, DEFAULT_TGEM, default


def typed(convert, check):
    """An argparse type: the text converted (int or float), then checked by `tgems.options`, in one line."""
    def parse(value: str):
        try:
            x = convert(value)
        except ValueError:
            x = value  # the check below says what was expected
        try:
            return check(x)
        except TGEMError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


int_arg = typed(int, lambda x: integer(x, "the value"))
positive_int = typed(int, lambda x: integer(x, "the value", 1))
seed_value = typed(int, lambda x: integer(x, "seed", 0, SEED_MAX))
budget_arg = typed(float, lambda x: number(x, "budget", 0, 1))
tau_arg = typed(float, lambda x: number(x, f"tau ({NEVER_EXIT:g} never exits early)", 0, NEVER_EXIT, lo_open=False))


def fraction(what):
    return typed(float, lambda x: number(x, what, 0, 1, hi_open=True))


def positive_float(what):
    return typed(float, lambda x: number(x, what, 0, math.inf, hi_open=True))


def unit_interval(what):
    return typed(float, lambda x: number(x, what, 0, 1, lo_open=False))


def layer_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got '{value}'") from None


def logger(args):
    return (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


def show_progress(args) -> bool:
    return not args.quiet


def seed_all(seed: int):
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def check_outputs(args) -> None:
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


DEGENERATE_EXIT = 4  # the command ran and wrote its record, but its result is degenerate (docs/design.md)


def degenerate_exit(args, warnings) -> int:
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


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other tgems error (argparse prints the usage block first); no
    abbreviated options: `--n 3` is not read as `--num-gpus 3` (subcommand parsers are made of this class too)."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"tgems: error: {message} (see `{self.prog} --help`)\n")


def common(sp, json_help="write the figures as JSON"):
    sp.add_argument("--json", metavar="PATH", help=json_help)
    sp.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    sp.add_argument("--seed", type=seed_value, default=0)

def placement(sp):
    sp.add_argument("--device", default=default("device"), help="cpu, cuda or cuda:N (default: cpu)")
    sp.add_argument("--dtype", default=default("dtype"), choices=DTYPES)

def goal(sp, required=False):
    g = sp.add_mutually_exclusive_group(required=required)
    g.add_argument("--budget", type=budget_arg, help="calibrate for this compute budget (mean layers / L) on --calib")
    g.add_argument("--max-drop", type=fraction("max-drop"),
                   help="calibrate for at most this disagreement with the full model, w.p. >= 1 - delta")
    sp.add_argument("--delta", type=fraction("delta"), default=default("delta"),
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
