"""T-GEM training (tgems.training.fit): settings checked before training, the rate-based regularizer and its
soft exits, determinism, step counts, the caller's settings left alone. On the session's tiny trained CLIP
(tests/conftest.py)."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tgem_helpers import L, bb, train  # noqa: F401 (fixtures)
from tgems import TGEMError
from tgems.profiles import class_embeddings
from tgems.tgem import save_tgem
from tgems.jumper import NUM_SIGNALS
from tgems.training.fit import FitSettings, class_halves, cross_fit_halves, fit_tgem


def test_fit_refuses_an_unknown_jumper_target_before_training(bb, train, train_feats):
    with pytest.raises(TGEMError, match="unknown Jumper target"):
        fit_tgem(bb, train, FitSettings(jumper_target="accuracy", epochs=50), feats=train_feats, progress=False)


def test_the_default_recipe_is_per_space_and_resolved_into_the_settings(bb):
    """cls: distilled readouts (maps of z_l and m_l) with trajectory signals; rates: T-GEM alone (its policy
    scores no z_l); what a fit records is the resolved recipe, and explicit choices stay as given."""
    from tgems.training.fit import _checked_settings

    cls, rates = _checked_settings(bb, FitSettings()), _checked_settings(bb, FitSettings(space="rates"))
    assert (cls.recipe, cls.trajectory, cls.readout_patch) == ("distilled", True, True)
    assert (rates.recipe, rates.trajectory) == ("tgem", False)
    assert _checked_settings(bb, FitSettings(recipe="tgem")).trajectory is False
    assert _checked_settings(bb, FitSettings(trajectory=False)).recipe == "distilled"
    assert _checked_settings(bb, FitSettings(recipe="tgem", trajectory=True)).trajectory is True
    with pytest.raises(TGEMError, match="needs --space cls"):
        _checked_settings(bb, FitSettings(space="rates", recipe="distilled"))
    assert FitSettings().recipe is None  # the caller's settings are not touched


def _expected_depth(bb, train, train_feats, **kw):
    s = FitSettings(epochs=10, batch_size=64, r_target=0.2, seed=0, **kw)
    return fit_tgem(bb, train, s, feats=train_feats, progress=False)[2]["history"][-1]["expected_depth"]


def test_regularizer_lowers_expected_depth_with_default_soft_exits(bb, train, train_feats):
    """The default soft-exit threshold comes from the data (the full model's median top-1 probability on
    the training images), so on a 64-class problem with low confidences the regularizer still acts; a
    fixed 0.9 there made sigmoid(20 (conf - 0.9)) ~ 1e-7 and the expected depth stayed exactly 1.0."""
    off = _expected_depth(bb, train, train_feats, lam=0.0)
    on = _expected_depth(bb, train, train_feats, lam=10.0)
    assert on < off - 0.05, (on, off)
    fixed = _expected_depth(bb, train, train_feats, lam=10.0, soft_tau=0.9)
    assert fixed == pytest.approx(1.0, abs=1e-3)


def test_default_soft_tau_is_the_full_models_median_confidence(bb, train, train_feats):
    s = FitSettings(epochs=1, batch_size=256, seed=0)
    tgem, _, info = fit_tgem(bb, train, s, feats=train_feats, progress=False)
    present = sorted(set(train.labels.tolist()))
    text = class_embeddings(bb, [train.classes[i] for i in present], info["templates"])
    conf = (bb.logit_scale() * F.normalize(train_feats.z[:, -1], dim=-1) @ text.t()).softmax(-1).max(-1).values
    tau = info["settings"]["soft_tau"]
    assert 0 < tau < 0.9
    lo, hi = conf.quantile(0.35).item(), conf.quantile(0.65).item()  # the median of the fit's 80 % part
    assert lo <= tau <= hi, (lo, tau, hi)
    with pytest.raises(TGEMError, match="soft_tau"):
        fit_tgem(bb, train, FitSettings(soft_tau=1.5), feats=train_feats, progress=False)


def test_regularizer_lowers_expected_depth(bb, train, train_feats):
    """With soft exits whose threshold lies where this model's confidences are (64 classes: ~0.02-0.2),
    lambda > 0 and a low r_target train to a lower expected depth than lambda = 0, same seed."""
    off = _expected_depth(bb, train, train_feats, lam=0.0, soft_tau=0.1)
    on = _expected_depth(bb, train, train_feats, lam=10.0, soft_tau=0.1)
    assert on < off - 0.1, (on, off)


def test_fit_tgem_is_deterministic(bb, train, train_feats, tmp_path):
    def fit_and_save(name, seed, space="cls"):
        tgem, jumper, info = fit_tgem(bb, train, FitSettings(space=space, epochs=2, batch_size=128, seed=seed),
                                      feats=train_feats, progress=False)
        path = save_tgem(tmp_path / name, tgem, jumper, bb, info)
        return load_file(str(path / "tgem.safetensors")), info

    a, info_a = fit_and_save("a", 0)
    b, info_b = fit_and_save("b", 0)
    c, _ = fit_and_save("c", 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert info_a["history"] == info_b["history"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fit_with_ten_steps_in_all(bb, train, train_feats):
    """480 training images at batch 512 for 10 epochs: 10 optimizer steps (OneCycleLR's zero-division case)."""
    _, _, info = fit_tgem(bb, train, FitSettings(epochs=10), feats=train_feats, progress=False)
    assert len(info["history"]) == 10


def test_fit_refuses_bad_candidate_layers(bb, L, train, train_feats):
    for layers in ([0, 1], [L], [1, L + 2]):
        with pytest.raises(TGEMError, match="candidate layers"):
            fit_tgem(bb, train, FitSettings(epochs=1, layers=layers), feats=train_feats, progress=False)



def test_fit_leaves_the_callers_settings_as_given(bb, train, train_feats):
    """fit_tgem fills in the candidate layers (sorted, unique) and the data-derived soft_tau in its own copy:
    the caller's FitSettings keep what they held, so one settings object can serve several fits."""
    s = FitSettings(epochs=1, layers=[3, 1, 3], soft_tau=None)
    before = dataclasses.asdict(s)
    _, _, info = fit_tgem(bb, train, s, feats=train_feats, progress=False)
    assert dataclasses.asdict(s) == before
    assert s.layers == [3, 1, 3] and s.soft_tau is None
    assert info["settings"]["layers"] == [1, 3] and 0 < info["settings"]["soft_tau"] < 1
    again = fit_tgem(bb, train, s, feats=train_feats, progress=False)[2]
    assert again["settings"] == info["settings"]


def test_class_halves_split_every_class_once():
    a, b = class_halves(9, seed=0)
    assert sorted(a.tolist() + b.tolist()) == list(range(9)) and len(a) == 4
    assert [h.tolist() for h in class_halves(9, seed=0)] == [a.tolist(), b.tolist()]
    assert [h.tolist() for h in class_halves(9, seed=1)] != [a.tolist(), b.tolist()]
    # cross-fitting needs 4 classes, each with training images
    assert [h.tolist() for h in cross_fit_halves(np.arange(9).repeat(2), 9, seed=0)] == [a.tolist(), b.tolist()]
    assert cross_fit_halves(np.arange(3).repeat(5), 3, seed=0) is None
    assert cross_fit_halves(np.array([0, 1, 2, 4, 5, 6, 7, 8]), 9, seed=0) is None  # class 3 has none


def test_cross_fit_trains_two_half_class_models_for_the_budget_jumper(bb, train, train_feats, fitted):
    """The default fit trains two more T-GEMs, each on the training images of one half of the classes, and
    the budget Jumper learns from them (so it reads z_l); without cross-fitting its z_l weights are zero and
    the exit modules are the same; so is the agreement model, except that the distilled recipe's mixing
    weights are fit on the main modules' scores instead of the half-models' (equal with recipe tgem)."""
    D = bb.embed_dim
    tgem, jumper, info = fitted["cls"]
    halves = info["cross_fit"]
    assert len(halves) == 2 and not set(halves[0]["classes"]) & set(halves[1]["classes"])
    assert sorted(halves[0]["classes"] + halves[1]["classes"]) == sorted(info["train_classes"])
    assert sum(h["num_train"] for h in halves) == info["num_train"]
    assert jumper.budget.weight[:, NUM_SIGNALS:NUM_SIGNALS + D].any()
    plain_tgem, plain, plain_info = fit_tgem(bb, train, FitSettings(space="cls", epochs=2, cross_fit=False,
                                                                    recipe="distilled", trajectory=True),
                                             feats=train_feats, progress=False)
    assert plain_info["cross_fit"] is None and not plain_info["settings"]["cross_fit"]
    assert not plain.budget.weight[:, NUM_SIGNALS:NUM_SIGNALS + D].any()
    same = {k: v for k, v in tgem.state_dict().items() if k != "mix"}
    assert all(torch.equal(v, plain_tgem.state_dict()[k]) for k, v in same.items())
    assert not torch.equal(plain_tgem.mix, tgem.mix)
    assert not torch.equal(plain.budget.weight, jumper.budget.weight)
    memo = {}
    t_cross = fit_tgem(bb, train, FitSettings(space="cls", epochs=2, recipe="tgem"), feats=train_feats,
                       progress=False, memo=memo)
    t_plain = fit_tgem(bb, train, FitSettings(space="cls", epochs=2, recipe="tgem", cross_fit=False),
                       feats=train_feats, progress=False, memo=memo)
    assert torch.equal(t_plain[1].weight, t_cross[1].weight)
    # the memo reuses the trained modules: the main ones equal the fixture's (same data, seed, training)
    assert all(torch.equal(v, tgem.state_dict()[k]) for k, v in t_plain[0].state_dict().items())
    agree_only = fit_tgem(bb, train, FitSettings(space="cls", epochs=1, jumper_target="agree"), feats=train_feats,
                          progress=False)[2]
    assert agree_only["cross_fit"] is None  # nothing would use the half-models


def test_cross_fit_is_skipped_and_said_with_fewer_than_four_classes(bb, train, train_feats):
    keep = np.flatnonzero(np.isin(train.labels, np.unique(train.labels)[:3]))
    _, jumper, info = fit_tgem(bb, train.subset(keep), FitSettings(space="cls", epochs=1),
                               feats=train_feats.subset(keep), progress=False)
    assert info["cross_fit"] is None and "fewer than 4 classes" in info["cross_fit_skipped"]
    assert not jumper.budget.weight[:, NUM_SIGNALS:NUM_SIGNALS + bb.embed_dim].any()
