"""Short names for the session's trained tiny CLIP (tests/conftest.py) and helpers shared by the module
test files that use it. Import the fixtures by name: `from tgem_helpers import L, bb, make_classifier`."""
import pytest
import torch

from tgems.classifier import EarlyExitClassifier


@pytest.fixture
def bb(trained_bb):
    return trained_bb


@pytest.fixture
def L(trained_bb):
    return trained_bb.num_layers


@pytest.fixture
def train(scenes_train):
    return scenes_train


@pytest.fixture
def test_data(scenes_test):
    return scenes_test


def make_classifier(bb, fitted, space, labels):
    tgem, jumper, info = fitted[space]
    return EarlyExitClassifier(bb, tgem, labels, info["templates"], jumper=jumper)


def synthetic_exits(n, seed, n_cand=3, num_classes=10):
    """Scores uniform in [0, 1]; a candidate layer agrees with the full model with probability
    0.75 + 0.25 * score (so the disagreement at score s is 0.25 (1 - s))."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n_cand, generator=g)
    full = torch.randint(0, num_classes, (n,), generator=g)
    agree = torch.rand(n, n_cand, generator=g) < 0.75 + 0.25 * scores
    preds = torch.where(agree, full[:, None], (full[:, None] + 1) % num_classes)
    return scores, torch.cat([preds, full[:, None]], 1)
