"""CLIPBackbone: exact parity with the HF model, preprocessing, input errors, fingerprint."""
import json

import numpy as np
import pytest
import torch

import tgems
from tgems import TGEMError
from tgems import pretrained

CONFIGS = [
    dict(layers=2, width=32, heads=2, patch=8, image_size=32),
    dict(layers=7, width=24, heads=3, patch=4, image_size=16, mlp=40),
    dict(layers=3, width=48, heads=4, patch=16, image_size=48),
    dict(layers=5, width=16, heads=1, patch=8, image_size=24, projection=8),
]
TEXTS = ["a red circle", "a photo of a dog on the grass", "blue", "zebra unknown words here"]


def features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"L{c['layers']}-W{c['width']}-P{c['patch']}")
def test_parity_with_hf(tiny_clip_factory, cfg):
    bb = tgems.load_backbone(str(tiny_clip_factory(**cfg)))
    m, L = bb.model, cfg["layers"]
    assert (bb.num_layers, bb.width, bb.image_size, bb.patch_size) == (L, cfg["width"], cfg["image_size"], cfg["patch"])
    assert bb.num_tokens == (cfg["image_size"] // cfg["patch"]) ** 2 + 1
    torch.manual_seed(1)
    x = torch.randn(3, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        full = features(m.get_image_features(pixel_values=x))
        hs = m.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        refs = [m.visual_projection(m.vision_model.post_layernorm(hs[k][:, 0])) for k in range(L + 1)]
        tok = bb.tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
        text_ref = features(m.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
    assert len(hs) == L + 1
    assert (bb.encode_image(x) - full).abs().max() <= 1e-5
    assert (bb.encode_image(x, exit_layer=L) - full).abs().max() <= 1e-5
    assert (bb.embed(x) - hs[0]).abs().max() <= 1e-5
    for k in range(1, L + 1):
        assert (bb.encode_image(x, exit_layer=k) - refs[k]).abs().max() <= 1e-5, k
    out = bb.hidden_states(x, rates=True)
    assert out["layers"] == list(range(1, L + 1))
    assert out["z"].shape == (3, L, bb.embed_dim)
    assert (out["z"] - torch.stack(refs[1:], dim=1)).abs().max() <= 1e-5
    assert out["rates"].shape == (3, L, bb.mlp_dim)
    assert out["rates"].min() >= 0 and out["rates"].max() <= 1
    with torch.no_grad():  # mean-patch readouts: the patch tokens' mean (not the class token) through the head
        prefs = [m.visual_projection(m.vision_model.post_layernorm(hs[k][:, 1:].mean(1))) for k in range(1, L + 1)]
    patch = bb.hidden_states(x, patch=True)["patch"]
    assert patch.shape == (3, L, bb.embed_dim) and (patch - torch.stack(prefs, dim=1)).abs().max() <= 1e-5
    assert (patch - out["z"]).abs().max() > 1e-3 and "patch" not in out
    text = bb.encode_text(TEXTS)
    assert text.shape == (len(TEXTS), bb.embed_dim)
    assert (text - text_ref).abs().max() <= 1e-5
    assert (bb.encode_text(TEXTS, batch_size=3) - text_ref).abs().max() <= 1e-5


def test_hidden_states_subset_and_chunks(tiny_backbone):
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    full = tiny_backbone.hidden_states(x, rates=True)
    part = tiny_backbone.hidden_states(x, layers=[3, 1], rates=True, batch_size=2)
    assert part["layers"] == [1, 3]
    assert (part["z"] - full["z"][:, [0, 2]]).abs().max() <= 1e-5
    assert (part["rates"] - full["rates"][:, [0, 2]]).abs().max() <= 1e-6
    assert "rates" not in tiny_backbone.hidden_states(x, layers=[2])


def test_block_rates_count_positive_fc1_outputs(tiny_backbone):
    bb = tiny_backbone
    h = bb.embed(torch.randn(2, 3, 32, 32))
    layer = bb.model.vision_model.encoder.layers[0]
    with torch.no_grad():
        pre = layer.mlp.fc1(layer.layer_norm2(h + layer.self_attn(layer.layer_norm1(h))[0]))
        h1, rates = bb.block(1, h, return_rates=True)
    assert (h1 - bb.block(1, h)).abs().max() == 0
    assert torch.allclose(rates, (pre > 0).float().mean(1), atol=1e-6)
    assert not layer.mlp.fc1._forward_hooks


def test_preprocess_matches_clip_image_processor(tiny_backbone):
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil.from_pretrained(str(tiny_backbone.path))
    rng = np.random.default_rng(0)
    resized = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(48, 40), (40, 64), (33, 33)]]
    resized.append(Image.fromarray(rng.integers(0, 256, (50, 45), dtype=np.uint8)))
    ours = tiny_backbone.preprocess(resized)
    ref = torch.as_tensor(np.asarray(hf(images=resized, return_tensors="np")["pixel_values"]))
    assert ours.shape == ref.shape == (4, 3, 32, 32) and ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 1e-2
    exact = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ref = torch.as_tensor(np.asarray(hf(images=[Image.fromarray(a) for a in exact], return_tensors="np")["pixel_values"]))
    for given in (exact, list(exact), [Image.fromarray(a) for a in exact]):
        assert (tiny_backbone.preprocess(given) - ref).abs().max() <= 1e-5


def test_preprocess_resize_then_crop(tiny_clip_factory):
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = tiny_clip_factory(resize=40)
    bb, hf = tgems.load_backbone(str(path)), CLIPImageProcessorPil.from_pretrained(str(path))
    arr = np.random.default_rng(1).integers(0, 256, (2, 40, 52, 3), dtype=np.uint8)
    ref = torch.as_tensor(np.asarray(hf(images=[Image.fromarray(a) for a in arr], return_tensors="np")["pixel_values"]))
    assert (bb.preprocess(arr) - ref).abs().max() <= 1e-5
    arr = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ref = torch.as_tensor(np.asarray(hf(images=[Image.fromarray(a) for a in arr], return_tensors="np")["pixel_values"]))
    assert (bb.preprocess(arr) - ref).abs().max() <= 1e-2


@pytest.mark.parametrize("bad", [[], np.zeros((2, 32, 32, 3), np.float32), np.zeros((32, 32, 3), np.uint8),
                                 ["not an image"], "image.png"])
def test_preprocess_rejects(tiny_backbone, bad):
    with pytest.raises(TGEMError):
        tiny_backbone.preprocess(bad)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 3, 32, 32), (2, 1, 32, 32), (2, 4, 32, 32), (2, 3, 16, 16)])
def test_bad_pixels(tiny_backbone, shape):
    with pytest.raises(TGEMError):
        tiny_backbone.encode_image(torch.zeros(shape))


def test_bad_pixel_types(tiny_backbone):
    with pytest.raises(TGEMError):
        tiny_backbone.encode_image(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TGEMError):
        tiny_backbone.encode_image(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize("k", [0, 5, -1, 2.0, "2", True])
def test_bad_exit_layer(tiny_backbone, k):
    with pytest.raises(TGEMError):
        tiny_backbone.encode_image(torch.zeros(1, 3, 32, 32), exit_layer=k)


def test_exit_layer_accepts_integer_like(tiny_backbone):
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(tiny_backbone.encode_image(x, exit_layer=np.int64(2)), tiny_backbone.encode_image(x, exit_layer=2))


@pytest.mark.parametrize("texts", [[], [""], ["ok", "   "], ["ok", 3], "a red circle", None])
def test_bad_texts(tiny_backbone, texts):
    with pytest.raises(TGEMError):
        tiny_backbone.encode_text(texts)


def test_not_a_clip_checkpoint(tmp_path, tiny_clip_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
    for path, why in ((empty, "no config.json"), (other, "model_type is 'bert'"), (no_weights, "no weights")):
        with pytest.raises(TGEMError, match=f"is not a .*checkpoint.*{why}"):
            tgems.load_backbone(str(path))


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TGEMError, match="cannot load model 'nobody-xyz/not-a-model'.*offline"):
        tgems.load_backbone("nobody-xyz/not-a-model")


def test_embedded_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "EMBEDDED_MODEL", tmp_path / "nothing")
    with pytest.raises(TGEMError, match="embedded default model is not shipped"):
        tgems.load_backbone("embedded")


def test_fingerprint(tiny_clip_dir, tiny_backbone, tiny_clip_factory):
    fp = tiny_backbone.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert tiny_backbone.fingerprint() == fp
    assert tgems.load_backbone(str(tiny_clip_dir)).fingerprint() == fp
    assert tgems.load_backbone(str(tiny_clip_factory(seed=0))).fingerprint() == fp
    assert tgems.load_backbone(str(tiny_clip_factory(seed=1))).fingerprint() != fp


def test_flops_methods(tiny_backbone):
    from tgems.backbones import flops

    bb = tiny_backbone
    T, W, M, D = bb.num_tokens, bb.width, bb.mlp_dim, bb.embed_dim
    assert bb.flops_block() == 8 * T * W * W + 4 * T * T * W + 4 * T * W * M
    assert bb.flops_readout() == 2 * W * D
    assert bb.flops_full() == bb.flops_embed() + bb.num_layers * bb.flops_block() + bb.flops_readout()
    assert bb.flops_full() == flops.flops_full(T, W, M, D, bb.patch_size, bb.num_layers)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fingerprint_does_not_depend_on_the_dtype(tiny_clip_dir, tiny_backbone, dtype):
    from tgems.backbones.base import weights_fingerprint

    half = tgems.load_backbone(str(tiny_clip_dir), dtype=dtype)
    assert half.fingerprint() == tiny_backbone.fingerprint()
    # what the float32 load hashes: its own weights, as before
    assert weights_fingerprint(tiny_backbone.model) == tiny_backbone.fingerprint()
    # the cast weights alone would not give it
    assert weights_fingerprint(half.model) != tiny_backbone.fingerprint()
