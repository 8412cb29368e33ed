"""The plain-CLIP baseline of every FLOPs ratio (issue 30.12) counts the final zero-shot scoring of the label
set (2 C D) as an early-exit classifier's own count does, in one place (`engine.full_flops`): the engine,
the classifier, the schedulers and the evaluation's records all divide by it."""
import warnings

import numpy as np
import pytest
import torch

import tgems
from tgems.engine import full_flops, run_early_exit
from tgems.evaluation.harness import Recorder
from tgems.policies import NeverExit
from tgems.scheduling.depth import DepthScheduler, predict_rows
from tgems.scheduling.drop import DropScheduler


@pytest.fixture(scope="module")
def emb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = tgems.load_backbone("embedded")
        ds = tgems.load_dataset("scenes:test:12")
        a = tgems.EarlyExitClassifier(bb, "embedded:cls", ds.classes[:16])
        b = tgems.EarlyExitClassifier(bb, "embedded:cls", ds.classes[:40])
    return bb, bb.preprocess(list(ds.images)), a, b


def _plain(bb, C):
    return bb.flops_full() + 2 * C * bb.embed_dim


def test_full_flops_is_the_encoder_and_the_scoring(emb):
    bb = emb[0]
    assert full_flops(bb) == bb.flops_full()  # an embedding (retrieval): no labels scored
    assert full_flops(bb, 1000) == _plain(bb, 1000)
    assert full_flops(bb, 1000) - full_flops(bb, 10) == 2 * 990 * bb.embed_dim


def test_engine_divides_by_plain_clip_over_the_policys_labels(emb):
    bb, px = emb[0], emb[1][:3]

    class Labelled(NeverExit):
        num_classes = 5000

    plain = run_early_exit(bb, px, NeverExit())
    assert plain.full_flops == bb.flops_full() and plain.flops_ratio == pytest.approx(1.0)
    res = run_early_exit(bb, px, Labelled())
    assert res.full_flops == _plain(bb, 5000)
    assert res.flops_ratio == pytest.approx(bb.flops_full() / _plain(bb, 5000)) and res.flops_ratio < 0.99


def test_classifier_ratio_and_label_cost_count_the_final_scoring(emb):
    bb, px, a, _ = emb
    never = a.with_tau(2.0).predict(px[:4])
    assert never.exit_layers.tolist() == [bb.num_layers] * 4
    assert np.allclose(never.flops_ratio, never.flops / _plain(bb, 16), rtol=1e-12)
    assert not np.allclose(never.flops_ratio, never.flops / bb.flops_full(), rtol=1e-6)
    assert a.label_cost()["full_depth_flops_ratio"] == round(float(never.flops_ratio[0]), 4)


@pytest.mark.parametrize("kind", ["depth", "drop"])
def test_schedulers_sum_each_rows_own_baseline(emb, kind):
    bb, px, a, b = emb
    sched = DepthScheduler(bb, max_batch_size=8) if kind == "depth" else DropScheduler(bb, max_batch_size=8)
    rows = predict_rows(sched, [(px, a.policy()), (px[:5], b.policy())])
    assert sched.stats["flops_full"] == pytest.approx(len(px) * _plain(bb, 16) + 5 * _plain(bb, 40), rel=1e-12)
    assert [r.flops_ratio for r in rows[1]] == pytest.approx([r.flops / _plain(bb, 40) for r in rows[1]])


def test_evaluation_records_divide_by_plain_clip(emb):
    bb = emb[0]
    y = torch.tensor([0, 1, 2, 3])
    rec = Recorder(bb, y, y, np.array(["seen"] * 4), 64)
    plain = rec.add("full", None, y, torch.full((4,), bb.num_layers),
                    torch.full((4,), rec.full_flops, dtype=torch.float64))[0]
    encoder_only = rec.add("x", None, y, torch.full((4,), bb.num_layers),
                           torch.full((4,), float(bb.flops_full()), dtype=torch.float64))[0]
    assert rec.full_flops == _plain(bb, 64) and plain["flops_ratio"] == 1.0
    assert encoder_only["flops_ratio"] == round(bb.flops_full() / _plain(bb, 64), 5) < 1.0
