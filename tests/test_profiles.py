"""Class profiles (tgems.profiles): text-guided and sample-based prototypes, their shapes, the label checks.

On the session's tiny trained CLIP and its fitted T-GEMs (tests/conftest.py)."""
import pytest
import torch
import torch.nn.functional as F

from tgem_helpers import L, bb  # noqa: F401 (fixtures)
from tgems import TGEMError
from tgems.classifier import EarlyExitClassifier
from tgems.data import scenes
from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, NUM_TAIL_SIGNALS, NUM_TRAJ_SIGNALS
from tgems.profiles import check_labels, class_embeddings, layer_probs, sample_profiles


@pytest.mark.parametrize("space", ["cls", "rates"])
def test_profile_and_logit_shapes(bb, L, fitted, test_feats, space):
    tgem, jumper, info = fitted[space]
    C = len(info["train_classes"])
    Fdim = bb.embed_dim if space == "cls" else bb.mlp_dim
    text = class_embeddings(bb, info["train_classes"], info["templates"])
    assert text.shape == (C, bb.embed_dim)
    raw = tgem.raw_profiles(text)
    assert raw.shape == (L - 1, C, Fdim)
    assert torch.allclose(raw.norm(dim=-1), torch.ones(L - 1, C), atol=1e-5)
    prof = tgem.profiles(text, bb)
    assert prof.layers == list(range(1, L)) and prof.num_classes == C
    logits = prof.layer_logits(test_feats.space(space), test_feats.z[:, -1], test_feats.patch)
    assert logits.shape == (len(test_feats), L, C)
    probs = layer_probs(prof, test_feats)
    assert probs.shape == (len(test_feats), L, C)
    assert torch.allclose(probs.sum(-1), torch.ones(len(test_feats), L), atol=1e-5)
    # the agreement model reads the confidence and label-set signals (zero weights on the readout z_l between
    # them), the trajectory signals and the tail signals (without the trajectory, the one made from the readout
    # pair is not read); the cross-fitted budget (no-loss) model reads z_l too, and no tail signal
    width = NUM_SIGNALS + bb.embed_dim + NUM_SET_SIGNALS + NUM_TRAJ_SIGNALS
    assert jumper.weight.shape == (L - 1, width + NUM_TAIL_SIGNALS) and jumper.bias.shape == (L - 1,)
    assert jumper.weight[:, width:-1].any() and bool(jumper.weight[:, -1].any()) == (space == "cls")
    assert not jumper.weight[:, NUM_SIGNALS:NUM_SIGNALS + bb.embed_dim].any()
    assert jumper.budget.weight.shape == (L - 1, width)
    assert jumper.budget.weight[:, NUM_SIGNALS:NUM_SIGNALS + bb.embed_dim].any()
    # the trajectory signals are read only when the fit asks for them (tests/conftest.py: cls does, rates not)
    assert bool(jumper.budget.weight[:, -NUM_TRAJ_SIGNALS:].any()) == (space == "cls")


@pytest.mark.parametrize("space", ["cls", "rates"])
def test_sample_profiles_shapes_and_missing_class(bb, L, train_feats, space):
    C = len(scenes.CLASSES)
    text = class_embeddings(bb, scenes.CLASSES)
    labels = train_feats.labels
    present = labels.unique()
    missing = [c for c in range(C) if c not in set(present.tolist())]
    assert missing  # the train split never shows the held-out classes
    layers = [1, 3]
    Fdim = bb.embed_dim if space == "cls" else bb.mlp_dim
    prof = sample_profiles(train_feats.space(space), labels, C, text, layers, L, {"final_scale": 20.0}, space, k=1,
                           seed=0)
    assert prof.protos.shape == (len(layers), C, Fdim)
    assert prof.scale.shape == (len(layers),)
    assert (prof.center is None) == (space == "cls")
    if space == "rates":
        assert prof.center.shape == (len(layers), Fdim)
    for c in missing:
        if space == "cls":  # a class with no shot falls back to its text embedding
            assert torch.allclose(prof.protos[:, c], text[c].expand(len(layers), -1), atol=1e-6)
        else:  # unreachable
            assert torch.all(prof.protos[:, c] == 0)
    # k = 1: each present class's prototype is the (normalised, centred) feature of one of its images
    for c in present[:5].tolist():
        for j, l in enumerate(layers):
            x = train_feats.space(space)[labels == c, l - 1].float()
            if space == "rates":
                x = x - prof.center[j]
            cos = F.normalize(x, dim=-1) @ prof.protos[j, c]
            assert cos.max().item() == pytest.approx(1.0, abs=1e-5)
    logits = prof.layer_logits(train_feats.space(space), train_feats.z[:, -1])
    assert logits.shape == (len(train_feats), len(layers) + 1, C)


def test_bad_label_sets_raise(bb, fitted):
    tgem, jumper, _ = fitted["cls"]
    for labels in ([], None, ["a red circle", "a blue star", "a red circle"], ["a red circle", ""], ["x", 3]):
        with pytest.raises(TGEMError):
            check_labels(labels)
        with pytest.raises(TGEMError):
            class_embeddings(bb, labels)
        with pytest.raises(TGEMError):
            EarlyExitClassifier(bb, tgem, labels if labels is not None else [], jumper=jumper)
    with pytest.raises(TGEMError, match="duplicate labels: a red circle"):
        EarlyExitClassifier(bb, tgem, ["a red circle", "a blue star", "a red circle"], jumper=jumper)
    with pytest.raises(TGEMError, match="empty"):
        EarlyExitClassifier(bb, tgem, [], jumper=jumper)

