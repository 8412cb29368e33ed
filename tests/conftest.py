"""Shared fixtures: tiny CLIP checkpoints built on the fly (see tests/helpers.py)."""
import sys
from pathlib import Path

import pytest
import torch

# One thread: the tiny models gain nothing from more, and tests often share a small machine.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_tiny_clip  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A 4-block tiny CLIP directory shared by the whole session (treat as read-only)."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_clip_dir):
    import tgems
    return tgems.load_backbone(str(tiny_clip_dir))


@pytest.fixture
def tiny_clip_factory(tmp_path):
    """Call with make_tiny_clip keyword overrides; each call gets a fresh sub-directory."""
    counter = iter(range(1000))
    return lambda **kw: make_tiny_clip(tmp_path / f"clip{next(counter)}", **kw)


# ------------------------------------------------------------------ the tiny *trained* CLIP (once per session)
#
# Several test files need a CLIP whose layers mean something (fit, calibration, the classifier, the CLI): a
# 4-block CLIP pretrained on the procedural scenes for 20 steps (a few seconds), with cls and rates T-GEMs fit
# on 600 training images. Shared by the session: treat every object below as read-only.


@pytest.fixture(scope="session")
def trained_clip_dir(tmp_path_factory):
    from tgems.training.pretrain import pretrain

    out = tmp_path_factory.mktemp("trained_clip") / "clip"
    pretrain(out, preset="tiny", steps=20, seed=0, threads=1, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_bb(trained_clip_dir):
    import tgems
    return tgems.load_backbone(str(trained_clip_dir))


@pytest.fixture(scope="session")
def scenes_train():
    import tgems
    return tgems.load_dataset("scenes:train:600")


@pytest.fixture(scope="session")
def scenes_test():
    import tgems
    return tgems.load_dataset("scenes:test:200")


@pytest.fixture(scope="session")
def train_feats(trained_bb, scenes_train):
    from tgems.features import extract_features
    return extract_features(trained_bb, scenes_train, rates=True, progress=False)


@pytest.fixture(scope="session")
def test_feats(trained_bb, scenes_test):
    from tgems.features import extract_features
    return extract_features(trained_bb, scenes_test, rates=True, progress=False)


@pytest.fixture(scope="session")
def fitted(trained_bb, scenes_train, train_feats):
    """space -> (tgem, jumper, info) on the trained CLIP, each fit once with 2 epochs."""
    from tgems.training.fit import FitSettings, fit_tgem
    # cls: the issue-27 recipe (distilled readouts, trajectory signals), so every test of the classifier, engine
    # and schedulers covers it; rates: the default recipe
    extra = {"cls": {"recipe": "distilled", "trajectory": True}, "rates": {}}
    return {space: fit_tgem(trained_bb, scenes_train, FitSettings(space=space, epochs=2, **extra[space]),
                            feats=train_feats, progress=False)
            for space in ("cls", "rates")}
