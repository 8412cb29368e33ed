"""The k-shot path repeats exactly (issue 30.11): the Jumper's logistic fit gives the same weights for any
thread count, and the tau grid (so the calibrated tau and every exit) ignores last-bit noise in the scores,
as another machine's summation order makes it."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch

import tgems
from tgem_helpers import synthetic_exits
from tgems.calibration import calibrate_budget, calibrate_max_drop, simulate, tau_grid
from tgems.features import extract_features
from tgems.training.jumper_fit import fit_logistic, from_samples


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _with_threads(n, fn):
    torch.set_num_threads(n)
    return fn()


def test_logistic_fit_is_the_same_for_any_thread_count(threads):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 11, 40, generator=g)
    y = (x[..., 0] + 0.5 * torch.randn(4000, 11, generator=g) > 0).float()
    one, two = (_with_threads(n, lambda: fit_logistic(x, y, standardize=True)) for n in (1, 2))
    assert torch.equal(one.weight, two.weight) and torch.equal(one.bias, two.bias)
    assert torch.get_num_threads() == 2  # the caller's setting is left as it was
    assert (one.scores(x)[:, 0] > 0.5).eq(y[:, 0] > 0).float().mean() > 0.7  # and it is a fit


def _ulp_noise(scores, seed):
    """Each score moved up or down by one float32 step, or left: ties break (and neighbours tie)."""
    rng = np.random.default_rng(seed)
    s = scores.numpy()
    step = rng.integers(-1, 2, s.shape)
    return torch.from_numpy(np.where(step > 0, np.nextafter(s, np.float32(2)),
                                     np.where(step < 0, np.nextafter(s, np.float32(-1)), s)))


def test_tau_grid_and_calibration_ignore_last_bit_noise():
    scores, preds = synthetic_exits(3000, 0, n_cand=5)
    scores = torch.where(scores > 0.9, torch.ones_like(scores), scores)  # saturated scores tie, as sigmoids do
    coarse = (scores[:1500] * 1e3).round() / 1e3  # and many more ties: noise breaks them
    scores = torch.cat([coarse, scores[1500:]])
    labels = torch.randint(0, 10, (3000,), generator=torch.Generator().manual_seed(1))
    layers = [1, 2, 3, 4, 5, 6]
    grid = tau_grid(scores)
    exits = [simulate(scores, preds, layers, float(t))[1] for t in grid]
    for seed in range(3):
        noisy = _ulp_noise(scores, seed)
        assert len(np.unique(noisy.numpy())) > len(np.unique(scores.numpy())) + 500
        moved = tau_grid(noisy)
        assert len(moved) == len(grid) and np.abs(moved - grid).max() < 1e-6  # the same thresholds, to the noise
        assert all(torch.equal(simulate(noisy, preds, layers, float(t))[1], e) for t, e in zip(moved, exits))
        for budget in (0.3, 0.5, 0.7):
            assert calibrate_budget(noisy, preds, layers, 6, budget, labels) == pytest.approx(
                calibrate_budget(scores, preds, layers, 6, budget, labels), abs=1e-6)
    tau, info = calibrate_max_drop(noisy, preds, layers, 0.05, 0.1)
    tau0, info0 = calibrate_max_drop(scores, preds, layers, 0.05, 0.1)
    assert tau == pytest.approx(tau0, abs=1e-6) and info == info0 and 0 < tau < 2
    # every threshold keeps several float32 steps from every score
    s32 = np.unique(scores.numpy())
    inner = grid[(grid > 0) & (grid < 2)].astype(np.float32)
    assert (np.abs(s32[None, :] - inner[:, None]).min(1) >= 4 * np.spacing(inner)).all()


@pytest.fixture(scope="module")
def kshot():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = tgems.load_backbone("embedded")
        shots = tgems.load_dataset("scenes:shots:128", seed=0)
        fs = extract_features(bb, shots, progress=False)
        fc = extract_features(bb, tgems.load_dataset("scenes:calib:200", seed=0), progress=False)
        ftr = extract_features(bb, tgems.load_dataset("scenes:train:250", seed=0), progress=False)
    # 4,000 Jumper rows (the demo's size, where float32 fits split by thread count): the 250 images
    # repeated with seeded noise of a few float32 steps
    g = torch.Generator().manual_seed(3)
    z = ftr.z.repeat(16, 1, 1)
    z = z * (1 + 1e-6 * torch.randn(z.shape, generator=g))
    jumper_feats = dataclasses.replace(ftr, z=z, labels=ftr.labels.repeat(16), difficulty=None,
                                       patch=ftr.patch.repeat(16, 1, 1))
    return bb, shots, fs, fc, jumper_feats


def test_k_shot_profiles_and_calibration_repeat_for_any_thread_count(kshot, threads):
    bb, shots, fs, fc, jf = kshot

    def run():
        c = from_samples(bb, shots, k=16, feats=fs, jumper_feats=jf)
        cals = [c.calibrate(fc, budget=b, allow_uncovered=True) for b in (0.4, 0.6)]
        return c, [x.tau for x in cals], [x.simulate(fc)[1] for x in cals]

    (c1, taus1, depth1), (c2, taus2, depth2) = (_with_threads(n, run) for n in (1, 2))
    assert torch.equal(c1.profiles.protos, c2.profiles.protos)
    assert torch.equal(c1.jumper.weight, c2.jumper.weight)
    assert torch.equal(c1.jumper.budget.weight, c2.jumper.budget.weight)
    assert taus1 == taus2 and all(torch.equal(a, b) for a, b in zip(depth1, depth2))
    assert len(set(taus1)) == 2 and 0 < taus1[0] < 2  # real, distinct exits
