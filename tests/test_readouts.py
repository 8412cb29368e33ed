"""Distilled readouts (tgems.readouts, training.readout_fit): the ridge map is exact on a linear problem, the
mixed logits are the stated weighted sum (over all classes and over a shortlist), their FLOPs are counted,
and checkpoints carry a format version and a recipe: older ones load as T-GEM only, newer ones are refused."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tgems import TGEMError
from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, NUM_TRAJ_SIGNALS, Jumper, exit_head_flops
from tgems.features import LayerFeatures
from tgems.policies import JumperPolicy
from tgems.profiles import ClassProfiles
from tgems.readouts import distilled_embed, distilled_flops, reads_patch
from tgems.tgem import TGEM, load_tgem, save_tgem
from tgems.training.readout_fit import fit_mix, fit_readouts


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


def test_ridge_map_is_exact_on_a_linear_problem():
    g = torch.Generator().manual_seed(0)
    n, d, L = 400, 8, 3
    q = _orthogonal(d, 1)
    z = torch.randn(n, L, d, generator=g)
    z[:, -1] = F.normalize(z[:, 0], dim=-1) @ q * 3.0  # z_L: a rotation of unit z_1, at another norm
    feats = LayerFeatures(z, None, torch.zeros(n, dtype=torch.long))
    w, b = fit_readouts(feats, torch.arange(n).numpy(), [1, 2], l2=1e-9)
    assert torch.allclose(w[0], q, atol=1e-4) and torch.allclose(b[0], torch.zeros(d), atol=1e-4)
    assert torch.allclose(distilled_embed(w[0], b[0], z[:, 0]), F.normalize(z[:, -1], dim=-1), atol=1e-4)
    assert not torch.allclose(w[1], q, atol=1e-2)  # z_2 is unrelated noise: no exact map from it
    w2, b2 = fit_readouts(feats, torch.arange(n).numpy(), [1, 2], l2=1e-9)
    assert torch.equal(w, w2) and torch.equal(b, b2)  # closed form: the same on every run


def test_a_patch_map_reads_the_mean_patch_readout_where_the_class_token_says_nothing():
    g = torch.Generator().manual_seed(0)
    n, d, L = 400, 8, 3
    q = _orthogonal(d, 2)
    z = torch.randn(n, L, d, generator=g)  # class-token readouts: noise
    m = torch.randn(n, L, d, generator=g)
    z[:, -1] = F.normalize(m[:, 0], dim=-1) @ q * 2.0  # z_L: a rotation of the unit mean-patch readout at layer 1
    feats = LayerFeatures(z, None, torch.zeros(n, dtype=torch.long), patch=m)
    rows = torch.arange(n).numpy()
    w, b = fit_readouts(feats, rows, [1], l2=1e-9, patch=True)
    assert w.shape == (1, 2 * d, d) and reads_patch(w[0])
    assert torch.allclose(distilled_embed(w[0], b[0], z[:, 0], m[:, 0]), F.normalize(z[:, -1], dim=-1), atol=1e-4)
    assert torch.allclose(w[0, d:], q, atol=1e-4) and w[0, :d].abs().max() < 1e-3
    alone, _ = fit_readouts(feats, rows, [1], l2=1e-9)
    assert alone.shape == (1, d, d) and not reads_patch(alone[0])
    with pytest.raises(TGEMError, match="mean-patch readouts"):
        distilled_embed(w[0], b[0], z[:, 0])
    with pytest.raises(TGEMError, match="without mean-patch readouts"):
        fit_readouts(LayerFeatures(z, None, torch.zeros(n, dtype=torch.long)), rows, [1], patch=True)


def _profiles(C=6, D=8, n=2, seed=0, distilled=True):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    extra = {}
    if distilled:
        extra = {"readout_weight": torch.randn(n, D, D, generator=g), "readout_bias": torch.randn(n, D, generator=g),
                 "mix": torch.tensor([[0.7, 0.4], [0.2, 1.1]])[:n]}
    return ClassProfiles("cls", list(range(1, n + 1)), F.normalize(torch.randn(n, C, D, generator=g), dim=-1), None,
                         torch.full((n,), 20.0), text, 50.0, n + 1, **extra)


def test_mixed_logits_are_the_weighted_sum_of_both_readouts_also_over_a_shortlist():
    p = _profiles()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    t, d = p.parts(1, x)
    assert torch.allclose(t, 20.0 * F.normalize(x, dim=-1) @ p.protos[1].t())
    assert torch.allclose(d, 50.0 * distilled_embed(p.readout_weight[1], p.readout_bias[1], x) @ p.text.t())
    assert torch.allclose(p.logits(1, x), 0.2 * t + 1.1 * d)
    keep = p.logits(1, x).topk(3, dim=1).indices
    tk, dk = p.parts(1, x, keep)
    assert torch.allclose(tk, t.gather(1, keep), atol=1e-5) and torch.allclose(dk, d.gather(1, keep), atol=1e-5)
    plain = _profiles(distilled=False)
    assert plain.parts(1, x)[1] is None and torch.equal(plain.logits(1, x), plain.parts(1, x)[0])


def test_distilled_readouts_flops_are_counted_in_the_head():
    p, plain = _profiles(), _profiles(distilled=False)
    C, D = 6, 8
    assert p.scoring_flops() - plain.scoring_flops() == distilled_flops(D, C) + 3 * C
    assert exit_head_flops(p) - exit_head_flops(plain) == distilled_flops(D, C) + 3 * C + 6 * C
    assert JumperPolicy(p, Jumper(torch.zeros(2, 3), torch.zeros(2)), 0.5).head_flops == exit_head_flops(p)
    g = torch.Generator().manual_seed(1)
    wide = replace(p, readout_weight=torch.randn(2, 2 * D, D, generator=g), patch_flops=123.0)
    assert wide.reads_patch and not p.reads_patch
    assert wide.scoring_flops() - plain.scoring_flops() == distilled_flops(D, C, 2 * D) + 3 * C + 123.0
    assert distilled_flops(D, C, 2 * D) - distilled_flops(D, C) == 2 * D * D + 3 * D
    policy = JumperPolicy(wide, Jumper(torch.zeros(2, 3), torch.zeros(2)), 0.5)
    assert policy.needs_patch and policy.head_flops == exit_head_flops(wide)


def test_fit_mix_recovers_the_weights_of_a_mixture():
    g = torch.Generator().manual_seed(0)
    t, d = torch.randn(2000, 5, generator=g), torch.randn(2000, 5, generator=g)
    p = (0.3 * t + 1.5 * d).softmax(-1)
    assert torch.allclose(fit_mix([(t, d, p)])[0], torch.tensor([0.3, 1.5]), atol=1e-3)


def _save(tmp_path, bb, recipe, patch=False):
    L = bb.num_layers
    tgem = TGEM([1, 2], L, bb.embed_dim, bb.embed_dim, "cls", 0, recipe, patch)
    if recipe == "distilled":
        tgem.mix.copy_(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    width = NUM_SIGNALS + bb.embed_dim + NUM_SET_SIGNALS + NUM_TRAJ_SIGNALS
    return save_tgem(tmp_path / recipe, tgem, Jumper(torch.zeros(2, width), torch.zeros(2)), bb, {})


def test_checkpoints_carry_their_recipe_and_newer_or_unknown_ones_are_refused(tmp_path, tiny_backbone):
    bb = tiny_backbone
    path = _save(tmp_path, bb, "distilled")
    tgem, _, cfg = load_tgem(path, bb)
    assert cfg["format"] == 4 and tgem.recipe == "distilled" and not tgem.readout_patch
    prof = tgem.profiles(F.normalize(torch.randn(3, bb.embed_dim), dim=-1), bb)
    assert prof.distilled and torch.equal(prof.mix.cpu(), torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    assert not prof.reads_patch and prof.patch_flops == 0
    wide, _, wcfg = load_tgem(_save(tmp_path / "p", bb, "distilled", patch=True), bb)
    assert wcfg["readout_patch"] and wide.readout_weight.shape == (2, 2 * bb.embed_dim, bb.embed_dim)
    wprof = wide.profiles(F.normalize(torch.randn(3, bb.embed_dim), dim=-1), bb)
    assert wprof.reads_patch and wprof.patch_flops == bb.flops_patch_readout() > 0
    c = json.loads((path / "tgem.json").read_text())  # format 2: maps of z_l alone
    c.pop("readout_patch"), c.pop("sha256", None)
    (path / "tgem.json").write_text(json.dumps(c | {"format": 2}))
    assert not load_tgem(path, bb)[0].readout_patch
    old = _save(tmp_path, bb, "tgem")  # a format-1 checkpoint: no recipe, T-GEM profiles only
    cfg_file = old / "tgem.json"
    c = json.loads(cfg_file.read_text())
    c.pop("recipe"), c.pop("sha256", None)
    cfg_file.write_text(json.dumps(c | {"format": 1}))
    assert load_tgem(old, bb)[0].recipe == "tgem"
    for change, words in (({"format": 5}, "format 5"), ({"recipe": "ztw", "format": 4}, "unknown exit recipe 'ztw'")):
        cfg_file = path / "tgem.json"
        c = json.loads(cfg_file.read_text())
        c.pop("sha256", None)
        cfg_file.write_text(json.dumps(c | change))
        with pytest.raises(TGEMError, match=words) as e:
            load_tgem(path, bb)
        assert "\n" not in str(e.value)
