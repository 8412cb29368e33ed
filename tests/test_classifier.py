"""EarlyExitClassifier (tgems.classifier) on the engine: the last layer is full CLIP, the engine equals the
simulation on cached features, predictions do not depend on batching, each calibration goal runs its own
Jumper model, refused goals. On the session's tiny trained CLIP and its T-GEMs (tests/conftest.py)."""
import copy
import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tgem_helpers import L, bb, make_classifier, test_data, train  # noqa: F401 (fixtures)
from tgems import TGEMError
from tgems.calibration import simulate, tau_grid
from tgems.engine import full_flops
from tgems.classifier import EarlyExitClassifier
from tgems.training.jumper_fit import from_samples
from tgems.evaluation.harness import analytic_flops
from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, NUM_TAIL_SIGNALS, NUM_TRAJ_SIGNALS, Jumper, exit_head_flops, \
    jumper_signals
from tgems.profiles import layer_probs


@pytest.fixture
def classifiers(bb, fitted, test_data, train, train_feats):
    """Fresh per call: cls and rates T-GEMs and the k-shot (sample-based) classifier on the test labels."""
    def build(kind):
        if kind == "sample":
            return from_samples(bb, train, labels=test_data.classes, k=4, feats=train_feats)
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
    grid = tau_grid(clf.layer_predictions(test_feats)[0])
    goals = [{"budget": 0.4}, {"budget": 0.6}, {"budget": 0.8}, {"max_drop": 0.3, "delta": 0.2}]
    # thresholds between the scores too (safe from ties): the calibrations alone may all pick one layer
    for goal in goals + [{"tau": float(grid[len(grid) // 3])}, {"tau": float(grid[2 * len(grid) // 3])}]:
        clf = clf.with_tau(goal["tau"]) if "tau" in goal else clf.calibrate(test_feats, allow_uncovered=True, **goal)
        preds, depth = clf.simulate(test_feats)
        pred = clf.predict(test_data.images)
        assert pred.exit_layers.tolist() == depth.tolist(), goal
        assert pred.indices.tolist() == preds.tolist(), goal
        col = torch.as_tensor([clf.profiles.layers.index(int(d)) if d < L else len(clf.profiles.layers)
                               for d in depth])
        assert np.allclose(pred.probs, probs_all[torch.arange(len(depth)), col].numpy(), atol=1e-5)
        flops = analytic_flops(bb, depth, clf.policy().candidate_layers, exit_head_flops(clf.profiles))
        assert torch.equal(torch.as_tensor(pred.flops), flops)
        assert np.allclose(pred.flops_ratio, pred.flops / full_flops(bb, len(clf.labels)))
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
    n = len(clf.profiles.layers)
    width = NUM_SIGNALS + bb.embed_dim + NUM_SET_SIGNALS + NUM_TRAJ_SIGNALS + NUM_TAIL_SIGNALS
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
    probs, pairs = layer_probs(clf.profiles, test_feats, pairs=True)
    signals = jumper_signals(probs, test_feats, clf.profiles.layers, clf.profiles.text, pairs)
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



# ---------------------------------------------------------------------------------------------- construction


def test_a_classifier_without_a_jumper_is_refused_at_construction(bb, fitted):
    """T-GEM modules without their Jumper: a TGEMError when the classifier is built, not an AttributeError
    at the first predict."""
    tgem, jumper, info = fitted["cls"]
    with pytest.raises(TGEMError, match="needs a Jumper"):
        EarlyExitClassifier(bb, tgem, ["a red circle", "a blue square"])
    with pytest.raises(TGEMError, match="needs a Jumper"):
        EarlyExitClassifier(bb, tgem, ["a red circle", "a blue square"], info["templates"], jumper=None)
    assert EarlyExitClassifier(bb, tgem, ["a red circle", "a blue square"], jumper=jumper).jumper is not None


# ---------------------------------------------------------------------------------------------- calibration


def test_calibrate_returns_a_copy_and_leaves_the_original_unchanged(bb, fitted, test_data, test_feats):
    clf = make_classifier(bb, fitted, "cls", test_data.classes)
    before = copy.deepcopy(clf.calibration)
    preds, depth = clf.simulate(test_feats)
    by_drop = clf.calibrate(test_feats, max_drop=0.3, delta=0.2, allow_uncovered=True)
    assert by_drop is not clf and by_drop.calibration is not clf.calibration
    assert clf.calibration == before and clf.goal == "budget" and clf.calibration["source"] == "checkpoint"
    assert by_drop.goal == "max_drop" and by_drop.calibration["source"] == "calibrate"
    p, d = clf.simulate(test_feats)
    assert torch.equal(p, preds) and torch.equal(d, depth)  # the original still decides as before
    # a calibrated copy calibrated again is itself left as it was, and a hand-set threshold too
    drop_cal = copy.deepcopy(by_drop.calibration)
    by_budget = by_drop.calibrate(test_feats, budget=0.4, allow_uncovered=True)
    by_hand = by_budget.with_tau(0.123)
    assert by_drop.calibration == drop_cal and by_budget.goal == "budget" and by_budget.calibration["budget"] == 0.4
    assert by_hand.tau == 0.123 and by_budget.tau != 0.123 and by_hand.calibration["source"] == "user"
    by_hand.calibration["tau"] = 1.5  # the copies do not share their calibration records
    assert by_budget.tau != 1.5 and clf.calibration == before


def _reordered(feats, perm, rename=lambda t: t):
    """The same images with the dataset's class list in another order (labels re-indexed to follow it)."""
    classes = [rename(feats.classes[i]) for i in perm]
    new_index = torch.empty(len(perm), dtype=torch.long)
    new_index[torch.as_tensor(perm)] = torch.arange(len(perm))
    return dataclasses.replace(feats, classes=classes, labels=new_index[feats.labels])


def test_match_labels_maps_by_class_text_not_position(bb, fitted, test_feats):
    present = sorted(set(test_feats.labels.tolist()))
    labels = [test_feats.classes[c] for c in present]
    clf = make_classifier(bb, fitted, "cls", labels)
    perm = np.random.default_rng(0).permutation(len(test_feats.classes)).tolist()
    shuffled = _reordered(test_feats, perm)
    assert shuffled.classes != test_feats.classes
    assert [shuffled.classes[i] for i in shuffled.labels] == [test_feats.classes[i] for i in test_feats.labels]
    in_order = clf.match_labels(test_feats)
    assert [labels[i] for i in in_order] == [test_feats.classes[i] for i in test_feats.labels]
    assert torch.equal(clf.match_labels(shuffled), in_order)
    # case and spacing aside
    shouted = _reordered(test_feats, perm, rename=lambda t: "  " + t.upper().replace(" ", "   "))
    assert torch.equal(clf.match_labels(shouted), in_order)
    # so calibration on labels gives the same threshold whatever the order of the dataset's classes
    for goal in ({"budget": 0.5}, {"budget": 0.7}):
        a = clf.calibrate(test_feats, **goal)
        b = clf.calibrate(shuffled, **goal)
        assert a.calibration["labels_used"] and b.calibration["labels_used"]
        assert b.tau == a.tau and b.calibration == a.calibration


def test_match_labels_refuses_outside_and_missing_classes(bb, fitted, test_feats):
    present = sorted(set(test_feats.labels.tolist()))
    labels = [test_feats.classes[c] for c in present]
    absent = next(t for i, t in enumerate(test_feats.classes) if i not in set(present))
    fewer = make_classifier(bb, fitted, "cls", labels[1:])  # images of labels[0] are outside the label set
    for allow in (False, True):
        with pytest.raises(TGEMError, match="outside the label set") as e:
            fewer.match_labels(test_feats, allow_uncovered=allow)
        assert "\n" not in str(e.value) and f"'{labels[0]}'" in str(e.value)
        with pytest.raises(TGEMError, match="outside the label set"):
            fewer.calibrate(test_feats, budget=0.5, allow_uncovered=allow)
    more = make_classifier(bb, fitted, "cls", [*labels, absent])  # a label without images
    with pytest.raises(TGEMError, match="no image of 1 of") as e:
        more.match_labels(test_feats)
    assert "\n" not in str(e.value) and f"'{absent}'" in str(e.value)
    with pytest.raises(TGEMError, match="no image of"):
        more.calibrate(test_feats, budget=0.5)
    idx = more.match_labels(test_feats, allow_uncovered=True)
    assert [more.labels[i] for i in idx] == [test_feats.classes[i] for i in test_feats.labels]
    assert more.calibrate(test_feats, budget=0.5, allow_uncovered=True).calibration["labels_used"]
    # label-free calibration (agreement with the full model) takes images of any classes
    assert not fewer.calibrate(test_feats, budget=0.5, use_labels=False).calibration["labels_used"]


# ---------------------------------------------------------------------------------------------- save / load


def _assert_same_predictions(a, b):
    assert b.labels == a.labels
    assert np.array_equal(b.indices, a.indices) and np.array_equal(b.exit_layers, a.exit_layers)
    assert np.array_equal(b.flops, a.flops)
    assert np.allclose(b.probs, a.probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("space", ["cls", "rates"])
def test_save_load_round_trip(bb, fitted, test_data, test_feats, tmp_path, space):
    clf = make_classifier(bb, fitted, space, test_data.classes)
    images = test_data.images[:64]
    for goal in ({"budget": 0.6}, {"max_drop": 0.3, "delta": 0.2}):
        cal = clf.calibrate(test_feats, allow_uncovered=True, **goal)
        path = tmp_path / f"clf_{cal.goal}"
        assert cal.save(path) == path
        assert sorted(os.listdir(path)) == ["classifier.json", "classifier.safetensors"]
        assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in tmp_path.glob("clf_*"))  # no .tmp left
        back = EarlyExitClassifier.load(path, bb)
        assert back.labels == cal.labels and back.templates == cal.templates
        assert back.calibration == cal.calibration and back.goal == cal.goal and back.tau == cal.tau
        assert back.profiles.layers == cal.profiles.layers and back.profiles.space == space
        assert back.config == {"space": space}  # built from TGEM modules: no checkpoint data or settings to keep
        # the Jumper model of the goal survives (budget goals run the no-loss model, max_drop the agreement one)
        assert torch.equal(back.policy().jumper.weight, cal.policy().jumper.weight)
        for x, y in zip(cal.simulate(test_feats), back.simulate(test_feats)):
            assert torch.equal(x, y)
        _assert_same_predictions(cal.predict(images), back.predict(images))
    # the calibration is what was saved, not the checkpoint's: the two goals kept their own thresholds
    a = EarlyExitClassifier.load(tmp_path / "clf_budget", bb)
    b = EarlyExitClassifier.load(tmp_path / "clf_max_drop", bb)
    assert (a.goal, b.goal) == ("budget", "max_drop") and a.calibration["budget"] == 0.6
    assert b.calibration["max_drop"] == 0.3 and b.calibration["delta"] == 0.2
    # saving again replaces the earlier save
    a.with_tau(0.5).save(tmp_path / "clf_budget")
    assert EarlyExitClassifier.load(tmp_path / "clf_budget", bb).tau == 0.5


def test_load_without_a_backbone_loads_the_one_it_was_saved_with(bb, fitted, test_data, tmp_path):
    clf = make_classifier(bb, fitted, "cls", test_data.classes).with_tau(0.7)
    back = EarlyExitClassifier.load(clf.save(tmp_path / "clf"))
    assert back.backbone.fingerprint() == bb.fingerprint() and back.tau == 0.7
    _assert_same_predictions(clf.predict(test_data.images[:32]), back.predict(test_data.images[:32]))


def _one_line_error(fn, match):
    with pytest.raises(TGEMError, match=match) as e:
        fn()
    assert "\n" not in str(e.value).strip(), str(e.value)
    return str(e.value)


def test_load_refuses_another_backbone_and_damaged_files(bb, fitted, test_data, tmp_path, tiny_backbone):
    path = make_classifier(bb, fitted, "cls", test_data.classes).save(tmp_path / "clf")
    msg = _one_line_error(lambda: EarlyExitClassifier.load(path, tiny_backbone), "another backbone")
    assert str(path) in msg
    # not a saved classifier: a missing directory, an empty one, one file of the two
    empty = tmp_path / "empty"
    empty.mkdir()
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(path / "classifier.json", half / "classifier.json")
    for bad in (tmp_path / "missing", empty, half):
        _one_line_error(lambda: EarlyExitClassifier.load(bad, bb), "not a saved classifier")
    # a damaged classifier.json: not JSON, cut short, keys missing
    text = (path / "classifier.json").read_text()
    for i, damage in enumerate(("{not json", text[:len(text) // 2], "{}", "[]")):
        d = tmp_path / f"json{i}"
        shutil.copytree(path, d)
        (d / "classifier.json").write_text(damage)
        assert str(d / "classifier.json") in _one_line_error(lambda: EarlyExitClassifier.load(d, bb), "damaged")
    # a truncated or garbled classifier.safetensors
    data = (path / "classifier.safetensors").read_bytes()
    for i, damage in enumerate((data[:len(data) // 2], data[:7], b"", b"\x00" * 64)):
        d = tmp_path / f"tensors{i}"
        shutil.copytree(path, d)
        (d / "classifier.safetensors").write_bytes(damage)
        msg = _one_line_error(lambda: EarlyExitClassifier.load(d, bb), "classifier.safetensors")
        assert "damaged" in msg or "cannot read" in msg
