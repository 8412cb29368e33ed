"""The early-exit retrieval index (issue 14) on a tiny random-init CLIP: the label-free maps and scorer,
calibration, the engine-built index against the simulation and full CLIP, persistence and bad input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tgems
from tgems import TGEMError
from tgems.features import extract_features
from tgems.indexing import build_index, search
from tgems.retrieval import (INDEX_FILES, NEVER, EarlyExitIndex, calibrate_index, load_index_model, rank_failures,
                             write_index_model)
from tgems.training.index_fit import IndexFitSettings, fit_index_model

from tgems.calibration import simulate, tau_grid
from helpers import run_cli

QUERIES = ["a red circle", "a blue star", "a small green square", "a picture of a yellow triangle"]


@pytest.fixture(scope="module")
def data():
    return tgems.load_dataset("scenes:train:240")


@pytest.fixture(scope="module")
def gallery():
    return tgems.load_dataset("scenes:testall:60")


@pytest.fixture(scope="module")
def feats(tiny_backbone, data):
    return extract_features(tiny_backbone, data, progress=False)


@pytest.fixture(scope="module")
def gallery_feats(tiny_backbone, gallery):
    return extract_features(tiny_backbone, gallery, progress=False)


def _fit(bb, feats, seed=0):
    return fit_index_model(bb, None, IndexFitSettings(epochs=4, batch_size=64, seed=seed), feats=feats,
                           progress=False)


@pytest.fixture(scope="module")
def model(tiny_backbone, feats):
    return _fit(tiny_backbone, feats)[0]


def _spread_tau(model, f):
    """The threshold that spreads exits over the most layers, so tests see real mixed exits."""
    z = f.z
    scores = model.layer_scores(z, patch=f.patch)
    layers = model.layers + [model.maps.num_layers]
    preds = torch.zeros(len(z), len(layers))
    return max(tau_grid(scores), key=lambda t: len(set(simulate(scores, preds, layers, float(t))[1].tolist())))


def test_fit_is_deterministic_and_maps_beat_the_plain_readout(tiny_backbone, feats, model):
    again, info = _fit(tiny_backbone, feats)
    for a, b in zip(model.state().values(), again.state().values()):
        assert torch.equal(a, b)
    other = _fit(tiny_backbone, feats, seed=1)[0]
    assert not torch.equal(model.state()["maps.w1"], other.state()["maps.w1"])
    # trained to estimate z_L: on held-out images closer to it than the plain readout at every layer
    for row in info["per_layer_holdout"]:
        assert row["cos_to_final"] > row["plain_readout_cos"], row


def test_budget_one_is_full_clip_exactly(tiny_backbone, model, gallery, gallery_feats):
    tau, info = calibrate_index(model, gallery_feats.z, budget=1.0, patch=gallery_feats.patch)
    assert tau == NEVER and info["calib_mean_layers"] == tiny_backbone.num_layers
    index = EarlyExitIndex.build(tiny_backbone, gallery, model, tau=tau)
    assert index.exit_layers.tolist() == [tiny_backbone.num_layers] * len(gallery)
    assert index.flops_ratio >= 1.0
    full = F.normalize(tiny_backbone.encode_image(tiny_backbone.preprocess(gallery.images)), dim=-1)
    text = F.normalize(tiny_backbone.encode_text(QUERIES), dim=-1)
    ref = torch.sort(text @ full.t(), dim=1, descending=True, stable=True)
    hits = index.search_text(QUERIES, k=len(gallery))
    for q, row in enumerate(hits):
        assert [h.index for h in row] == ref.indices[q].tolist()
        assert np.allclose([h.score for h in row], ref.values[q].numpy(), atol=1e-5)
    assert [h.id for h in index.search_text(QUERIES[0], k=3)] == [gallery.name + f":{i}" for i in ref.indices[0, :3].tolist()]


@pytest.mark.parametrize("patch", [True, False], ids=["maps-read-m_l", "maps-of-z_l"])
def test_engine_index_equals_simulation_and_saves_compute(tiny_backbone, model, feats, gallery, gallery_feats, patch):
    if not patch:
        model = fit_index_model(tiny_backbone, None, IndexFitSettings(epochs=4, batch_size=64, readout_patch=False),
                                feats=feats, progress=False)[0]
    assert model.reads_patch == patch
    tau = _spread_tau(model, gallery_feats)
    emb, depth = model.simulate(gallery_feats.z, tau, gallery_feats.patch)
    assert len(set(depth.tolist())) >= 2  # real mixed exits
    index = EarlyExitIndex.build(tiny_backbone, gallery, model, tau=tau, batch_size=17)
    assert torch.equal(index.exit_layers, depth)
    assert torch.allclose(index.embeddings, emb, atol=1e-5)
    assert index.mean_layers == pytest.approx(depth.double().mean().item())
    bb = tiny_backbone
    visits = torch.tensor([sum(1 for l in model.layers if l <= d) + (d == bb.num_layers) for d in depth.tolist()])
    # the maps' mean-patch readout is counted in the head
    assert model.config.get("patch_flops", 0.0) == (bb.flops_patch_readout() if patch else 0.0)
    expect = bb.flops_embed() + depth.double() * bb.flops_block() + visits.double() * (bb.flops_readout()
                                                                                      + model.head_flops())
    assert torch.allclose(index.flops, expect)
    early = depth < bb.num_layers  # leaving early costs less than the whole encoder, heads included
    assert early.any() and (index.flops[early] < bb.flops_full()).all()


def test_budget_calibration_meets_the_budget(tiny_backbone, model, gallery_feats):
    L = tiny_backbone.num_layers
    for b in (0.5, 0.75, 0.9):
        tau, info = calibrate_index(model, gallery_feats.z, budget=b, patch=gallery_feats.patch)
        _, depth = model.simulate(gallery_feats.z, tau, gallery_feats.patch)
        assert depth.double().mean().item() / L <= b + 1e-9
        assert info["calib_mean_layers"] == pytest.approx(depth.double().mean().item())


def test_max_drop_calibration_bounds_rank_failures(tiny_backbone, model, gallery_feats):
    from tgems.calibration import clopper_pearson_upper
    z, m = gallery_feats.z, gallery_feats.patch
    text = F.normalize(tiny_backbone.encode_text(QUERIES + ["a purple ring", "an orange heart"]), dim=-1)
    eps, delta = 0.5, 0.2
    tau, info = calibrate_index(model, z, max_drop=eps, delta=delta, text=text, patch=m)
    est = model.layer_estimates(z, m)
    fails = rank_failures(est, text)
    assert fails[:, -1].sum() == 0
    e, depth = model.simulate(z, tau, m)
    k = int(sum(fails[i, (model.layers + [tiny_backbone.num_layers]).index(int(d))] for i, d in enumerate(depth)))
    assert k == info["disagree"] and info["ucb"] == pytest.approx(clopper_pearson_upper(k, len(z), delta))
    assert info["ucb"] <= eps
    # too few images to certify a tight eps: never exit
    assert calibrate_index(model, z, max_drop=0.001, delta=0.1, text=text, patch=m)[0] == NEVER


def test_save_load_round_trip_and_refusals(tiny_backbone, tiny_clip_factory, model, gallery, gallery_feats, tmp_path):
    tau = _spread_tau(model, gallery_feats)
    index = EarlyExitIndex.build(tiny_backbone, gallery, model, tau=tau, calibration={"goal": "test"})
    out = index.save(tmp_path / "idx")
    assert sorted(p.name for p in out.iterdir()) == sorted(INDEX_FILES)
    back = EarlyExitIndex.load(out, tiny_backbone)
    assert torch.equal(back.embeddings, index.embeddings) and torch.equal(back.exit_layers, index.exit_layers)
    assert torch.equal(back.flops, index.flops) and back.ids == index.ids and back.tau == index.tau
    assert [h.id for h in back.search_text("a red star", 5)] == [h.id for h in index.search_text("a red star", 5)]
    img = gallery.images[3]
    assert back.search_image(img, 1)[0].score == pytest.approx(index.search_image(img, 1)[0].score)
    # another backbone's index and model
    other = tgems.load_backbone(str(tiny_clip_factory(seed=1)))
    with pytest.raises(TGEMError, match="another backbone"):
        EarlyExitIndex.load(out, other)
    write_index_model(tmp_path / "m", model, tiny_backbone)
    with pytest.raises(TGEMError, match="another backbone"):
        load_index_model(tmp_path / "m", other)
    # damaged tensors, damaged header, missing file: one line naming the file (tgems.artifacts)
    raw = bytearray((out / INDEX_FILES[1]).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (out / INDEX_FILES[1]).write_bytes(bytes(raw))
    with pytest.raises(TGEMError, match="index.safetensors is damaged") as e:
        EarlyExitIndex.load(out, tiny_backbone)
    assert "\n" not in str(e.value)
    index.save(out)  # an earlier index may be replaced
    (out / INDEX_FILES[0]).write_text("{not json")
    with pytest.raises(TGEMError, match="index.json: damaged"):
        EarlyExitIndex.load(out, tiny_backbone)
    with pytest.raises(TGEMError, match="not a tgems index"):
        EarlyExitIndex.load(tmp_path, tiny_backbone)
    # never replaces something that is not an index
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "x.txt").write_text("x")
    with pytest.raises(TGEMError, match="refusing"):
        index.save(tmp_path / "keep")
    assert (tmp_path / "keep" / "x.txt").read_text() == "x"


def test_bad_queries_are_one_line_errors(tiny_backbone, model, gallery):
    index = EarlyExitIndex.build(tiny_backbone, gallery.subset(np.arange(10)), model, tau=NEVER)
    for q in ("", "   ", [], [""]):
        with pytest.raises(TGEMError, match="empty"):
            index.search_text(q, 3)
    for k in (0, -1, True, 2.5):
        with pytest.raises(TGEMError, match="k must be"):
            index.search_text("a red star", k)
    assert len(index.search_text("a red star", 100)) == 10


def test_build_and_search_calls(tiny_clip_dir, tiny_backbone, model, tmp_path):
    mdir = write_index_model(tmp_path / "model", model, tiny_backbone)
    out = tmp_path / "index"
    with pytest.raises(TGEMError):
        build_index(str(tiny_clip_dir), str(mdir), "scenes:test:30", out, budget=0.5, max_drop=0.1)
    assert not out.exists()
    info = build_index(str(tiny_clip_dir), str(mdir), "scenes:test:30", out, budget=0.75, n_calib=30)
    assert info["images"] == 30 and info["mean_layers"] / tiny_backbone.num_layers <= 0.75 + 1e-9
    header = json.loads((out / INDEX_FILES[0]).read_text())
    assert header["calibration"]["goal"] == "budget" and len(header["ids"]) == 30
    res = search(out, "a red circle", k=4, model=str(tiny_clip_dir))
    assert [h["rank"] for h in res["hits"]] == [1, 2, 3, 4]
    scores = [h["score"] for h in res["hits"]]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(TGEMError, match="empty"):
        search(out, " ", model=str(tiny_clip_dir))
    with pytest.raises(TGEMError, match="k must be"):
        search(out, "a red circle", k=0, model=str(tiny_clip_dir))


def test_cli_index_and_search(tiny_clip_dir, tiny_clip_factory, tiny_backbone, model, tmp_path, capsys):
    mdir = write_index_model(tmp_path / "model", model, tiny_backbone)
    out, js = tmp_path / "index", tmp_path / "index.json"
    rc, stdout, err = run_cli(capsys, "index", "--model", tiny_clip_dir, "--tgem", mdir, "--data", "scenes:test:30",
                           "--out", out, "--budget", "0.75", "--n-calib", "30", "--quiet", "--json", js)
    assert rc == 0, err
    assert "indexed 30 images" in stdout and json.loads(js.read_text())["images"] == 30
    rc, stdout, err = run_cli(capsys, "search", "--index", out, "a red circle", "--k", "3", "--json", tmp_path / "s.json")
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("1\tscenes:test:")
    assert len(json.loads((tmp_path / "s.json").read_text())["hits"]) == 3
    # bad input: one line on stderr, non-zero exit, nothing written
    other = tiny_clip_factory(seed=1)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x.txt").write_text("x")
    bad = [("search", "--index", out, "a red circle", "--k", "0"),
           ("search", "--index", out, "   "),
           ("search", "--index", out, "a red circle", "--model", other),
           ("search", "--index", tmp_path / "nowhere", "a red circle"),
           ("index", "--model", other, "--tgem", mdir, "--data", "scenes:test:10", "--out", tmp_path / "o2"),
           ("index", "--model", tiny_clip_dir, "--tgem", mdir, "--data", "scenes:test:10", "--out", keep)]
    for argv in bad:
        rc, stdout, err = run_cli(capsys, *argv, "--json", tmp_path / "bad.json")
        assert rc != 0 and len(err.strip().splitlines()) == 1 and err.startswith("tgems: error:"), (argv, err)
        assert not (tmp_path / "bad.json").exists() and not (tmp_path / "o2").exists()
    assert sorted(p.name for p in keep.iterdir()) == ["x.txt"]


def test_summary_line(tiny_backbone, model, gallery):
    from tgems.indexing import summary_line

    index = EarlyExitIndex.build(tiny_backbone, gallery.subset(np.arange(12)), model, tau=NEVER)
    line = summary_line(index, "a red circle", k=2)
    top = index.search_text("a red circle", 2)[0]
    assert "\n" not in line and top.id in line and f"{index.mean_layers:.2f} of {tiny_backbone.num_layers}" in line


def test_index_policy_creates_nothing_on_a_hard_coded_device(tiny_backbone, feats):
    """On PyTorch's meta device (shapes, no data) state or masks made on a fixed device would fail or stay
    on the CPU: the policy's tensors must follow its inputs (as tests/test_policies.py for the classifier)."""
    from tgems.retrieval import IndexPolicy

    meta = torch.device("meta")
    model = _fit(tiny_backbone, feats)[0].to(meta)
    policy = IndexPolicy(model, 0.5)
    n, D = 6, tiny_backbone.embed_dim
    policy.start(n)
    rows = torch.arange(n, device=meta)
    assert policy.needs_patch
    for l in model.layers + [tiny_backbone.num_layers]:
        active = rows[: n - l]
        x = torch.empty(len(active), D, device=meta)
        mask, out = policy.decide(l, x, active, patch=x)
        assert mask.device == meta and mask.dtype == torch.bool and mask.shape == (len(active),)
        assert out.device == meta and out.shape == (len(active), D)
        if l < tiny_backbone.num_layers:
            assert policy.prev_est.device == meta and policy.prev_z.device == meta


def test_maps_made_before_the_mean_patch_readouts_still_load_and_a_missing_readout_is_one_line(
        tiny_backbone, feats, model, gallery_feats, tmp_path):
    """A format-1 retrieval model (maps of z_l, no "patch" in its header) loads and scores as before; maps that
    read m_l, given none, refuse in one line instead of scoring something else."""
    old = fit_index_model(tiny_backbone, None, IndexFitSettings(epochs=4, batch_size=64, readout_patch=False),
                          feats=feats, progress=False)[0]
    d = write_index_model(tmp_path / "old", old, tiny_backbone)
    cfg = json.loads((d / "retrieval.json").read_text())
    for k in ("patch", "patch_flops"):
        cfg.pop(k)
    cfg["format"] = 1
    (d / "retrieval.json").write_text(json.dumps(cfg))
    back = load_index_model(d, tiny_backbone)
    assert not back.reads_patch and back.head_flops() == old.head_flops()
    assert torch.equal(back.layer_estimates(gallery_feats.z), old.layer_estimates(gallery_feats.z))
    new = load_index_model(write_index_model(tmp_path / "new", model, tiny_backbone), tiny_backbone)
    assert new.reads_patch and new.head_flops() > old.head_flops()
    assert torch.equal(new.layer_estimates(gallery_feats.z, gallery_feats.patch),
                       model.layer_estimates(gallery_feats.z, gallery_feats.patch))
    with pytest.raises(TGEMError, match="mean-patch readouts") as e:
        new.layer_estimates(gallery_feats.z)
    assert "\n" not in str(e.value)
    # a newer format than this tgems reads is refused by name
    cfg["format"] = 3
    (d / "retrieval.json").write_text(json.dumps(cfg))
    with pytest.raises(TGEMError, match="format 3"):
        load_index_model(d, tiny_backbone)
