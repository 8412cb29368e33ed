"""Exit policies (tgems.policies): every tensor a policy creates takes its device from its inputs.

No GPU is needed to prove that much: on PyTorch's "meta" device (shapes without data) a policy whose state
or masks were made on a hard-coded device (e.g. `torch.zeros(n, C)`, which is the CPU) mixes devices and
fails, or leaves state on the CPU that the test sees."""
import pytest
import torch

from tgem_helpers import bb, make_classifier  # noqa: F401 (fixtures)
from tgems.features import RATES_DTYPE
from tgems.policies import ExitAtLayer, ExitPerRow, JumperPolicy, NeverExit

META = torch.device("meta")


def _on_meta(t):
    assert isinstance(t, torch.Tensor) and t.device == META, t.device
    return t


@pytest.mark.parametrize("space", ["cls", "rates"])
def test_jumper_policy_creates_nothing_on_a_hard_coded_device(bb, fitted, space):
    clf = make_classifier(bb, fitted, space, ["a red circle", "a blue square", "a green star"])
    policy = JumperPolicy(clf.profiles.to(META), clf.jumper.to(META), 0.5)
    n, C = 10, 3
    policy.start(n)
    rows = torch.arange(n, device=META)
    z = torch.empty(n, bb.embed_dim, device=META)
    rates = torch.empty(n, bb.mlp_dim, dtype=RATES_DTYPE, device=META) if space == "rates" else None
    for l in clf.profiles.exit_layers:  # every candidate layer (the first has no previous one), then L
        active = rows[: n - l]  # fewer rows each layer, as rows exit
        zl = z[: len(active)]
        extra = {} if rates is None else {"rates": rates[: len(active)]}
        if policy.needs_patch and l < bb.num_layers:  # the mean-patch readouts, as the engine passes them
            extra["patch"] = z[: len(active)].clone()
        mask, probs = policy.decide(l, zl, active, **extra)
        assert _on_meta(mask).dtype == torch.bool and mask.shape == (len(active),)
        assert _on_meta(probs).shape == (len(active), C)
        if l < bb.num_layers:  # the per-row state of the previous candidate layer follows the inputs too
            assert _on_meta(policy.prev_p).shape == (n, C) and _on_meta(policy.prev_z).shape == (n, bb.embed_dim)


def test_fixed_policies_follow_their_inputs_device():
    rows = torch.arange(4, device=META)
    z = torch.empty(4, 8, device=META)
    assert _on_meta(ExitAtLayer(2).decide(2, z, rows)).shape == (4,)
    assert _on_meta(NeverExit().decide(3, z, rows)).shape == (4,)
    per_row = ExitPerRow([1, 2, 2, 3])
    per_row.start(4)
    assert _on_meta(per_row.decide(2, z, rows)).shape == (4,)
