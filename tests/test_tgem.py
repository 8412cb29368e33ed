"""The T-GEM modules and their checkpoint format (tgems.tgem): a fresh cls T-GEM is the logit lens; save /
load round trip, atomic replacement, refusal of another backbone and of what is not a checkpoint."""
import os

import pytest
import torch
import torch.nn.functional as F

from tgem_helpers import L, bb, make_classifier  # noqa: F401 (fixtures)
from tgems import TGEMError
from tgems.classifier import EarlyExitClassifier
from tgems.data import scenes
from tgems.profiles import class_embeddings
from tgems.tgem import TGEM, load_tgem, read_tgem_config, save_tgem


def test_fresh_cls_tgem_is_the_logit_lens(bb, L, test_feats):
    text = class_embeddings(bb, scenes.CLASSES[:10])
    tgem = TGEM(list(range(1, L)), L, bb.embed_dim, bb.embed_dim, "cls", hidden=16)
    raw = tgem.raw_profiles(text)
    assert torch.allclose(raw, text.expand(L - 1, -1, -1), atol=1e-6)
    prof = tgem.profiles(text, bb)
    logits = prof.layer_logits(test_feats.z, test_feats.z[:, -1])
    lens = torch.einsum("nld,cd->nlc", F.normalize(test_feats.z[:, :L - 1], dim=-1), text)
    assert torch.allclose(logits[:, :-1], tgem.log_scale.exp().detach()[None, :, None] * lens, atol=1e-4)


@pytest.mark.parametrize("space", ["cls", "rates"])
def test_checkpoint_round_trip(bb, fitted, test_feats, tmp_path, space):
    tgem, jumper, info = fitted[space]
    path = tmp_path / "ckpt"
    for _ in range(2):  # the second save overwrites the first
        assert save_tgem(path, tgem, jumper, bb, info, data_spec="scenes:train:600") == path
        assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no leftover .tmp directory
        assert sorted(os.listdir(path)) == ["tgem.json", "tgem.safetensors"]
    tgem2, jumper2, cfg = load_tgem(path, bb)
    assert cfg == read_tgem_config(path)
    assert cfg["space"] == space and cfg["data"] == "scenes:train:600" and cfg["layers"] == tgem.layers
    sd, sd2 = tgem.state_dict(), tgem2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    assert torch.equal(jumper.weight, jumper2.weight) and torch.equal(jumper.bias, jumper2.bias)
    assert torch.equal(jumper.budget.weight, jumper2.budget.weight)
    assert torch.equal(jumper.budget.bias, jumper2.budget.bias)
    assert jumper2.tau == jumper.tau
    text = class_embeddings(bb, scenes.CLASSES)
    assert torch.equal(tgem.raw_profiles(text), tgem2.raw_profiles(text))
    # a classifier built from the path decides exactly like one built from the objects
    a = make_classifier(bb, fitted, space, scenes.CLASSES)
    b = EarlyExitClassifier(bb, str(path), scenes.CLASSES)
    assert b.tau == a.tau and b.templates == a.templates
    for x, y in zip(a.simulate(test_feats), b.simulate(test_feats)):
        assert torch.equal(x, y)


def test_save_never_replaces_what_is_not_a_checkpoint(bb, fitted, tmp_path):
    tgem, jumper, info = fitted["cls"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    a_file = tmp_path / "file"
    a_file.write_text("keep me too")
    for bad in (busy, a_file):
        with pytest.raises(TGEMError, match="not a T-GEM checkpoint"):
            save_tgem(bad, tgem, jumper, bb, info)
    assert (busy / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"
    assert sorted(os.listdir(tmp_path)) == ["busy", "file"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_tgem(empty, tgem, jumper, bb, info)
    assert load_tgem(empty, bb)[1].tau == jumper.tau


def test_checkpoint_refuses_another_backbone_and_non_checkpoints(bb, fitted, tmp_path, tiny_backbone):
    tgem, jumper, info = fitted["cls"]
    path = save_tgem(tmp_path / "ckpt", tgem, jumper, bb, info)
    other = tiny_backbone  # a random-init tiny CLIP of the same shape family: another backbone
    assert other.fingerprint() != bb.fingerprint()
    with pytest.raises(TGEMError, match="another backbone"):
        load_tgem(path, other)
    with pytest.raises(TGEMError, match="another backbone"):
        EarlyExitClassifier(other, str(path), scenes.CLASSES[:3])
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (empty, tmp_path / "missing"):
        with pytest.raises(TGEMError, match="not a T-GEM checkpoint"):
            load_tgem(bad, bb)
    half = tmp_path / "half"
    half.mkdir()
    (half / "tgem.safetensors").write_bytes((path / "tgem.safetensors").read_bytes())
    with pytest.raises(TGEMError, match="not a T-GEM checkpoint"):
        read_tgem_config(half)
    (half / "tgem.json").write_text("{not json")
    with pytest.raises(TGEMError, match="cannot read"):
        load_tgem(half, bb)

