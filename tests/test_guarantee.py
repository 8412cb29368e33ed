"""The max_drop guarantee study (tgems.evaluation.guarantee) on a synthetic pool."""
from types import SimpleNamespace

from tgem_helpers import synthetic_exits
from tgems.evaluation.guarantee import guarantee_study


def test_guarantee_study_on_synthetic_pool():
    scores, preds = synthetic_exits(1000, 7)
    stub = SimpleNamespace(layer_predictions=lambda feats, goal: (scores, preds) if goal == "max_drop" else None,
                           profiles=SimpleNamespace(layers=[1, 2, 3], exit_layers=[1, 2, 3, 4]),
                           backbone=SimpleNamespace(num_layers=4))
    pool = list(range(1000))  # guarantee_study needs only len(pool) besides the stub's layer_predictions
    res = guarantee_study(stub, pool, eps=0.05, delta=0.1, n_splits=10, seed=0)
    assert res["n_splits"] == 10 and len(res["rows"]) == 10 and (res["n_calib"], res["n_test"]) == (500, 500)
    assert res["held"] >= (1 - 0.1 - 0.1) * 10
    assert all(r["calib_ucb"] <= 0.05 for r in res["rows"])
    assert res["mean_test_layers"] < 4



def test_threshold_headroom_is_the_best_single_threshold_within_eps():
    """The headroom's tau keeps the pool's disagreement <= eps, no later tau of the sequence does, and the
    guarantee's calibrated draws never beat it by more than their test noise."""
    from tgems.calibration import simulate, tau_grid
    from tgems.evaluation.guarantee import threshold_headroom

    scores, preds = synthetic_exits(2000, 3)
    layers = [1, 2, 3, 4]
    h = threshold_headroom(scores, preds, layers, eps=0.05)
    p, d = simulate(scores, preds, layers, h["tau"])
    assert abs(float((p != preds[:, -1]).float().mean()) - h["disagreement"]) < 1e-6 and h["disagreement"] <= 0.05
    assert abs(float(d.double().mean()) - h["mean_layers"]) < 1e-3 and h["mean_layers"] < 4
    taus = tau_grid(scores, size=2000)
    after = taus[list(taus).index(h["tau"]) + 1]
    p, _ = simulate(scores, preds, layers, float(after))
    assert float((p != preds[:, -1]).float().mean()) > 0.05
    strict = threshold_headroom(scores, preds, layers, eps=0.0)
    assert strict["mean_layers"] >= h["mean_layers"] and strict["disagreement"] == 0.0
    stub = SimpleNamespace(layer_predictions=lambda feats, goal: (scores, preds) if goal == "max_drop" else None,
                           profiles=SimpleNamespace(layers=layers[:-1], exit_layers=layers))
    res = guarantee_study(stub, list(range(2000)), eps=0.05, delta=0.1, n_splits=10, seed=0, headroom=True)
    assert res["headroom"] == h  # the study's own scores, the same threshold
    assert res["mean_test_layers"] >= h["mean_layers"] - 0.1
