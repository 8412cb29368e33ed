"""The Jumper (tgems.jumper): what its targets learn, and that a Jumper of the confidence signals only reads
those. On the session's tiny trained CLIP (tests/conftest.py)."""
import dataclasses

import pytest
import torch

from tgem_helpers import bb, make_classifier, test_data  # noqa: F401 (fixtures)
from tgems import TGEMError
from tgems.jumper import NUM_SIGNALS, Jumper, fit_jumper, jumper_signals
from tgems.profiles import layer_probs


def test_jumper_targets(bb, fitted, test_data, test_feats):
    """`agree` learns P(layer l agrees with the full model) from the confidence signals; `no_loss` learns
    P(layer l is right or the full model is wrong) from those and z_l: where every label equals the full
    model's prediction its target is exactly agreement; with the true labels it is another model; it
    needs labels. `goal` holds both."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    probs = layer_probs(clf.profiles, test_feats)
    preds = probs.argmax(-1)
    signals = jumper_signals(probs, test_feats, clf.profiles.layers)
    y_agree = (preds[:, :-1] == preds[:, -1:]).float()
    full = preds[:, -1]
    as_full = dataclasses.replace(test_feats, labels=full)
    agree, same = fit_jumper(clf.profiles, test_feats, "agree"), fit_jumper(clf.profiles, as_full, "no_loss")
    assert agree.budget is None and same.budget is None
    expect = Jumper().fit(signals[..., :NUM_SIGNALS], y_agree)
    assert torch.equal(agree.weight, expect.weight) and torch.equal(agree.bias, expect.bias)
    expect = Jumper().fit(signals, y_agree)
    assert torch.equal(same.weight, expect.weight) and torch.equal(same.bias, expect.bias)
    other = fit_jumper(clf.profiles, test_feats, "no_loss")
    assert not torch.allclose(same.weight, other.weight)
    # `goal` (the default): the agreement model serves max_drop, the no-loss model budgets
    both = fit_jumper(clf.profiles, test_feats)
    assert torch.equal(both.weight, agree.weight) and torch.equal(both.budget.weight, other.weight)
    assert both.for_goal("max_drop") is both and both.for_goal("budget") is both.budget
    unlabelled = dataclasses.replace(test_feats, labels=torch.full_like(full, -1))
    with pytest.raises(TGEMError, match="needs labelled images"):
        fit_jumper(clf.profiles, unlabelled, "no_loss")
    fallback = fit_jumper(clf.profiles, unlabelled)  # no labels: agreement for every goal
    assert fallback.budget is None and torch.equal(fallback.weight, agree.weight)
    with pytest.raises(TGEMError, match="unknown Jumper target"):
        fit_jumper(clf.profiles, test_feats, "accuracy")


def test_a_jumper_of_confidence_signals_only_reads_those(bb, fitted, test_data, test_feats):
    """Checkpoints from before z_l was a signal hold NUM_SIGNALS weights per layer and keep working."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    signals = jumper_signals(layer_probs(clf.profiles, test_feats), test_feats, clf.profiles.layers)
    assert signals.shape[-1] == NUM_SIGNALS + bb.embed_dim
    old = Jumper().fit(signals[..., :NUM_SIGNALS], (signals[..., 3] > 0).float())
    assert old.weight.shape[-1] == NUM_SIGNALS
    assert torch.equal(old.scores(signals), old.scores(signals[..., :NUM_SIGNALS]))
    assert torch.equal(old.score(2, signals[:, 2]), old.scores(signals)[:, 2])

