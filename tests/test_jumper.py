"""The Jumper (tgems.jumper): what its targets learn, and that a Jumper of the confidence signals only reads
those. On the session's tiny trained CLIP (tests/conftest.py)."""
import dataclasses

import pytest
import torch

from tgem_helpers import bb, make_classifier, test_data  # noqa: F401 (fixtures)
from tgems import TGEMError
from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, NUM_TAIL_SIGNALS, NUM_TRAJ_SIGNALS, jumper_signals, \
    text_neighbours
from tgems.training.jumper_fit import fit_jumper, fit_logistic
from tgems.profiles import layer_probs


def test_jumper_targets(bb, fitted, test_data, test_feats):
    """`agree` learns P(layer l agrees with the full model), `no_loss` P(layer l is right or the full model
    is wrong), both from the confidence, label-set and trajectory signals (standardised fit, zero weights on
    z_l), the agreement model from the tail signals too: where every label equals the full model's
    prediction the no-loss target is exactly agreement; with the true labels it is another model; it needs
    labels. `goal` holds both."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    probs, pairs = layer_probs(clf.profiles, test_feats, pairs=True)
    preds = probs.argmax(-1)
    signals = jumper_signals(probs, test_feats, clf.profiles.layers, clf.profiles.text, pairs)
    y_agree = (preds[:, :-1] == preds[:, -1:]).float()
    full = preds[:, -1]
    as_full = dataclasses.replace(test_feats, labels=full)
    agree, same = fit_jumper(clf.profiles, test_feats, "agree"), fit_jumper(clf.profiles, as_full, "no_loss")
    assert agree.budget is None and same.budget is None
    width = signals.shape[-1] - NUM_TAIL_SIGNALS  # what budget models read: as wide as before the tail signals
    cols = list(range(NUM_SIGNALS)) + list(range(width - NUM_SET_SIGNALS - NUM_TRAJ_SIGNALS, width))
    for model, read in ((agree, cols + list(range(width, signals.shape[-1]))), (same, cols)):
        expect = fit_logistic(signals[..., read], y_agree, standardize=True)
        assert model.weight.shape[-1] == max(read) + 1
        assert torch.equal(model.weight[..., read], expect.weight) and torch.equal(model.bias, expect.bias)
        assert not model.weight[..., NUM_SIGNALS:NUM_SIGNALS + bb.embed_dim].any()
    assert agree.weight[..., width:].abs().sum() > 0
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


def test_cross_fitted_profiles_train_the_no_loss_model_on_every_set(bb, fitted, test_data, test_feats):
    """With cross-fitted profiles the no-loss model is fit on the images scored by each set of modules (rows
    stacked, labels repeated) and reads every signal but the tail ones, z_l included; the agreement model is
    unchanged."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    other = make_classifier(bb, fitted, "rates", test_data.classes).profiles
    plain = fit_jumper(clf.profiles, test_feats)
    crossed = fit_jumper(clf.profiles, test_feats, cross=[other])
    assert torch.equal(crossed.weight, plain.weight)
    assert crossed.budget.weight[..., NUM_SIGNALS:NUM_SIGNALS + bb.embed_dim].any()
    rows = []
    for prof in (clf.profiles, other):
        probs, pairs = layer_probs(prof, test_feats, pairs=True)
        rows.append((jumper_signals(probs, test_feats, prof.layers, prof.text, pairs), probs.argmax(-1)))
    x = torch.cat([r[0] for r in rows])[..., :-NUM_TAIL_SIGNALS]
    p = torch.cat([r[1] for r in rows])
    y = test_feats.labels.repeat(2)[:, None]
    expect = fit_logistic(x, (p[:, :-1] == y) | (p[:, -1:] != y), standardize=True)
    assert torch.equal(crossed.budget.weight, expect.weight) and torch.equal(crossed.budget.bias, expect.bias)


def test_a_jumper_of_confidence_signals_only_reads_those(bb, fitted, test_data, test_feats):
    """Checkpoints from before z_l was a signal hold NUM_SIGNALS weights per layer and keep working."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    signals = jumper_signals(layer_probs(clf.profiles, test_feats), test_feats, clf.profiles.layers)
    assert signals.shape[-1] == NUM_SIGNALS + bb.embed_dim
    old = fit_logistic(signals[..., :NUM_SIGNALS], (signals[..., 3] > 0).float())
    assert old.weight.shape[-1] == NUM_SIGNALS
    assert torch.equal(old.scores(signals), old.scores(signals[..., :NUM_SIGNALS]))
    assert torch.equal(old.score(2, signals[:, 2]), old.scores(signals)[:, 2])



def test_label_set_signals(bb, fitted, test_data, test_feats):
    """After z_l: cosine of the top-2 classes' texts, the top-1 text's nearest other class text, top-k
    overlap with the previous candidate layer (0 at the first). Without text the layout is the old one."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    probs = layer_probs(clf.profiles, test_feats)
    text = clf.profiles.text
    old = jumper_signals(probs, test_feats, clf.profiles.layers)
    sig = jumper_signals(probs, test_feats, clf.profiles.layers, text)
    assert sig.shape[-1] == old.shape[-1] + NUM_SET_SIGNALS + NUM_TRAJ_SIGNALS + NUM_TAIL_SIGNALS
    assert torch.equal(sig[..., :old.shape[-1]], old)
    top = probs[:, 1].topk(2, dim=1).indices
    pair, nearest, overlap = (sig[:, 1, old.shape[-1] + k] for k in range(NUM_SET_SIGNALS))
    assert torch.allclose(pair, (text[top[:, 0]] * text[top[:, 1]]).sum(-1), atol=1e-6)
    cos = text @ text.T
    cos.fill_diagonal_(-2.0)
    assert torch.allclose(nearest, cos.max(1).values[top[:, 0]], atol=1e-6)
    assert torch.equal(text_neighbours(text), text_neighbours(text.clone()))
    assert (sig[:, 0, old.shape[-1] + 2] == 0).all() and ((overlap >= 0) & (overlap <= 1)).all()
    assert text_neighbours(text[:1]).tolist() == [0.0]


def test_tail_signals_are_the_log_distance_from_certainty(bb, fitted, test_data, test_feats):
    """The last NUM_TAIL_SIGNALS: log(1 - top-1), log(margin), log(entropy), log(1 - the previous layer's
    probability of this top-1), log(1 - the distilled top-1), floored at 1e-4; they order images that the
    probabilities themselves put within a thousandth of 1."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    probs, pairs = layer_probs(clf.profiles, test_feats, pairs=True)
    sig = jumper_signals(probs, test_feats, clf.profiles.layers, clf.profiles.text, pairs)
    tail = sig[..., -NUM_TAIL_SIGNALS:]
    conf, d_top1 = sig[..., :NUM_SIGNALS], sig[..., -NUM_TAIL_SIGNALS - 1]
    for k, base in enumerate([1 - conf[..., 0], conf[..., 1], conf[..., 2], 1 - conf[..., 4], 1 - d_top1]):
        assert torch.allclose(tail[..., k], torch.log(base + 1e-4), atol=1e-5)
    assert (tail[:, 0, 3] == torch.log(torch.tensor(1 + 1e-4))).all()  # no previous layer: probability 0
    assert tail[..., 0].min() >= torch.log(torch.tensor(1e-4)) - 1e-6


def test_standardized_fit_folds_into_the_weights(bb, fitted, test_data, test_feats):
    """Scores of a standardised fit read the raw signals: equal to scoring standardised signals with the
    unfolded weights, up to rounding."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    sig = jumper_signals(layer_probs(clf.profiles, test_feats), test_feats, clf.profiles.layers, clf.profiles.text)
    x = sig[..., :NUM_SIGNALS]
    y = (x[..., 0] > x[..., 0].median()).float()
    folded = fit_logistic(x, y, standardize=True)
    mu, sd = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-3)
    plain = fit_logistic((x - mu) / sd, y)
    diff = (folded.scores(x) - plain.scores((x - mu) / sd)).abs().max()
    assert diff < 1e-3, diff  # two L-BFGS runs on differently rounded problems: equal to its tolerance


def test_trajectory_signals(bb, fitted, test_data, test_feats):
    """Before the tail: patience (candidate layers in a row before this one with the same top-1), whether the T-GEM and
    the distilled readout agree on the top-1, the distilled readout's top-1 probability; zeros for the readout
    pair without `pairs` (and for profiles without distilled readouts)."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    prof = clf.profiles.to("cpu")
    assert prof.distilled  # the session's cls fit (tests/conftest.py)
    probs, pairs = layer_probs(prof, test_feats, pairs=True)
    traj = slice(-NUM_TAIL_SIGNALS - NUM_TRAJ_SIGNALS, -NUM_TAIL_SIGNALS)
    sig = jumper_signals(probs, test_feats, prof.layers, prof.text, pairs)[..., traj]
    top = probs[:, :-1].argmax(-1)
    expect = torch.zeros(len(top))
    for j in range(len(prof.layers)):
        if j:
            expect = torch.where(top[:, j] == top[:, j - 1], expect + 1, torch.zeros_like(expect))
        assert torch.equal(sig[:, j, 0], expect)
        l = prof.layers[j]
        t, d = prof.parts(j, test_feats.z[:, l - 1], patch=test_feats.patch[:, l - 1])
        assert torch.equal(sig[:, j, 1], (t.argmax(1) == d.argmax(1)).float())
        assert torch.allclose(sig[:, j, 2], d.softmax(-1).max(1).values)
    assert sig[:, :, 1].min() == 0 and sig[:, :, 1].max() == 1 and sig[:, -1, 0].max() > 0
    no_pairs = jumper_signals(probs, test_feats, prof.layers, prof.text)[..., traj]
    assert torch.equal(no_pairs[..., 0], sig[..., 0]) and not no_pairs[..., 1:].any()
