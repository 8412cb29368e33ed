"""T-GEMs end to end on a tiny trained CLIP: class profiles, the Jumper and its calibration (budget,
Learn-then-Test max_drop), fit + checkpoints, the classifier on the engine, the regularizer, baselines.

One tiny CLIP is pretrained on scenes for the module (a few seconds) and T-GEMs are fit once per space
on 600 images; everything else works on cached features or small hand-made tensors.
"""
import dataclasses
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import tgems
from tgems import TGEMError
from tgems.evaluation.baselines import ProbeExits, fit_probes, oracle_depth
from tgems.classifier import EarlyExitClassifier
from tgems.data import scenes
from tgems.evaluation.guarantee import guarantee_study
from tgems.evaluation.harness import analytic_flops
from tgems.features import extract_features
from tgems.calibration import (binom_cdf, calibrate_budget, calibrate_max_drop, clopper_pearson_upper, first_exit,
                               simulate, tau_grid)
from tgems.jumper import NUM_SIGNALS, Jumper, exit_head_flops, fit_jumper, jumper_signals
from tgems.profiles import layer_probs
from tgems.tgem import load_tgem, read_tgem_config, save_tgem
from tgems.training.fit import FitSettings, fit_tgem
from tgems.profiles import check_labels, class_embeddings, sample_profiles
from tgems.tgem import TGEM

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tgems.training.pretrain import pretrain

    out = tmp_path_factory.mktemp("tgems") / "clip"
    pretrain(out, preset="tiny", steps=20, threads=1, progress=False)
    return out


@pytest.fixture(scope="module")
def bb(clip_dir):
    return tgems.load_backbone(str(clip_dir))


@pytest.fixture(scope="module")
def L(bb):
    return bb.num_layers


@pytest.fixture(scope="module")
def train():
    return tgems.load_dataset("scenes:train:600")


@pytest.fixture(scope="module")
def test_data():
    return tgems.load_dataset("scenes:test:200")


@pytest.fixture(scope="module")
def train_feats(bb, train):
    return extract_features(bb, train, rates=True, progress=False)


@pytest.fixture(scope="module")
def test_feats(bb, test_data):
    return extract_features(bb, test_data, rates=True, progress=False)


@pytest.fixture(scope="module")
def fitted(bb, train, train_feats):
    """space -> (tgem, jumper, info), each fit once with 2 epochs."""
    return {space: fit_tgem(bb, train, FitSettings(space=space, epochs=2), feats=train_feats, progress=False)
            for space in ("cls", "rates")}


def make_classifier(bb, fitted, space, labels):
    tgem, jumper, info = fitted[space]
    return EarlyExitClassifier(bb, tgem, labels, info["templates"], jumper=jumper)


@pytest.fixture(scope="module")
def classifiers(bb, fitted, test_data, train, train_feats):
    """Fresh per call: cls and rates T-GEMs and the k-shot (sample-based) classifier on the test labels."""
    def build(kind):
        if kind == "sample":
            return EarlyExitClassifier.from_samples(bb, train, labels=test_data.classes, k=4, feats=train_feats)
        return make_classifier(bb, fitted, kind, test_data.classes)
    return build


# ---------------------------------------------------------------------------------------------- 1. shapes


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
    logits = prof.layer_logits(test_feats.space(space), test_feats.z[:, -1])
    assert logits.shape == (len(test_feats), L, C)
    probs = layer_probs(prof, test_feats)
    assert probs.shape == (len(test_feats), L, C)
    assert torch.allclose(probs.sum(-1), torch.ones(len(test_feats), L), atol=1e-5)
    # the agreement model reads the confidence signals, the budget (no-loss) model the readout z_l too
    assert jumper.weight.shape == (L - 1, NUM_SIGNALS) and jumper.bias.shape == (L - 1,)
    assert jumper.budget.weight.shape == (L - 1, NUM_SIGNALS + bb.embed_dim)


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


# ---------------------------------------------------------------------------------------------- 2. full CLIP at L


def test_fresh_cls_tgem_is_the_logit_lens(bb, L, test_feats):
    text = class_embeddings(bb, scenes.CLASSES[:10])
    tgem = TGEM(list(range(1, L)), L, bb.embed_dim, bb.embed_dim, "cls", hidden=16)
    raw = tgem.raw_profiles(text)
    assert torch.allclose(raw, text.expand(L - 1, -1, -1), atol=1e-6)
    prof = tgem.profiles(text, bb)
    logits = prof.layer_logits(test_feats.z, test_feats.z[:, -1])
    lens = torch.einsum("nld,cd->nlc", F.normalize(test_feats.z[:, :L - 1], dim=-1), text)
    assert torch.allclose(logits[:, :-1], tgem.log_scale.exp().detach()[None, :, None] * lens, atol=1e-4)


def _full_clip_zero_shot(clip_dir, images, labels, templates):
    """softmax(logit_scale * normalize(get_image_features) @ normalize(prompt-ensemble text)), computed
    straight from transformers (its own processor, tokenizer and model)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    proc = AutoImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = proc(images=[img for img in images], return_tensors="pt")["pixel_values"]
        img = F.normalize(feats(model.get_image_features(pixel_values=pixels)), dim=-1)
        per_template = []
        for t in templates:
            enc = tok([t.format(c) for c in labels], padding=True, return_tensors="pt")
            per_template.append(F.normalize(feats(model.get_text_features(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])), dim=-1))
        text = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        return (model.logit_scale.exp() * img @ text.t()).softmax(-1)


@pytest.mark.parametrize("space", ["cls", "rates"])
def test_last_layer_is_full_clip_zero_shot(clip_dir, bb, L, fitted, test_data, test_feats, space):
    labels = test_data.classes
    clf = make_classifier(bb, fitted, space, labels)
    ref = _full_clip_zero_shot(clip_dir, test_data.images, labels, clf.templates)
    probs = layer_probs(clf.profiles, test_feats)[:, -1]
    assert torch.allclose(probs, ref, atol=1e-5)
    _, preds = clf.layer_predictions(test_feats)
    assert torch.equal(preds[:, -1], ref.argmax(-1))
    # never exit: the engine runs every image to L and answers exactly as full CLIP
    clf = clf.with_tau(2.0)
    pred = clf.predict(test_data.images)
    assert pred.exit_layers.tolist() == [L] * len(test_data)
    assert pred.indices.tolist() == ref.argmax(-1).tolist()
    assert pred.labels == [labels[i] for i in ref.argmax(-1).tolist()]
    assert np.allclose(pred.probs, ref.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------- 3. calibration math


def _synthetic(n, seed, n_cand=3, num_classes=10):
    """Scores uniform in [0, 1]; a candidate layer agrees with the full model with probability
    0.75 + 0.25 * score (so the disagreement at score s is 0.25 (1 - s))."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n_cand, generator=g)
    full = torch.randint(0, num_classes, (n,), generator=g)
    agree = torch.rand(n, n_cand, generator=g) < 0.75 + 0.25 * scores
    preds = torch.where(agree, full[:, None], (full[:, None] + 1) % num_classes)
    return scores, torch.cat([preds, full[:, None]], 1)


def test_first_exit_and_simulate_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.1],
                           [0.1, 0.8, 0.1],
                           [0.1, 0.1, 0.1],
                           [0.5, 0.5, 0.95],
                           [0.2, 0.6, 0.7]])
    layer_preds = torch.tensor([[10, 11, 12, 13],
                                [20, 21, 22, 23],
                                [30, 31, 32, 33],
                                [40, 41, 42, 43],
                                [50, 51, 52, 53]])
    layers = [2, 4, 6, 8]
    assert first_exit(scores, 0.5).tolist() == [0, 1, 3, 0, 1]
    assert first_exit(scores, 0.85).tolist() == [0, 3, 3, 2, 3]
    assert first_exit(scores, 2.0).tolist() == [3] * 5
    assert first_exit(scores, 0.0).tolist() == [0] * 5
    preds, depth = simulate(scores, layer_preds, layers, 0.5)
    assert preds.tolist() == [10, 21, 33, 40, 51]
    assert depth.tolist() == [2, 4, 8, 2, 4]
    preds, depth = simulate(scores, layer_preds, layers, 0.7)
    assert preds.tolist() == [10, 21, 33, 42, 52]
    assert depth.tolist() == [2, 4, 8, 6, 6]


def test_tau_grid_order_and_thresholds_between_scores():
    scores, _ = _synthetic(300, 0)
    grid = tau_grid(scores, size=50)
    assert grid[0] == 2.0 and grid[-1] == 0.0
    assert np.all(np.diff(grid) < 0)
    assert len(grid) <= 52
    # no threshold sits on a score: an exit then never hinges on the last bit of a float
    assert not np.isin(grid.astype(np.float32), scores.numpy()).any()
    layer_preds = _synthetic(300, 0)[1]
    depths = [simulate(scores, layer_preds, [1, 2, 3, 4], float(t))[1].float().mean() for t in grid]
    assert all(a >= b for a, b in zip(depths, depths[1:]))  # lower tau, earlier exits


def _budget_cases(bb, fitted, test_feats, L):
    clf = make_classifier(bb, fitted, "cls", scenes.CLASSES)
    scores, preds = clf.layer_predictions(test_feats)
    s2, p2 = _synthetic(500, 1, n_cand=5)
    return [(scores, preds, clf.profiles.layers + [L], L, test_feats.labels),
            (s2, p2, [1, 2, 3, 4, 5, 6], 6, torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(2)))]


def test_calibrate_budget_respects_budget_and_grows_with_it(bb, L, fitted, test_feats):
    for scores, preds, layers, num_layers, labels in _budget_cases(bb, fitted, test_feats, L):
        sims = [simulate(scores, preds, layers, float(t)) for t in tau_grid(scores)]
        for target in (None, labels):
            ref = preds[:, -1] if target is None else target
            depths = []
            for budget in (layers[0] / num_layers, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0):
                tau = calibrate_budget(scores, preds, layers, num_layers, budget, target)
                p, d = simulate(scores, preds, layers, tau)
                mean = d.float().mean().item()
                assert mean / num_layers <= budget + 1e-9, (budget, tau, mean)
                # the best accuracy (agreement without labels) among the grid's thresholds within the budget
                best = max((q == ref).float().mean().item() for q, dq in sims
                           if dq.float().mean().item() / num_layers <= budget + 1e-9)
                assert (p == ref).float().mean().item() == pytest.approx(best)
                depths.append(mean)
            assert all(a <= b + 1e-12 for a, b in zip(depths, depths[1:])), depths
            assert depths[-1] > depths[0]


def test_binom_cdf_matches_direct_sum():
    for n in (1, 7, 30, 200):
        for p in (0.001, 0.05, 0.3, 0.5, 0.9):
            for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
                direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
                assert binom_cdf(k, n, p) == pytest.approx(direct, rel=1e-9, abs=1e-300)
    assert binom_cdf(0, 10, 0.0) == 1.0
    assert binom_cdf(9, 10, 1.0) == 0.0 and binom_cdf(10, 10, 1.0) == 1.0


def test_clopper_pearson_upper_known_values():
    for n in (1, 5, 20, 100, 1000):
        for delta in (0.01, 0.05, 0.1, 0.2):
            assert clopper_pearson_upper(0, n, delta) == pytest.approx(1 - delta ** (1 / n), rel=1e-10, abs=1e-14)
    assert clopper_pearson_upper(10, 10, 0.1) == 1.0
    ucbs = [clopper_pearson_upper(k, 50, 0.1) for k in range(51)]
    assert all(a < b for a, b in zip(ucbs, ucbs[1:-1]))
    assert all(u >= k / 50 for k, u in enumerate(ucbs))
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((1, 10), (3, 50), (9, 10), (10, 100), (57, 1000), (0, 400)):
        for delta in (0.05, 0.1):
            ref = stats.beta.ppf(1 - delta, k + 1, n - k)
            assert clopper_pearson_upper(k, n, delta) == pytest.approx(ref, rel=1e-7, abs=1e-12), (k, n, delta)


def test_calibrate_max_drop_keeps_the_bound_and_stops_at_the_first_failure():
    layers = [1, 2, 3, 4]
    scores, preds = _synthetic(1000, 3)
    full = preds[:, -1]
    n, delta = len(full), 0.1
    for eps in (0.02, 0.05, 0.1):
        tau, info = calibrate_max_drop(scores, preds, layers, eps, delta)
        p, d = simulate(scores, preds, layers, tau)
        k = int((p != full).sum())
        assert info["n"] == n and info["disagree"] == k
        assert info["ucb"] == pytest.approx(clopper_pearson_upper(k, n, delta))
        assert clopper_pearson_upper(k, n, delta) <= eps
        assert tau < 2.0 and d.float().mean() < 4  # something exits early
        grid = list(tau_grid(scores))
        nxt = grid[grid.index(tau) + 1]  # fixed sequence: the next, more aggressive threshold fails
        k2 = int((simulate(scores, preds, layers, float(nxt))[0] != full).sum())
        assert clopper_pearson_upper(k2, n, delta) > eps
    # eps below what n samples can ever certify (even 0 disagreements): never exit
    small_s, small_p = _synthetic(20, 4)
    tau, info = calibrate_max_drop(small_s, small_p, layers, 0.01, 0.1)
    assert tau == 2.0 and info["disagree"] == 0
    assert simulate(small_s, small_p, layers, tau)[1].tolist() == [4] * 20


# ---------------------------------------------------------------------------------------------- 4. guarantee


def test_max_drop_guarantee_holds_over_calibration_draws():
    """P(disagreement of the calibrated tau > eps) <= delta over calibration draws; the population
    disagreement is measured on 100k fresh samples. A naive rule (empirical disagreement <= eps)
    breaks the bound about half of the time on the same draws, so the check has teeth."""
    layers, eps, delta, draws = [1, 2, 3, 4], 0.05, 0.1, 40
    pop_s, pop_p = _synthetic(100_000, 0)

    def risk(tau):
        p, _ = simulate(pop_s, pop_p, layers, tau)
        return (p != pop_p[:, -1]).float().mean().item()

    broken = naive_broken = 0
    for i in range(draws):
        s, p = _synthetic(500, 1000 + i)
        tau, _ = calibrate_max_drop(s, p, layers, eps, delta)
        broken += risk(tau) > eps
        naive = 2.0
        for t in tau_grid(s):
            if (simulate(s, p, layers, float(t))[0] != p[:, -1]).float().mean() > eps:
                break
            naive = float(t)
        naive_broken += risk(naive) > eps
    assert broken <= (delta + 0.1) * draws, broken
    assert naive_broken >= 0.3 * draws and naive_broken > broken, (naive_broken, broken)


def test_guarantee_study_on_synthetic_pool():
    scores, preds = _synthetic(1000, 7)
    stub = SimpleNamespace(layer_predictions=lambda feats, goal: (scores, preds) if goal == "max_drop" else None,
                           profiles=SimpleNamespace(layers=[1, 2, 3], exit_layers=[1, 2, 3, 4]),
                           backbone=SimpleNamespace(num_layers=4))
    pool = list(range(1000))  # guarantee_study needs only len(pool) besides the stub's layer_predictions
    res = guarantee_study(stub, pool, eps=0.05, delta=0.1, n_splits=10, seed=0)
    assert res["n_splits"] == 10 and len(res["rows"]) == 10 and (res["n_calib"], res["n_test"]) == (500, 500)
    assert res["held"] >= (1 - 0.1 - 0.1) * 10
    assert all(r["calib_ucb"] <= 0.05 for r in res["rows"])
    assert res["mean_test_layers"] < 4


# ---------------------------------------------------------------------------------------------- 5. checkpoints


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


def test_checkpoint_refuses_another_backbone_and_non_checkpoints(bb, fitted, tmp_path):
    from tgems.training.pretrain import pretrain

    tgem, jumper, info = fitted["cls"]
    path = save_tgem(tmp_path / "ckpt", tgem, jumper, bb, info)
    pretrain(tmp_path / "other", preset="tiny", steps=1, seed=1, threads=1, progress=False)
    other = tgems.load_backbone(str(tmp_path / "other"))
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


# ---------------------------------------------------------------------------------------------- 6. engine


@pytest.mark.parametrize("kind", ["cls", "rates", "sample"])
def test_engine_equals_simulation(bb, L, classifiers, test_data, test_feats, kind):
    clf = classifiers(kind)
    _, layer_preds = clf.layer_predictions(test_feats)
    probs_all = layer_probs(clf.profiles, test_feats)
    seen_layers = set()
    for goal in ({"budget": 0.4}, {"budget": 0.6}, {"budget": 0.8}, {"max_drop": 0.3, "delta": 0.2}):
        clf = clf.calibrate(test_feats, allow_uncovered=True, **goal)
        preds, depth = clf.simulate(test_feats)
        pred = clf.predict(test_data.images)
        assert pred.exit_layers.tolist() == depth.tolist(), goal
        assert pred.indices.tolist() == preds.tolist(), goal
        col = torch.as_tensor([clf.profiles.layers.index(int(d)) if d < L else len(clf.profiles.layers)
                               for d in depth])
        assert np.allclose(pred.probs, probs_all[torch.arange(len(depth)), col].numpy(), atol=1e-5)
        flops = analytic_flops(bb, depth, clf.policy().candidate_layers, exit_head_flops(clf.profiles))
        assert torch.equal(torch.as_tensor(pred.flops), flops)
        assert np.allclose(pred.flops_ratio, pred.flops / bb.flops_full())
        assert pred.mean_layers == pytest.approx(depth.float().mean().item())
        seen_layers |= set(depth.tolist())
    assert len(seen_layers) >= 2, seen_layers  # the test exercised real early exits
    assert torch.equal(layer_preds, clf.layer_predictions(test_feats)[1])


@pytest.mark.parametrize("kind", ["cls", "rates"])
def test_predict_is_independent_of_batch_size_and_order(bb, classifiers, test_data, test_feats, kind):
    clf = classifiers(kind)
    # a seeded random Jumper over every signal and the threshold that spreads exits over the most layers,
    # so the test exercises real mixed exits whatever this barely trained model's own Jumper learned
    # (on it, one layer's score can be the same for every image)
    g = torch.Generator().manual_seed(0)
    n, width = len(clf.profiles.layers), NUM_SIGNALS + bb.embed_dim
    clf.jumper = Jumper(torch.randn(n, width, generator=g), torch.zeros(n))
    scores, layer_preds = clf.layer_predictions(test_feats)
    layers = clf.profiles.exit_layers
    clf = clf.with_tau(max(tau_grid(scores), key=lambda t: len(set(simulate(scores, layer_preds, layers, float(t))[1].tolist()))))
    images = test_data.images
    a = clf.predict(images, batch_size=256)
    b = clf.predict(images, batch_size=7)
    assert len(set(a.exit_layers.tolist())) >= 2
    assert np.array_equal(a.exit_layers, b.exit_layers) and np.array_equal(a.indices, b.indices)
    assert np.allclose(a.probs, b.probs, atol=1e-6) and np.array_equal(a.flops, b.flops)
    perm = np.random.default_rng(0).permutation(len(images))
    c = clf.predict(images[perm])
    assert np.array_equal(c.exit_layers, a.exit_layers[perm]) and np.array_equal(c.indices, a.indices[perm])
    assert np.allclose(c.probs, a.probs[perm], atol=1e-6)
    assert c.labels == [a.labels[i] for i in perm]


def test_jumper_targets(bb, fitted, test_data, test_feats):
    """`agree` learns P(layer l agrees with the full model) from the confidence signals; `no_loss` learns
    P(layer l is right or the full model is wrong) from those and z_l: where every label equals the full
    model's prediction its target is exactly agreement; with the true labels it is another model; it
    needs labels. `goal` holds both."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    probs = layer_probs(clf.profiles, test_feats)
    preds = probs.argmax(-1)
    signals = jumper_signals(probs, test_feats, clf.profiles.layers)
    y_agree = (preds[:, :-1] == preds[:, -1:]).float()
    full = preds[:, -1]
    as_full = dataclasses.replace(test_feats, labels=full)
    agree, same = fit_jumper(clf.profiles, test_feats, "agree"), fit_jumper(clf.profiles, as_full, "no_loss")
    assert agree.budget is None and same.budget is None
    expect = Jumper().fit(signals[..., :NUM_SIGNALS], y_agree)
    assert torch.equal(agree.weight, expect.weight) and torch.equal(agree.bias, expect.bias)
    expect = Jumper().fit(signals, y_agree)
    assert torch.equal(same.weight, expect.weight) and torch.equal(same.bias, expect.bias)
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


def test_each_goal_calibrates_and_runs_its_own_jumper_model(bb, fitted, test_data, test_feats):
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    probs = layer_probs(clf.profiles, test_feats)
    signals = jumper_signals(probs, test_feats, clf.profiles.layers)
    by_budget = clf.calibrate(test_feats, budget=0.6, allow_uncovered=True)
    assert by_budget.policy().jumper is clf.jumper.budget
    assert torch.equal(by_budget.layer_predictions(test_feats)[0], clf.jumper.budget.scores(signals))
    by_drop = clf.calibrate(test_feats, max_drop=0.3, delta=0.2, allow_uncovered=True)
    assert by_drop.policy().jumper is clf.jumper
    assert torch.equal(by_drop.layer_predictions(test_feats)[0], clf.jumper.scores(signals))
    # two calibrations do not interfere: each copy keeps its own goal and threshold, the original neither
    assert by_budget.goal == "budget" and by_drop.goal == "max_drop" and clf.calibration["source"] == "checkpoint"
    assert torch.equal(by_budget.layer_predictions(test_feats)[0], clf.jumper.budget.scores(signals))
    assert not torch.equal(clf.jumper.scores(signals), clf.jumper.budget.scores(signals))


def test_a_jumper_of_confidence_signals_only_reads_those(bb, fitted, test_data, test_feats):
    """Checkpoints from before z_l was a signal hold NUM_SIGNALS weights per layer and keep working."""
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    signals = jumper_signals(layer_probs(clf.profiles, test_feats), test_feats, clf.profiles.layers)
    assert signals.shape[-1] == NUM_SIGNALS + bb.embed_dim
    old = Jumper().fit(signals[..., :NUM_SIGNALS], (signals[..., 3] > 0).float())
    assert old.weight.shape[-1] == NUM_SIGNALS
    assert torch.equal(old.scores(signals), old.scores(signals[..., :NUM_SIGNALS]))
    assert torch.equal(old.score(2, signals[:, 2]), old.scores(signals)[:, 2])


def test_fit_refuses_an_unknown_jumper_target_before_training(bb, train, train_feats):
    with pytest.raises(TGEMError, match="unknown Jumper target"):
        fit_tgem(bb, train, FitSettings(jumper_target="accuracy", epochs=50), feats=train_feats, progress=False)


# ---------------------------------------------------------------------------------------------- 7. errors


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


def test_bad_calibration_goals_raise(classifiers, test_feats):
    clf = classifiers("cls")
    tau = clf.tau
    for kw in ({"budget": 0}, {"budget": 1.5}, {"budget": -0.2}, {"budget": 0.5, "max_drop": 0.05}, {},
               {"max_drop": 0}, {"max_drop": 1.0}, {"max_drop": 0.05, "delta": 0}, {"max_drop": 0.05, "delta": 1}):
        with pytest.raises(TGEMError):
            clf.calibrate(test_feats, allow_uncovered=True, **kw)
        assert clf.tau == tau  # a refused calibration leaves the classifier as it was
    full = clf.calibrate(test_feats, budget=1.0, allow_uncovered=True)
    assert full.calibration["goal"] == "budget" and full.calibration["calib_mean_layers"] <= clf.backbone.num_layers
    assert clf.tau == tau


# ---------------------------------------------------------------------------------------------- 8. regularizer


def _expected_depth(bb, train, train_feats, **kw):
    s = FitSettings(epochs=10, batch_size=64, r_target=0.2, seed=0, **kw)
    return fit_tgem(bb, train, s, feats=train_feats, progress=False)[2]["history"][-1]["expected_depth"]


def test_regularizer_lowers_expected_depth_with_default_soft_exits(bb, train, train_feats):
    """The default soft-exit threshold comes from the data (the full model's median top-1 probability on
    the training images), so on a 64-class problem with low confidences the regularizer still acts; a
    fixed 0.9 there made sigmoid(20 (conf - 0.9)) ~ 1e-7 and the expected depth stayed exactly 1.0."""
    off = _expected_depth(bb, train, train_feats, lam=0.0)
    on = _expected_depth(bb, train, train_feats, lam=10.0)
    assert on < off - 0.05, (on, off)
    fixed = _expected_depth(bb, train, train_feats, lam=10.0, soft_tau=0.9)
    assert fixed == pytest.approx(1.0, abs=1e-3)


def test_default_soft_tau_is_the_full_models_median_confidence(bb, train, train_feats):
    s = FitSettings(epochs=1, batch_size=256, seed=0)
    tgem, _, info = fit_tgem(bb, train, s, feats=train_feats, progress=False)
    present = sorted(set(train.labels.tolist()))
    text = class_embeddings(bb, [train.classes[i] for i in present], info["templates"])
    conf = (bb.logit_scale() * F.normalize(train_feats.z[:, -1], dim=-1) @ text.t()).softmax(-1).max(-1).values
    tau = info["settings"]["soft_tau"]
    assert 0 < tau < 0.9
    lo, hi = conf.quantile(0.35).item(), conf.quantile(0.65).item()  # the median of the fit's 80 % part
    assert lo <= tau <= hi, (lo, tau, hi)
    with pytest.raises(TGEMError, match="soft_tau"):
        fit_tgem(bb, train, FitSettings(soft_tau=1.5), feats=train_feats, progress=False)


def test_regularizer_lowers_expected_depth(bb, train, train_feats):
    """With soft exits whose threshold lies where this model's confidences are (64 classes: ~0.02-0.2),
    lambda > 0 and a low r_target train to a lower expected depth than lambda = 0, same seed."""
    off = _expected_depth(bb, train, train_feats, lam=0.0, soft_tau=0.1)
    on = _expected_depth(bb, train, train_feats, lam=10.0, soft_tau=0.1)
    assert on < off - 0.1, (on, off)


# ---------------------------------------------------------------------------------------------- 9. baselines


def test_probes_never_predict_classes_absent_from_training(bb, L, fitted, train_feats):
    C = len(scenes.CLASSES)
    layers = list(range(1, L))
    w, b = fit_probes(train_feats, layers, C, epochs=20, seed=0)
    assert w.shape == (L - 1, bb.embed_dim, C) and b.shape == (L - 1, C)
    absent = torch.ones(C, dtype=torch.bool)
    absent[train_feats.labels.unique()] = False
    assert absent.sum() == len(scenes.HELDOUT_CLASSES)
    assert torch.all(w[:, :, absent] == 0) and torch.all(b[:, absent] <= -1e3)
    heldout = extract_features(bb, tgems.load_dataset("scenes:heldout:120"), progress=False)
    probe = ProbeExits(w, b, make_classifier(bb, fitted, "cls", scenes.CLASSES).profiles)
    for feats in (heldout, train_feats):
        conf, preds = probe.layer_predictions(feats)
        assert conf.shape == (len(feats), L - 1) and preds.shape == (len(feats), L)
        assert not absent[preds[:, :-1]].any()
    # the probes learned something on their training data (chance is 1/52)
    _, preds = probe.layer_predictions(train_feats)
    assert (preds[:, -2] == train_feats.labels).float().mean() > 3 / 52


def test_oracle_depth_by_hand():
    layer_preds = torch.tensor([[5, 5, 5, 5],
                                [1, 5, 5, 5],
                                [5, 1, 5, 5],
                                [1, 2, 3, 5],
                                [5, 5, 1, 5],
                                [5, 1, 1, 5]])
    assert oracle_depth(layer_preds, [1, 2, 3, 4]).tolist() == [1, 2, 3, 4, 4, 4]
    assert oracle_depth(layer_preds[:, 1:], [4, 8, 12]).tolist() == [4, 4, 8, 12, 12, 12]


# ---------------------------------------------------------------------------------------------- 10. determinism


def test_fit_tgem_is_deterministic(bb, train, train_feats, tmp_path):
    def fit_and_save(name, seed, space="cls"):
        tgem, jumper, info = fit_tgem(bb, train, FitSettings(space=space, epochs=2, batch_size=128, seed=seed),
                                      feats=train_feats, progress=False)
        path = save_tgem(tmp_path / name, tgem, jumper, bb, info)
        return load_file(str(path / "tgem.safetensors")), info

    a, info_a = fit_and_save("a", 0)
    b, info_b = fit_and_save("b", 0)
    c, _ = fit_and_save("c", 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert info_a["history"] == info_b["history"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fit_with_ten_steps_in_all(bb, train, train_feats):
    """480 training images at batch 512 for 10 epochs: 10 optimizer steps (OneCycleLR's zero-division case)."""
    _, _, info = fit_tgem(bb, train, FitSettings(epochs=10), feats=train_feats, progress=False)
    assert len(info["history"]) == 10


def test_fit_refuses_bad_candidate_layers(bb, L, train, train_feats):
    for layers in ([0, 1], [L], [1, L + 2]):
        with pytest.raises(TGEMError, match="candidate layers"):
            fit_tgem(bb, train, FitSettings(epochs=1, layers=layers), feats=train_feats, progress=False)
