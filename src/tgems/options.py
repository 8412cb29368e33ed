"""The shared defaults and the one set of checks every option goes through (specs, the CLI's argparse types,
the library's own arguments). Plain Python, no torch: the CLI parser imports it."""
from __future__ import annotations

import math

from tgems.errors import TGEMError

BATCH_SIZE = 64  # images per encoder batch (jobs, file mode, the service's largest step)
DELTA = 0.1  # confidence parameter of a max-drop guarantee: it holds with probability >= 1 - DELTA
NEVER_EXIT = 2.0  # the largest exit threshold (scores are probabilities): no image exits early
SEED_MAX = 2 ** 32 - 1
DTYPES = ("float32", "float16", "bfloat16")
ENGINES = ("local", "ray")
SPACES = ("cls", "rates")  # the exit modules' feature spaces (tgems.profiles)
RECIPES = ("tgem", "distilled")  # T-GEM profiles alone; mixed with distilled readouts (tgems.readouts)
SCHEDULERS = ("drop", "depth")  # exit-and-drop micro-batches (tgems.scheduling.drop), or depth queues (.depth)


def number(value, what: str, lo: float = -math.inf, hi: float = math.inf, lo_open=True, hi_open=False) -> float:
    """A float in the interval (lo, hi] (open or closed at either end); nan and text are refused."""
    if lo == 0 and hi == math.inf:
        span = "a positive number" if lo_open else "a number >= 0"
    else:
        span = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TGEMError(f"{what} must be {span}, got {value!r}") from None
    ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)  # also refuses nan
    if not ok:
        raise TGEMError(f"{what} must be {span}, got {x}")
    return x


def integer(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool) in lo .. hi (either end open when None)."""
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or (
            hi is not None and value > hi):
        span = "" if lo is None and hi is None else (f" >= {lo}" if hi is None else f" in {lo} .. {hi}")
        raise TGEMError(f"{what} must be an integer{span}, got {value!r}")
    return value


def one_of(value, what: str, choices) -> str:
    if value not in choices:
        raise TGEMError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def device_name(value) -> str:
    if not isinstance(value, str) or not value:
        raise TGEMError(f"device must be a name such as cpu, cuda or cuda:1, got {value!r}")
    return value


def check_labels(labels, least: int = 1) -> list[str]:
    """Class texts: at least `least`, each a non-empty string, no duplicates (as given: no stripping)."""
    labels = list(labels) if labels is not None else []
    if not labels:
        raise TGEMError("the label list is empty")
    if any(not isinstance(t, str) or not t.strip() for t in labels):
        raise TGEMError("every label must be a non-empty string")
    seen = set()
    dups = sorted({t for t in labels if t in seen or seen.add(t)})
    if dups:
        raise TGEMError(f"duplicate labels: {', '.join(dups)}")
    if len(labels) < least:
        raise TGEMError(f"give at least {'two' if least == 2 else least} class texts")
    return labels


def label_list(labels) -> list[str]:
    """Class texts of a predictor (a list, or one comma-separated string), stripped: at least two."""
    if labels is None:
        raise TGEMError("give --labels, --labels-file or --classifier")
    if isinstance(labels, str):
        labels = [t for t in labels.split(",") if t.strip()]
    labels = list(labels)
    check_labels(labels)
    return check_labels([t.strip() for t in labels], least=2)
