"""`tgems` command line: argparse built from the specs, one module per command group (`study`: demo, pretrain,
fit, eval; `predict`: calibrate, classify, embed, vocab; `retrieval`: index, index-fit, search; `serve`), each
command building its spec and making one library call.

Every failure the user can cause ends in one line on stderr and a non-zero exit; outputs are
written to a temporary name and renamed, so no partial file is ever left behind.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from tgems import __version__
from tgems.cli import predict, retrieval, serve, study
from tgems.cli.common import check_outputs, Parser, seed_all
from tgems.cli.predict import specs_from_args
from tgems.errors import TGEMError
from tgems.io import is_disk_full


__all__ = ["main", "build_parser", "specs_from_args"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tgems", description="Text-Guided Exit Modules for CLIP image encoders")
    p.add_argument("--version", action="version", version=f"tgems {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in (study, predict, retrieval, serve):
        group.add_parsers(sub)
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
        check_outputs(args)
        seed_all(args.seed)
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
    except OSError as e:
        if not is_disk_full(e):
            return _internal_error(e)
        where = getattr(e, "filename", None) or getattr(args, "out", None) or getattr(args, "json", None)
        print(f"tgems: error: no space left on the device{f' writing {where}' if where else ''}; what was "
              f"finished is kept whole (written under temporary names, then renamed): free space and rerun the "
              f"same command", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not bad input: still one line, the traceback on request
        return _internal_error(e)


def _internal_error(e: BaseException) -> int:
    if os.environ.get("TGEMS_DEBUG"):
        raise e
    print(f"tgems: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
          f"(set TGEMS_DEBUG=1 for the traceback)", file=sys.stderr)
    return 3

