"""The live audit of a max-drop guarantee: anytime-valid bounds on the disagreement rate of early exits.

The server checks the audit after every audited exit, so a fixed-n bound (Clopper-Pearson) checked again
and again would cry wolf far more often than delta. Here both bounds are confidence sequences: they hold at
every moment at once, however often they are read.

Betting martingales. To test "the disagreement rate p is at most m", bet a fraction c of the wealth on each
audit coming out as a disagreement: wealth x (1 + c (1 - m) / m) on a disagreement, x (1 - c) on an
agreement. While p <= m this wealth is a nonnegative supermartingale starting at 1, so by Ville's
inequality it ever reaches 1 / delta with probability at most delta. Betting with a mixture of fractions
(`BETS`, equal weights) adapts to how far p lies above m. The wealth depends only on the counts (k
disagreements of n), and for k > 0 it falls as m rises, so the lower bound, the least m whose wealth stays
below 1 / delta, is found by bisection. The upper bound is the mirror image (betting on agreements).

Alarm: the lower bound above max_drop, i.e. evidence of a violation with false-alarm probability at most
delta over the whole run, however long. The upper bound below max_drop confirms the guarantee live."""
from __future__ import annotations

import math
from dataclasses import dataclass

from tgems.options import DELTA

BETS = tuple(2.0 ** -j for j in range(1, 11))  # fractions of wealth bet per audit: 0.5 .. 0.001
_LOG_W = math.log(1.0 / len(BETS))
_BISECT_STEPS = 40


def _logsumexp(terms) -> float:
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def log_wealth_above(k: int, n: int, m: float) -> float:
    """log wealth of the bets against "p <= m" after k disagreements in n audits (0 < m < 1)."""
    return _logsumexp([_LOG_W + k * math.log1p(c * (1 - m) / m) + (n - k) * math.log1p(-c) for c in BETS])


def log_wealth_below(k: int, n: int, m: float) -> float:
    """log wealth of the bets against "p >= m" after k disagreements in n audits (0 < m < 1)."""
    return _logsumexp([_LOG_W + (n - k) * math.log1p(c * m / (1 - m)) + k * math.log1p(-c) for c in BETS])


def lower_bound(k: int, n: int, delta: float) -> float:
    """The least m not rejected at level delta: p >= this at every n at once, w.p. >= 1 - delta."""
    target = math.log(1.0 / delta)
    if k == 0 or log_wealth_above(k, n, 1e-12) < target:
        return 0.0
    lo, hi = 0.0, k / n  # at m = k / n no bet gains: the wealth is below 1 there
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if log_wealth_above(k, n, mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def upper_bound(k: int, n: int, delta: float) -> float:
    """The greatest m not rejected at level delta: p <= this at every n at once, w.p. >= 1 - delta."""
    return 1.0 - lower_bound(n - k, n, delta)


@dataclass
class AuditStats:
    """Live disagreement of audited early exits with the full model, with its anytime-valid (1 - delta)
    lower and upper bounds, against the calibrated max_drop."""

    rate: float = 0.0
    max_drop: float | None = None
    delta: float = DELTA
    n: int = 0
    disagree: int = 0
    exceeded: bool = False

    @property
    def observed(self) -> float | None:
        return self.disagree / self.n if self.n else None

    @property
    def lower(self) -> float | None:
        return lower_bound(self.disagree, self.n, self.delta) if self.n else None

    @property
    def upper(self) -> float | None:
        return upper_bound(self.disagree, self.n, self.delta) if self.n else None

    ucb = upper  # the name of the upper bound before it was anytime-valid

    def evidence(self) -> bool:
        """True while the audits so far reject "disagreement <= max_drop" at level delta."""
        if not self.max_drop or not self.disagree:
            return False
        return log_wealth_above(self.disagree, self.n, self.max_drop) >= math.log(1.0 / self.delta)

    def add(self, disagrees: bool) -> bool:
        """Count one audit; True when the lower bound first passes max_drop (the alarm). `exceeded` then stays
        true: the bounds hold at every moment at once, so evidence seen once stands (the sequential test has
        rejected), even while later agreements pull the current lower bound back under max_drop."""
        self.n += 1
        self.disagree += int(disagrees)
        if self.max_drop is None or self.exceeded or not disagrees:  # the wealth rises on disagreements only
            return False
        self.exceeded = self.evidence()
        return self.exceeded

    def summary(self) -> dict:
        return {"rate": self.rate, "n": self.n, "disagree": self.disagree, "observed": self.observed,
                "lower": self.lower, "upper": self.upper, "delta": self.delta, "max_drop": self.max_drop,
                "exceeded": self.exceeded,
                "confirmed": bool(self.max_drop is not None and self.n and self.upper < self.max_drop)}
