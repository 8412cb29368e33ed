"""Baselines (tgems.evaluation.baselines): linear probes per layer and the oracle depth."""
import torch

import tgems
from tgem_helpers import L, bb, make_classifier  # noqa: F401 (fixtures)
from tgems.data import scenes
from tgems.evaluation.baselines import ProbeExits, fit_probes, oracle_depth
from tgems.features import extract_features


def test_probes_never_predict_classes_absent_from_training(bb, L, fitted, train_feats):
    C = len(scenes.CLASSES)
    layers = list(range(1, L))
    w, b = fit_probes(train_feats, layers, C, epochs=20, seed=0)
    assert w.shape == (L - 1, bb.embed_dim, C) and b.shape == (L - 1, C)
    absent = torch.ones(C, dtype=torch.bool)
    absent[train_feats.labels.unique()] = False
    assert absent.sum() == len(scenes.HELDOUT_CLASSES)
    assert torch.all(w[:, :, absent] == 0) and torch.all(b[:, absent] <= -1e3)
    heldout = extract_features(bb, tgems.load_dataset("scenes:heldout:120"), progress=False)
    probe = ProbeExits(w, b, make_classifier(bb, fitted, "cls", scenes.CLASSES).profiles)
    for feats in (heldout, train_feats):
        conf, preds = probe.layer_predictions(feats)
        assert conf.shape == (len(feats), L - 1) and preds.shape == (len(feats), L)
        assert not absent[preds[:, :-1]].any()
    # the probes learned something on their training data (chance is 1/52)
    _, preds = probe.layer_predictions(train_feats)
    assert (preds[:, -2] == train_feats.labels).float().mean() > 3 / 52


def test_oracle_depth_by_hand():
    layer_preds = torch.tensor([[5, 5, 5, 5],
                                [1, 5, 5, 5],
                                [5, 1, 5, 5],
                                [1, 2, 3, 5],
                                [5, 5, 1, 5],
                                [5, 1, 1, 5]])
    assert oracle_depth(layer_preds, [1, 2, 3, 4]).tolist() == [1, 2, 3, 4, 4, 4]
    assert oracle_depth(layer_preds[:, 1:], [4, 8, 12]).tolist() == [4, 4, 8, 12, 12, 12]

