"""Threshold calibration (tgems.calibration): first exits and simulation by hand, the threshold grid, the
budget rule, the binomial tail and Clopper-Pearson bound (cross-checked with scipy), Learn-then-Test for
max_drop and its guarantee over calibration draws."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from tgem_helpers import L, bb, make_classifier, synthetic_exits  # noqa: F401 (fixtures)
from tgems.calibration import (binom_cdf, calibrate_budget, calibrate_max_drop, clopper_pearson_upper, first_exit,
                               simulate, tau_grid)
from tgems.data import scenes


def test_first_exit_and_simulate_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.1],
                           [0.1, 0.8, 0.1],
                           [0.1, 0.1, 0.1],
                           [0.5, 0.5, 0.95],
                           [0.2, 0.6, 0.7]])
    layer_preds = torch.tensor([[10, 11, 12, 13],
                                [20, 21, 22, 23],
                                [30, 31, 32, 33],
                                [40, 41, 42, 43],
                                [50, 51, 52, 53]])
    layers = [2, 4, 6, 8]
    assert first_exit(scores, 0.5).tolist() == [0, 1, 3, 0, 1]
    assert first_exit(scores, 0.85).tolist() == [0, 3, 3, 2, 3]
    assert first_exit(scores, 2.0).tolist() == [3] * 5
    assert first_exit(scores, 0.0).tolist() == [0] * 5
    preds, depth = simulate(scores, layer_preds, layers, 0.5)
    assert preds.tolist() == [10, 21, 33, 40, 51]
    assert depth.tolist() == [2, 4, 8, 2, 4]
    preds, depth = simulate(scores, layer_preds, layers, 0.7)
    assert preds.tolist() == [10, 21, 33, 42, 52]
    assert depth.tolist() == [2, 4, 8, 6, 6]


def test_tau_grid_order_and_thresholds_between_scores():
    scores, _ = synthetic_exits(300, 0)
    grid = tau_grid(scores, size=50)
    assert grid[0] == 2.0 and grid[-1] == 0.0
    assert np.all(np.diff(grid) < 0)
    assert len(grid) <= 52
    # no threshold sits on a score: an exit then never hinges on the last bit of a float
    assert not np.isin(grid.astype(np.float32), scores.numpy()).any()
    layer_preds = synthetic_exits(300, 0)[1]
    depths = [simulate(scores, layer_preds, [1, 2, 3, 4], float(t))[1].float().mean() for t in grid]
    assert all(a >= b for a, b in zip(depths, depths[1:]))  # lower tau, earlier exits


def _budget_cases(bb, fitted, test_feats, L):
    clf = make_classifier(bb, fitted, "cls", scenes.CLASSES)
    scores, preds = clf.layer_predictions(test_feats)
    s2, p2 = synthetic_exits(500, 1, n_cand=5)
    return [(scores, preds, clf.profiles.layers + [L], L, test_feats.labels),
            (s2, p2, [1, 2, 3, 4, 5, 6], 6, torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(2)))]


def test_calibrate_budget_respects_budget_and_grows_with_it(bb, L, fitted, test_feats):
    for scores, preds, layers, num_layers, labels in _budget_cases(bb, fitted, test_feats, L):
        sims = [simulate(scores, preds, layers, float(t)) for t in tau_grid(scores)]
        for target in (None, labels):
            ref = preds[:, -1] if target is None else target
            depths = []
            for budget in (layers[0] / num_layers, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0):
                tau = calibrate_budget(scores, preds, layers, num_layers, budget, target)
                p, d = simulate(scores, preds, layers, tau)
                mean = d.float().mean().item()
                assert mean / num_layers <= budget + 1e-9, (budget, tau, mean)
                # the best accuracy (agreement without labels) among the grid's thresholds within the budget
                best = max((q == ref).float().mean().item() for q, dq in sims
                           if dq.float().mean().item() / num_layers <= budget + 1e-9)
                assert (p == ref).float().mean().item() == pytest.approx(best)
                depths.append(mean)
            assert all(a <= b + 1e-12 for a, b in zip(depths, depths[1:])), depths
            assert depths[-1] > depths[0]


def test_binom_cdf_matches_direct_sum():
    for n in (1, 7, 30, 200):
        for p in (0.001, 0.05, 0.3, 0.5, 0.9):
            for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
                direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
                assert binom_cdf(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-300)
    assert binom_cdf(0, 10, 0.0) == 1.0
    assert binom_cdf(9, 10, 1.0) == 0.0 and binom_cdf(10, 10, 1.0) == 1.0


def test_clopper_pearson_upper_known_values():
    for n in (1, 5, 20, 100, 1000):
        for delta in (0.01, 0.05, 0.1, 0.2):
            assert clopper_pearson_upper(0, n, delta) == pytest.approx(1 - delta ** (1 / n), rel=1e-10, abs=1e-14)
    assert clopper_pearson_upper(10, 10, 0.1) == 1.0
    ucbs = [clopper_pearson_upper(k, 50, 0.1) for k in range(51)]
    assert all(a < b for a, b in zip(ucbs, ucbs[1:-1]))
    assert all(u >= k / 50 for k, u in enumerate(ucbs))
    for k, n in ((1, 10), (3, 50), (9, 10), (10, 100), (57, 1000), (0, 400)):
        for delta in (0.05, 0.1):
            ref = stats.beta.ppf(1 - delta, k + 1, n - k)
            assert clopper_pearson_upper(k, n, delta) == pytest.approx(ref, rel=1e-7, abs=1e-12), (k, n, delta)


def test_calibrate_max_drop_keeps_the_bound_and_stops_at_the_first_failure():
    layers = [1, 2, 3, 4]
    scores, preds = synthetic_exits(1000, 3)
    full = preds[:, -1]
    n, delta = len(full), 0.1
    for eps in (0.02, 0.05, 0.1):
        tau, info = calibrate_max_drop(scores, preds, layers, eps, delta)
        p, d = simulate(scores, preds, layers, tau)
        k = int((p != full).sum())
        assert info["n"] == n and info["disagree"] == k
        assert info["ucb"] == pytest.approx(clopper_pearson_upper(k, n, delta))
        assert clopper_pearson_upper(k, n, delta) <= eps
        assert tau < 2.0 and d.float().mean() < 4  # something exits early
        grid = list(tau_grid(scores))
        nxt = grid[grid.index(tau) + 1]  # fixed sequence: the next, more aggressive threshold fails
        k2 = int((simulate(scores, preds, layers, float(nxt))[0] != full).sum())
        assert clopper_pearson_upper(k2, n, delta) > eps
    # eps below what n samples can ever certify (even 0 disagreements): never exit
    small_s, small_p = synthetic_exits(20, 4)
    tau, info = calibrate_max_drop(small_s, small_p, layers, 0.01, 0.1)
    assert tau == 2.0 and info["disagree"] == 0
    assert simulate(small_s, small_p, layers, tau)[1].tolist() == [4] * 20


def test_max_drop_guarantee_holds_over_calibration_draws():
    """P(disagreement of the calibrated tau > eps) <= delta over calibration draws; the population
    disagreement is measured on 100k fresh samples. A naive rule (empirical disagreement <= eps)
    breaks the bound about half of the time on the same draws, so the check has teeth."""
    layers, eps, delta, draws = [1, 2, 3, 4], 0.05, 0.1, 40
    pop_s, pop_p = synthetic_exits(100_000, 0)

    def risk(tau):
        p, _ = simulate(pop_s, pop_p, layers, tau)
        return (p != pop_p[:, -1]).float().mean().item()

    broken = naive_broken = 0
    for i in range(draws):
        s, p = synthetic_exits(500, 1000 + i)
        tau, _ = calibrate_max_drop(s, p, layers, eps, delta)
        broken += risk(tau) > eps
        naive = 2.0
        for t in tau_grid(s):
            if (simulate(s, p, layers, float(t))[0] != p[:, -1]).float().mean() > eps:
                break
            naive = float(t)
        naive_broken += risk(naive) > eps
    assert broken <= (delta + 0.1) * draws, broken
    assert naive_broken >= 0.3 * draws and naive_broken > broken, (naive_broken, broken)

