"""EarlyExitClassifier (tgems.classifier) on the engine: the last layer is full CLIP, the engine equals the
simulation on cached features, predictions do not depend on batching, each calibration goal runs its own
Jumper model, refused goals. On the session's tiny trained CLIP and its T-GEMs (tests/conftest.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tgem_helpers import L, bb, make_classifier, test_data, train  # noqa: F401 (fixtures)
from tgems import TGEMError
from tgems.calibration import simulate, tau_grid
from tgems.classifier import EarlyExitClassifier
from tgems.evaluation.harness import analytic_flops
from tgems.jumper import NUM_SIGNALS, Jumper, exit_head_flops, jumper_signals
from tgems.profiles import layer_probs


@pytest.fixture
def classifiers(bb, fitted, test_data, train, train_feats):
    """Fresh per call: cls and rates T-GEMs and the k-shot (sample-based) classifier on the test labels."""
    def build(kind):
        if kind == "sample":
            return EarlyExitClassifier.from_samples(bb, train, labels=test_data.classes, k=4, feats=train_feats)
        return make_classifier(bb, fitted, kind, test_data.classes)
    return build


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
def test_last_layer_is_full_clip_zero_shot(trained_clip_dir, bb, L, fitted, test_data, test_feats, space):
    labels = test_data.classes
    clf = make_classifier(bb, fitted, space, labels)
    ref = _full_clip_zero_shot(trained_clip_dir, test_data.images, labels, clf.templates)
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


