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
