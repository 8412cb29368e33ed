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

