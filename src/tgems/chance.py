"""Is the full model's accuracy on labelled images at or near chance? Then the labels do not describe the
images for this model (wrong label texts, labels in another language than the model reads, images the model
was not trained for), and every figure computed from them — exits, budgets, agreement — measures nothing.

The test, used by `tgems fit`, `calibrate` with labels and `tgems eval`: with n images, k of them right and
C classes, chance is 1 / C and "near chance" is p0 = 1/C + NEAR_CHANCE_MARGIN * (1 - 1/C) (5 % of the way
from chance to perfect: 14.5 % for 10 classes, 52.5 % for 2). The result is degenerate unless an exact
one-sided binomial test rejects "accuracy <= p0" at level ALPHA, i.e. unless P(X >= k | n, p0) < ALPHA.
The test is exact (no sampling, so no seed). On very few images it cannot reject p0 even for a good model:
then the result is flagged too, which is what a handful of images deserves.
"""
from __future__ import annotations

import warnings

from tgems.calibration import binom_cdf

ALPHA = 0.05
NEAR_CHANCE_MARGIN = 0.05


class NearChanceWarning(UserWarning):
    """The full model's accuracy on labelled images is not clearly above chance."""


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), from the exact cdf of `tgems.calibration`."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return max(0.0, 1.0 - binom_cdf(k - 1, n, p))


def chance_check(correct: int, n: int, num_classes: int, alpha: float = ALPHA,
                 margin: float = NEAR_CHANCE_MARGIN) -> dict:
    """The test above on k = `correct` of `n` images: accuracy, chance, the near-chance level, p-value, verdict."""
    correct, n, num_classes = int(correct), int(n), int(num_classes)
    chance = 1.0 / max(1, num_classes)
    level = chance + margin * (1.0 - chance)
    p_value = binomial_tail(correct, n, level) if n > 0 else 1.0
    return {"accuracy": round(correct / n, 5) if n else None, "n": n, "num_classes": num_classes,
            "chance": round(chance, 5), "near_chance": round(level, 5), "p_value": round(p_value, 6),
            "alpha": alpha, "degenerate": bool(p_value >= alpha)}


def chance_message(check: dict, what: str = "full-model accuracy") -> str:
    """One line for a degenerate check: the figures and what they mean."""
    return (f"{what} {100 * check['accuracy']:.1f}% on {check['n']} labelled images is not clearly above chance "
            f"({100 * check['chance']:.1f}% for {check['num_classes']} classes; binomial p = {check['p_value']:.3g} "
            f"against {100 * check['near_chance']:.1f}%): the labels do not describe these images for this model, "
            f"so early exits and their figures measure nothing")


def warn_if_near_chance(check: dict, what: str = "full-model accuracy") -> None:
    if check["degenerate"]:
        warnings.warn(chance_message(check, what), NearChanceWarning, stacklevel=3)
