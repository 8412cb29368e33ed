"""Contrastive training of a small HF CLIPModel (the embedded default is the `embedded` preset).

Plain nanoGPT-style loop: fresh procedural batches (or a labelled dataset), a UniCL-style
multi-positive contrastive loss (image-text pairs of the same class are positives, so the
many same-class pairs in a batch are not pushed apart), AdamW, warm-up + cosine schedule,
resumable safetensors checkpoints.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel

try:  # the PIL processor: torchvision is not a dependency
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # older transformers
    from transformers import CLIPImageProcessor

from tgems.backbones import as_device
from tgems.backbones.transforms import OPENAI_CLIP_MEAN as CLIP_MEAN
from tgems.backbones.transforms import OPENAI_CLIP_STD as CLIP_STD
import tgems.artifacts as artifacts
from tgems.errors import TGEMError
from tgems.io import swap_dir
from tgems.training.tokenizer import build_word_tokenizer


@dataclass
class Recipe:
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    projection_dim: int = 128
    steps: int = 12600
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.1
    caption_prob: float = 0.7
    context_length: int = 24


PRESETS = {
    "embedded": Recipe(
        vision=dict(image_size=32, patch_size=8, hidden_size=128, num_hidden_layers=12,
                    num_attention_heads=4, intermediate_size=512),
        text=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    ),
    "tiny": Recipe(
        vision=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
                    num_attention_heads=2, intermediate_size=64),
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        projection_dim=32, steps=30, batch_size=64, lr=2e-3, warmup=5,
    ),
}


class _Batches:
    """Deterministic (images, texts, labels) batches for a step index."""

    def __init__(self, spec: str, recipe: Recipe, seed: int):
        from tgems.data import scenes

        self.spec, self.recipe, self.seed = spec, recipe, seed
        self.stream = spec in ("scenes", "scenes:train")
        if self.stream:
            self.scenes = scenes
            self.classes, self.templates = scenes.CLASSES, scenes.PROMPT_TEMPLATES
            self.words = scenes.vocabulary()
        else:
            from tgems.data.spec import load_dataset

            self.data = load_dataset(spec, seed=seed)
            if not isinstance(self.data.images, np.ndarray):
                raise TGEMError(f"pretraining needs equally sized images; {spec} has mixed sizes")
            self.classes, self.templates = self.data.classes, ("{}", "a picture of {}", "an image of {}")
            texts = list(self.classes) + list(self.data.captions or []) + list(self.templates)
            self.words = sorted({w for t in texts for w in t.replace("{}", " ").replace(",", " ").lower().split()})

    def __call__(self, step: int):
        B = self.recipe.batch_size
        rng = np.random.default_rng([self.seed, step, 11])
        if self.stream:
            data = self.scenes.generate("train", step * B, B, seed=self.seed)
        else:
            epoch, pos = divmod(step * B, len(self.data))
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            idx = np.concatenate([perm, np.random.default_rng([self.seed, epoch + 1]).permutation(len(self.data))])
            data = self.data.subset(idx[pos:pos + B])
        texts = []
        for i, y in enumerate(data.labels):
            if data.captions is not None and rng.uniform() < self.recipe.caption_prob:
                texts.append(data.captions[i])
            else:
                texts.append(self.templates[rng.integers(len(self.templates))].format(self.classes[y]))
        return data.images, texts, torch.as_tensor(data.labels)


_WORKER_BATCHES = None


def _init_worker(spec: str, recipe: Recipe, seed: int):
    global _WORKER_BATCHES
    torch.set_num_threads(1)
    _WORKER_BATCHES = _Batches(spec, recipe, seed)


def _worker_batch(step: int):
    images, texts, labels = _WORKER_BATCHES(step)
    return images, texts, labels.numpy()


def _batch_stream(batches: _Batches, start: int, workers: int):
    """(images, texts, labels) for steps start.. in order; with workers > 0, made ahead in
    separate processes (a batch depends only on its step index, so the stream is the same)."""
    steps = range(start, batches.recipe.steps)
    if workers <= 0:
        yield from map(batches, steps)
        return
    import multiprocessing as mp

    init = (batches.spec, batches.recipe, batches.seed)
    ahead = 2 * workers  # bounded: workers that run far ahead only take cores from the training step
    with mp.get_context("spawn").Pool(workers, _init_worker, init) as pool:
        pending = deque(pool.apply_async(_worker_batch, (s,)) for s in steps[:ahead])
        for s in steps:  # pending holds the batches of steps s .. s + ahead - 1
            images, texts, labels = pending.popleft().get()
            if s + ahead < steps.stop:
                pending.append(pool.apply_async(_worker_batch, (s + ahead,)))
            yield images, texts, torch.as_tensor(labels)


def make_recipe(preset: str, overrides: dict | None = None) -> Recipe:
    """The preset's recipe with some fields replaced; `vision` / `text` overrides merge key by key."""
    if preset not in PRESETS:
        raise TGEMError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    fields = asdict(PRESETS[preset])
    for k, v in (overrides or {}).items():
        if k not in fields:
            raise TGEMError(f"unknown recipe field '{k}' (choose from {', '.join(fields)})")
        fields[k] = {**fields[k], **v} if isinstance(fields[k], dict) else v
    return Recipe(**fields)


def pixels_from_uint8(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    logits = scale * img @ txt.t()
    pos = (labels[:, None] == labels[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(target * F.log_softmax(logits, 1)).sum(1).mean()
                  - (target * F.log_softmax(logits.t(), 1)).sum(1).mean())


def train_step(model: CLIPModel, opt, input_ids, attention_mask, pixels, labels) -> torch.Tensor:
    """One optimiser step of the contrastive loss; returns the loss."""
    outp = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
    img = F.normalize(outp.image_embeds, dim=-1)
    txt = F.normalize(outp.text_embeds, dim=-1)
    loss = multi_positive_loss(img, txt, labels, model.logit_scale.exp().clamp(max=100))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def _lr(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


OPTIMIZER_FILE = "optimizer.safetensors"  # beside the model, its sha256 in state.json


def _optimizer_tensors(opt) -> dict:
    # keyed by the parameter's position in the param groups (what _load_optimizer uses), not by
    # the order in which states were created; 0-dim tensors are stored as (1,) and restored below.
    tensors = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            v = v.detach().cpu().clone()
            tensors[f"{i}.{k}"] = v.reshape(-1) if v.dim() == 0 else v
    return tensors


def _save_checkpoint(ckpt: Path, model, opt, state: dict) -> None:
    """The resume checkpoint as one artifact directory (model, optimizer, state, each file's sha256), swapped
    in whole: a run killed while writing it resumes from the previous one."""
    artifacts.write(ckpt, artifacts.PRETRAIN_STATE, state, model.state_dict(),
                    extra={OPTIMIZER_FILE: _optimizer_tensors(opt)})


def _read_state(ckpt: Path) -> dict:
    return artifacts.read_config(ckpt, artifacts.PRETRAIN_STATE, ("step", "log", "elapsed_s", "recipe", "seed", "data"))


def _load_optimizer(opt, tensors: dict):
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if st:
            if "step" in st:
                st["step"] = st["step"].reshape(())
            for k, v in st.items():
                if k != "step":  # moments live with their parameter; a 0-dim logit_scale's were saved as (1,)
                    st[k] = v.reshape(p.shape).to(p.device)
            opt.state[p] = st


def build_model(recipe: Recipe, vocab_size: int, seed: int) -> CLIPModel:
    torch.manual_seed(seed)
    text = dict(recipe.text, vocab_size=vocab_size, max_position_embeddings=recipe.context_length,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg = CLIPConfig(text_config=text, vision_config=dict(recipe.vision), projection_dim=recipe.projection_dim)
    return CLIPModel(cfg)


def _write_model(model, tokenizer, recipe: Recipe, out: Path, info: dict):
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    s = recipe.vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        keep = out / "checkpoint"
        if keep.exists():
            shutil.move(str(keep), str(tmp / "checkpoint"))
    swap_dir(tmp, out)


def pretrain(out: str | Path, preset: str = "embedded", data: str = "scenes:train", seed: int = 0,
             steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
             ckpt_every: int = 250, resume: bool = True, keep_checkpoint: bool = False,
             progress: bool = True, threads: int | None = None, device: str = "cpu", workers: int = 0,
             overrides: dict | None = None, callback=None, callback_every: int = 0,
             eval_every: int = 0) -> dict:
    """Train a CLIP from scratch and save a standard HF directory at `out`; returns the run's record.

    `overrides` replaces recipe fields (see `make_recipe`); `callback(step, model, tokenizer)` is
    called every `callback_every` steps and at the end, with the model in eval mode (for learning
    curves). `eval_every` > 0 measures zero-shot top-1 on scenes:testall (seen / held-out) every
    that many steps and at the end, kept in the record's `zero_shot` curve. `device` and `workers` change speed only, not the batches; workers are started with
    `spawn`, so a script that sets workers > 0 must call this under `if __name__ == "__main__":`."""
    as_device(device)
    if workers < 0:
        raise TGEMError(f"workers must be >= 0, got {workers}")
    if threads:
        torch.set_num_threads(threads)
    recipe = make_recipe(preset, {**(overrides or {}), **{k: v for k, v in
                                                          dict(steps=steps, batch_size=batch_size, lr=lr).items()
                                                          if v is not None}})
    out = Path(out)
    batches = _Batches(data, recipe, seed)
    tokenizer = build_word_tokenizer(batches.words, recipe.context_length)
    model = build_model(recipe, len(tokenizer), seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))

    ckpt = out / "checkpoint"
    start, log, elapsed = 0, [], 0.0
    curve = []
    if eval_every:
        from tgems.training.zero_shot import ZeroShot

        zero_shot, user_callback, user_every = ZeroShot(str(device)), callback, callback_every

        def callback(step, model, tokenizer):
            if step % eval_every == 0 or step == recipe.steps:
                curve.append({"step": step, "time_s": round(time.time() - t0, 1), **zero_shot(model, tokenizer)})
                tqdm.write(f"step {step}: zero-shot seen {curve[-1]['seen']:.4f} held-out {curve[-1]['heldout']:.4f}")
            if user_callback and user_every and (step % user_every == 0 or step == recipe.steps):
                user_callback(step, model, tokenizer)
        callback_every = math.gcd(eval_every, callback_every) if callback_every else eval_every
    if resume and (ckpt / "state.json").exists():
        state = _read_state(ckpt)
        if state["recipe"] != asdict(recipe) or state["seed"] != seed or state["data"] != data:
            raise TGEMError(f"checkpoint in {ckpt} was made with another recipe/seed/data; use --no-resume")
        model.load_state_dict({k: v.to(device) for k, v in
                               artifacts.read_tensors(ckpt, artifacts.PRETRAIN_STATE, state).items()})
        _load_optimizer(opt, artifacts.read_extra(ckpt, artifacts.PRETRAIN_STATE, state, OPTIMIZER_FILE))
        start, log, elapsed = state["step"], state["log"], state["elapsed_s"]
        curve[:] = state.get("zero_shot", [])

    model.train()
    t0 = time.time() - elapsed
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="pretrain",
               disable=not progress, dynamic_ncols=True)
    running = None
    for step, (images, texts, labels) in zip(bar, _batch_stream(batches, start, workers)):
        for g in opt.param_groups:
            g["lr"] = _lr(step, recipe)
        tok = tokenizer(texts, padding=True, truncation=True, max_length=recipe.context_length,
                        return_tensors="pt").to(device)
        loss = train_step(model, opt, tok["input_ids"], tok["attention_mask"],
                          pixels_from_uint8(images).to(device), labels.to(device))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        if step % 25 == 0 or step == recipe.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 5), "time_s": round(time.time() - t0, 1)})
        if callback and (step + 1 == recipe.steps or callback_every and (step + 1) % callback_every == 0):
            model.eval()
            with torch.no_grad():
                callback(step + 1, model, tokenizer)
            model.train()
        if ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < recipe.steps:
            _save_checkpoint(ckpt, model, opt, {"step": step + 1, "log": log, "zero_shot": curve,
                                                "elapsed_s": time.time() - t0, "recipe": asdict(recipe),
                                                "seed": seed, "data": data})
    model.eval().cpu()
    info = {"preset": preset, "data": data, "seed": seed, "recipe": asdict(recipe),
            "train_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(), "device": str(device),
            "samples_seen": recipe.steps * recipe.batch_size, "log": log, "zero_shot": curve,
            "command": f"tgems pretrain --preset {preset} --data {data} --seed {seed} --workers {workers}"
                       + (f" --eval-every {eval_every}" if eval_every else "") + f" --out {out}"}
    _write_model(model, tokenizer, recipe, out, info)
    if not keep_checkpoint:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return info
