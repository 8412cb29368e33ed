"""SiglipBackbone: exact parity with HF SiglipModel (every layer's readout through the attention-pooling
head, full image and text features, sigmoid zero-shot logits), preprocessing, FLOPs, fingerprint."""
import json

import numpy as np
import pytest
import torch

import tgems
from siglip_helpers import make_tiny_siglip
from tgems import TGEMError
from tgems.backbones import flops

CONFIGS = [
    dict(layers=2, width=32, heads=2, patch=8, image_size=32),
    dict(layers=5, width=24, heads=3, patch=4, image_size=16, mlp=40),
    dict(layers=3, width=48, heads=4, patch=16, image_size=48, text_width=16),
    dict(layers=4, width=16, heads=1, patch=8, image_size=24, max_length=12),
]
TEXTS = ["a red circle", "a photo of a dog on the grass", "blue", "zebra unknown words here",
         "a small red circle on a big blue square with stripes and dots in the center of the photo"]
TOL = 1e-5


def features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture
def siglip_factory(tmp_path):
    """Call with make_tiny_siglip keyword overrides; each call gets a fresh sub-directory."""
    counter = iter(range(1000))
    return lambda **kw: make_tiny_siglip(tmp_path / f"siglip{next(counter)}", **kw)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return make_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"))


@pytest.fixture(scope="module")
def siglip(siglip_dir):
    return tgems.load_backbone(str(siglip_dir))


def hf_reference(bb, x, texts):
    """What transformers computes: readouts from hidden_states[k], full features, text features, logits."""
    m = bb.model
    with torch.no_grad():
        hs = m.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        refs = [m.vision_model.head(m.vision_model.post_layernorm(h)) for h in hs]
        full = features(m.get_image_features(pixel_values=x))
        tok = bb.tokenizer(texts, padding="max_length", truncation=True,
                           max_length=m.config.text_config.max_position_embeddings, return_tensors="pt")
        text = features(m.get_text_features(**tok))
        logits = m(pixel_values=x, **tok).logits_per_image
    return hs, refs, full, text, logits


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['layers']}-W{c['width']}-P{c['patch']}-S{c['image_size']}")
def test_parity_with_hf(siglip_factory, cfg):
    from tgems.backbones.hf_siglip import SiglipBackbone

    bb = tgems.load_backbone(str(siglip_factory(**cfg)))
    L, W = cfg["layers"], cfg["width"]
    assert isinstance(bb, SiglipBackbone) and bb.family == "siglip" and bb.score_activation == "sigmoid"
    assert (bb.num_layers, bb.width, bb.embed_dim, bb.image_size, bb.patch_size) == \
        (L, W, W, cfg["image_size"], cfg["patch"])
    assert bb.num_tokens == (cfg["image_size"] // cfg["patch"]) ** 2
    assert bb.text_max_length == cfg.get("max_length", 16)
    torch.manual_seed(1)
    x = torch.randn(3, 3, cfg["image_size"], cfg["image_size"])
    hs, refs, full, text_ref, logits_ref = hf_reference(bb, x, TEXTS)
    assert len(hs) == L + 1 and hs[0].shape[1] == bb.num_tokens
    assert (bb.embed(x) - hs[0]).abs().max() <= TOL
    assert (bb.encode_image(x) - full).abs().max() <= TOL
    assert (refs[L] - full).abs().max() <= TOL
    for k in range(1, L + 1):
        assert (bb.encode_image(x, exit_layer=k) - refs[k]).abs().max() <= TOL, k
    out = bb.hidden_states(x, rates=True)
    assert out["z"].shape == (3, L, W)
    assert (out["z"] - torch.stack(refs[1:], dim=1)).abs().max() <= TOL
    assert out["rates"].shape == (3, L, bb.mlp_dim)
    with torch.no_grad():  # no class token: the mean of all tokens through post_layernorm
        prefs = torch.stack([bb.model.vision_model.post_layernorm(hs[k].mean(1)) for k in range(1, L + 1)], dim=1)
    assert (bb.hidden_states(x, patch=True)["patch"] - prefs).abs().max() <= TOL
    text = bb.encode_text(TEXTS)
    assert text.shape == (len(TEXTS), W)
    assert (text - text_ref).abs().max() <= TOL
    assert (bb.encode_text(TEXTS, batch_size=2) - text_ref).abs().max() <= TOL
    logits = bb.zero_shot_logits(bb.encode_image(x), text)
    assert logits.shape == logits_ref.shape == (3, len(TEXTS))
    assert (logits - logits_ref).abs().max() <= TOL


def test_scoring_uses_scale_and_bias(siglip):
    assert siglip.logit_scale() == pytest.approx(10.0, rel=1e-6)
    assert siglip.logit_bias() == pytest.approx(-2.0, rel=1e-6)
    img, txt = torch.randn(2, siglip.embed_dim), torch.randn(3, siglip.embed_dim)
    cos = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    assert torch.allclose(siglip.zero_shot_logits(img, txt), 10 * cos - 2, atol=1e-5)


def test_text_is_padded_to_max_length(siglip):
    """SigLIP pools the last position: a text's embedding must not depend on its batch."""
    alone = torch.cat([siglip.encode_text([t]) for t in TEXTS])
    assert (alone - siglip.encode_text(TEXTS)).abs().max() <= TOL


def test_load_backbone_picks_siglip_by_model_type(siglip_dir):
    from tgems.backbones import backbone_class
    from tgems.backbones.hf_siglip import SiglipBackbone

    assert json.loads((siglip_dir / "config.json").read_text())["model_type"] == "siglip"
    assert backbone_class("siglip") is SiglipBackbone
    bb = tgems.load_backbone(siglip_dir, dtype="float32")
    assert type(bb) is SiglipBackbone and "SiglipBackbone" in repr(bb)


def test_fingerprint(siglip, siglip_dir, siglip_factory, tiny_backbone):
    fp = siglip.fingerprint()
    assert len(fp) == 16 and siglip.fingerprint() == fp
    assert tgems.load_backbone(str(siglip_dir)).fingerprint() == fp
    assert tgems.load_backbone(str(siglip_factory(seed=0))).fingerprint() == fp
    assert tgems.load_backbone(str(siglip_factory(seed=1))).fingerprint() != fp
    assert tiny_backbone.fingerprint() != fp


def hf_pixels(path, images):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    hf = SiglipImageProcessorPil.from_pretrained(str(path))
    return torch.as_tensor(np.asarray(hf(images=images, return_tensors="np")["pixel_values"]))


def test_preprocess_matches_siglip_image_processor(siglip, siglip_dir):
    from PIL import Image

    rng = np.random.default_rng(0)
    resized = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
               for h, w in [(48, 40), (40, 64), (33, 33), (20, 90)]]
    resized.append(Image.fromarray(rng.integers(0, 256, (50, 45), dtype=np.uint8)))
    ours, ref = siglip.preprocess(resized), hf_pixels(siglip_dir, resized)
    assert ours.shape == ref.shape == (5, 3, 32, 32) and ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 1e-2
    exact = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ref = hf_pixels(siglip_dir, [Image.fromarray(a) for a in exact])
    assert ref.min() < -0.9 and ref.max() > 0.9  # mean/std 0.5 map [0, 255] to [-1, 1]
    for given in (exact, list(exact), [Image.fromarray(a) for a in exact]):
        assert (siglip.preprocess(given) - ref).abs().max() <= 1e-5


def test_preprocess_defaults_and_overrides(siglip_factory):
    """No preprocessor config: SigLIP's own defaults (square resize, 0.5/0.5); the config's mean/std win."""
    from PIL import Image

    images = [Image.fromarray(a) for a in np.random.default_rng(3).integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)]
    with_config = siglip_factory(image_size=16, patch=4)
    bare = tgems.load_backbone(str(siglip_factory(image_size=16, patch=4, preprocessor=False)))
    assert not (bare.path / "preprocessor_config.json").exists()
    assert bare.transform.mean == bare.transform.std == (0.5, 0.5, 0.5)
    assert (bare.preprocess(images) - hf_pixels(with_config, images)).abs().max() <= 1e-2
    custom = siglip_factory(image_size=16, patch=4, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4])
    bb = tgems.load_backbone(str(custom))
    assert bb.transform.mean == (0.4, 0.5, 0.6) and bb.transform.std == (0.2, 0.3, 0.4)
    assert (bb.preprocess(images) - hf_pixels(custom, images)).abs().max() <= 1e-2


def test_flops_count_the_pooling_head(siglip):
    bb = siglip
    T, W, M = bb.num_tokens, bb.width, bb.mlp_dim
    head = 2 * W * W + 4 * T * W * W + 4 * T * W + 2 * W * W + 4 * W * M
    assert bb.flops_readout() == flops.flops_attention_pool(T, W, M) == head
    assert bb.flops_readout() > flops.flops_readout(W, bb.embed_dim)
    assert bb.flops_block() == flops.flops_block(T, W, M)
    assert bb.flops_embed() == 2 * T * 3 * bb.patch_size ** 2 * W + T * W
    assert bb.flops_full() == bb.flops_embed() + bb.num_layers * bb.flops_block() + head


def test_flops_of_the_head_match_a_counted_forward(siglip):
    """torch's FLOP counter over the head on one image gives the analytic count exactly (in train mode, so
    that nn.MultiheadAttention takes its counted path rather than the fused inference kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    head = siglip.model.vision_model.head
    h = torch.randn(1, siglip.num_tokens, siglip.width)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            head.train()(h)
    finally:
        head.eval()
    assert counter.get_total_flops() == siglip.flops_readout()


def test_rejects_a_tower_without_head(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    from helpers import make_tokenizer

    tokenizer = make_tokenizer()
    cfg = SiglipConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
                       vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, patch_size=8, image_size=16,
                                          vision_use_head=False))
    SiglipModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TGEMError, match="vision_use_head=False"):
        tgems.load_backbone(str(tmp_path))


def test_bad_inputs(siglip):
    with pytest.raises(TGEMError):
        siglip.encode_image(torch.zeros(1, 3, 16, 16))
    with pytest.raises(TGEMError):
        siglip.encode_image(torch.zeros(1, 3, 32, 32), exit_layer=siglip.num_layers + 1)
    with pytest.raises(TGEMError):
        siglip.encode_text(["ok", ""])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_dtypes(siglip, siglip_dir, dtype):
    """The pooling head (nn.MultiheadAttention) and the max-length text path run in half precision too."""
    bb = tgems.load_backbone(str(siglip_dir), dtype=dtype)
    x, texts = torch.randn(2, 3, 32, 32), TEXTS[:3]
    for k in (1, bb.num_layers):
        z = bb.encode_image(x, exit_layer=k)
        assert z.dtype == getattr(torch, dtype)
        cos = torch.nn.functional.cosine_similarity(z.float(), siglip.encode_image(x, exit_layer=k), dim=-1)
        assert cos.min() > 0.99, (k, cos)
    logits = bb.zero_shot_logits(bb.encode_image(x), bb.encode_text(texts))
    ref = siglip.zero_shot_logits(siglip.encode_image(x), siglip.encode_text(texts))
    assert logits.dtype == torch.float32 and (logits - ref).abs().max() < 0.2


# ------------------------------------------------------------------ the whole chain on a tiny SigLIP


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny SigLIP at the scenes' 32 px (its tokenizer knows every scenes word, so no two class texts
    collapse), saved and loaded by path, and T-GEMs fit on it for 2 epochs in both spaces (the `rates`
    one reads the MLP activation rates of SigLIP's blocks)."""
    from tgems.data import scenes
    from tgems.tgem import save_tgem
    from tgems.training.fit import FitSettings, fit_tgem

    root = tmp_path_factory.mktemp("siglip_chain")
    path = make_tiny_siglip(root / "model", layers=4, width=32, heads=2, patch=8, image_size=32,
                            words=scenes.vocabulary())
    bb = tgems.load_backbone(str(path))
    train = tgems.load_dataset("scenes:train:300")
    tgem, jumper, info = fit_tgem(bb, train, FitSettings(epochs=2), progress=False)
    r_tgem, r_jumper, r_info = fit_tgem(bb, train, FitSettings(epochs=2, space="rates"), progress=False)
    return (bb, save_tgem(root / "tgem", tgem, jumper, bb, info),
            save_tgem(root / "tgem_rates", r_tgem, r_jumper, bb, r_info))


def test_chain_fit_calibrate_predict(chain, tiny_backbone, tmp_path):
    from tgems.engine import full_flops
    from tgems.jumper import exit_head_flops
    from tgems.tgem import load_tgem

    bb, tgem_dir, _ = chain
    tgem, _, cfg = load_tgem(tgem_dir, bb)
    assert cfg["fingerprint"] == bb.fingerprint() and tgem.layers == [1, 2, 3]
    with pytest.raises(TGEMError, match="another backbone"):
        load_tgem(tgem_dir, tiny_backbone)

    calib, test = tgems.load_dataset("scenes:calib:300"), tgems.load_dataset("scenes:test:40")
    labels = [calib.classes[i] for i in np.unique(calib.labels)]
    clf = tgems.EarlyExitClassifier(bb, str(tgem_dir), labels)
    cal = clf.calibrate(calib, budget=0.5)
    assert cal is not clf and cal.goal == "budget" and clf.calibration["source"] == "checkpoint"

    pred = cal.predict(test.images)
    L = bb.num_layers
    assert len(pred.labels) == 40 and set(pred.labels) <= set(labels)
    assert set(pred.exit_layers.tolist()) <= {1, 2, 3, L}
    # the engine's exits equal the simulation on cached features (the readout is the pooling head)
    sim_preds, sim_layers = cal.simulate(cal.features(test))
    assert np.array_equal(np.asarray(sim_layers), pred.exit_layers)
    assert np.array_equal(np.asarray(sim_preds), pred.indices)
    # never exiting early, the classifier is SigLIP itself: sigmoid(scale * cos + bias) over the labels
    whole = cal.with_tau(2.0).predict(test.images)
    z = bb.encode_image(bb.preprocess(test.images))
    assert (whole.exit_layers == L).all() and np.abs(whole.embeddings - z.numpy()).max() <= 1e-5
    probs = torch.sigmoid(bb.zero_shot_logits(z, cal.text)).numpy()
    assert np.abs(whole.probs - probs).max() <= 1e-5 and np.array_equal(whole.indices, probs.argmax(1))
    # every candidate visited pays the pooling head (K/V over all tokens), not a cheap projection
    head = exit_head_flops(cal.profiles)
    assert np.allclose(whole.flops, bb.flops_full() + head + 3 * (bb.flops_readout() + head))
    assert np.allclose(pred.flops, pred.flops_ratio * full_flops(bb, len(labels)))

    saved = tgems.EarlyExitClassifier.load(cal.save(tmp_path / "clf"), bb)
    again = saved.predict(test.images)
    assert np.array_equal(again.exit_layers, pred.exit_layers) and again.labels == pred.labels


def test_chain_eval(chain):
    from tgems.evaluation.harness import run_eval

    bb, tgem_dir, rates_dir = chain
    calib, test = tgems.load_dataset("scenes:calib:300"), tgems.load_dataset("scenes:test:100")
    report = run_eval(bb, [str(tgem_dir), str(rates_dir)], test, calib, speed=False, progress=False,
                      log=lambda *a: None)
    rows = [r for r in report["results"] if r["split"] == "all"]
    assert {"full", "static", "lens", "oracle", "tgem_cls", "tgem_rates"} <= {r["method"] for r in rows}
    full = next(r for r in rows if r["method"] == "full")
    assert full["mean_layers"] == bb.num_layers and full["agreement"] == 1.0 and full["n"] == 100
    tgem = {r["budget"]: r for r in rows if r["method"] == "tgem_cls"}
    assert sorted(tgem) == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert tgem[0.3]["mean_layers"] < bb.num_layers and tgem[0.3]["flops_ratio"] < 1
