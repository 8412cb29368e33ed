"""Early-exit engine: per-row parity with encode_image, input order, compute accounting."""
import pytest
import torch

import tgems
from tgems import TGEMError
from tgems.backbones import flops as F
from tgems.engine import EngineResult, run_early_exit
from tgems.policies import ExitAtLayer, ExitPerRow, NeverExit

L = 5


@pytest.fixture(scope="module")
def bb(tmp_path_factory):
    from helpers import make_tiny_clip
    return tgems.load_backbone(str(make_tiny_clip(tmp_path_factory.mktemp("engine"), layers=L, width=32, heads=4)))


@pytest.fixture(scope="module")
def x():
    return torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def analytic(bb, k, visits=1, head=0.0):
    T, W, M, D = bb.num_tokens, bb.width, bb.mlp_dim, bb.embed_dim
    return F.flops_embed(T, W, bb.patch_size) + k * F.flops_block(T, W, M) + visits * (F.flops_readout(W, D) + head)


@pytest.mark.parametrize("k", range(1, L + 1))
def test_exit_at_layer(bb, x, k):
    res = run_early_exit(bb, x, ExitAtLayer(k))
    assert isinstance(res, EngineResult)
    assert (res.features - bb.encode_image(x, exit_layer=k)).abs().max() <= 1e-5
    assert res.exit_layers.tolist() == [k] * len(x)
    assert res.flops.dtype == torch.float64
    assert torch.all(res.flops == analytic(bb, k))
    assert res.mean_layers == k
    assert res.flops_ratio == pytest.approx(analytic(bb, k) / bb.flops_full())
    assert res.outputs is None


def test_head_flops_are_counted_per_visited_candidate(bb, x):
    class Late:
        candidate_layers = [1, 2, 3]
        head_flops = 1000.0

        def decide(self, layer, z, rows):
            return torch.full((len(rows),), layer == 3)

    res = run_early_exit(bb, x, Late())
    assert res.exit_layers.tolist() == [3] * len(x)
    assert torch.all(res.flops == analytic(bb, 3, visits=3, head=1000.0))
    single = ExitAtLayer(2)
    single.head_flops = 500.0
    assert torch.all(run_early_exit(bb, x, single).flops == analytic(bb, 2, head=500.0))


@pytest.mark.parametrize("batch_size", [None, 4])
def test_mixed_exits_match_single_images_in_order(bb, x, batch_size):
    layers = torch.randint(1, L + 1, (len(x),), generator=torch.Generator().manual_seed(3))
    res = run_early_exit(bb, x, ExitPerRow(layers), batch_size=batch_size)
    assert torch.equal(res.exit_layers, layers)
    for i in range(len(x)):
        single = bb.encode_image(x[i:i + 1], exit_layer=int(layers[i]))
        assert (res.features[i] - single[0]).abs().max() <= 1e-5, i
    readouts = sorted(set(layers.tolist()) | {L})
    visits = torch.tensor([sum(r <= int(k) for r in readouts) for k in layers])
    expected = torch.tensor([analytic(bb, int(k), int(v)) for k, v in zip(layers, visits)], dtype=torch.float64)
    assert torch.allclose(res.flops, expected, rtol=0, atol=1e-6)
    assert res.mean_layers == pytest.approx(layers.double().mean().item())
    assert res.flops_ratio == pytest.approx(expected.mean().item() / bb.flops_full())


def test_never_exit_equals_full(bb, x):
    res = run_early_exit(bb, x, NeverExit())
    assert (res.features - bb.encode_image(x)).abs().max() <= 1e-5
    assert res.exit_layers.tolist() == [L] * len(x)
    assert res.mean_layers == L
    assert res.flops_ratio == pytest.approx(1.0)


def test_callable_policy_reads_out_every_layer(bb, x):
    res = run_early_exit(bb, x, lambda layer, z, rows: torch.zeros(len(rows), dtype=torch.bool))
    assert res.exit_layers.tolist() == [L] * len(x)
    assert torch.all(res.flops == analytic(bb, L, visits=L))


def test_outputs_and_rows_come_back_in_input_order(bb, x):
    seen = {}

    class Tagger:
        candidate_layers = [2, 4]
        started = None

        def start(self, n):
            self.started = n

        def decide(self, layer, z, rows):
            seen.setdefault(layer, []).extend(rows.tolist())
            exit_now = (rows % 3 == 0) if layer == 2 else (rows % 3 == 1)
            out = torch.stack([rows.float(), torch.full((len(rows),), float(layer))], dim=1)
            return exit_now, out

    policy = Tagger()
    res = run_early_exit(bb, x, policy, batch_size=5)
    n = len(x)
    assert policy.started == n
    expected_layers = [2 if i % 3 == 0 else 4 if i % 3 == 1 else L for i in range(n)]
    assert res.exit_layers.tolist() == expected_layers
    assert res.outputs.shape == (n, 2)
    assert res.outputs[:, 0].tolist() == list(range(n))
    assert res.outputs[:, 1].tolist() == [float(k) for k in expected_layers]
    assert seen[2] == list(range(n))
    assert seen[4] == [i for i in range(n) if i % 3 != 0]
    assert seen[L] == [i for i in range(n) if i % 3 == 2]


def test_policy_gets_rates(bb, x):
    got = {}

    class RatePolicy:
        candidate_layers = [1, 3]
        needs_rates = True

        def decide(self, layer, z, rows, rates=None):
            got[layer] = rates
            return torch.zeros(len(rows), dtype=torch.bool)

    run_early_exit(bb, x, RatePolicy())
    ref = bb.hidden_states(x, rates=True)["rates"]
    assert set(got) == {1, 3, L}
    for layer, rates in got.items():
        assert torch.allclose(rates, ref[:, layer - 1], atol=1e-6)


def test_bad_policies(bb, x):
    with pytest.raises(TGEMError):
        run_early_exit(bb, x, ExitAtLayer(L + 1))
    with pytest.raises(TGEMError):
        run_early_exit(bb, x, ExitPerRow([1, 2]))
    with pytest.raises(TGEMError):
        run_early_exit(bb, x, lambda layer, z, rows: torch.zeros(len(rows) + 1, dtype=torch.bool))
    with pytest.raises(TGEMError):
        run_early_exit(bb, x, object())
    with pytest.raises(TGEMError):
        run_early_exit(bb, torch.zeros(2, 3, 16, 16), NeverExit())
