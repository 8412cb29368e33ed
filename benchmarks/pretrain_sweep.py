"""Recipe search for the embedded CLIP: learning curves of zero-shot top-1 for several recipes.

Each variant is the `embedded` preset with some fields replaced; it trains in its own process
(`--parallel` at a time) and its seen / held-out zero-shot top-1 (64-way, prompt ensemble, full
scenes:testall) is measured every `--eval-every` steps. On a GPU machine this ranks recipes by
quality per step; `--cpu-cost` measures what one step of each costs on this machine, which is
what the 45-minute budget of the preset is about.

    python benchmarks/pretrain_sweep.py --device cuda --workers 2 --parallel 7 --out results/sweep
    python benchmarks/pretrain_sweep.py --cpu-cost --json results/sweep_cpu_cost.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tgems.io import write_json
from tgems.training.pretrain import PRESETS, make_recipe, pretrain, train_step
from tgems.training.zero_shot import ZeroShot

P4W64 = dict(patch_size=4, hidden_size=64, num_attention_heads=2, intermediate_size=256)
P4W96 = dict(patch_size=4, hidden_size=96, num_attention_heads=3, intermediate_size=384)
VARIANTS = {
    "base": {},
    "base_lr2e-3": dict(lr=2e-3),
    "base_x2": dict(steps=8400),
    "base_x3": dict(steps=12600),
    "p4w64": dict(vision=P4W64),
    "p4w64_lr2e-3": dict(vision=P4W64, lr=2e-3),
    "p4w64_x2": dict(vision=P4W64, steps=8400),
    "p4w96_3000": dict(vision=P4W96, steps=3000),
    "base_lr5e-4": dict(lr=5e-4),
    "base_lr7e-4": dict(lr=7e-4),
    "bs64_8400_lr7e-4": dict(batch_size=64, steps=8400, lr=7e-4, warmup=400),
    "cap0.4": dict(caption_prob=0.4),
    "wd0.02": dict(weight_decay=0.02),
    "mlp256_5250": dict(vision=dict(intermediate_size=256), steps=5250),
    "lr7e-4_5000": dict(lr=7e-4, steps=5000),
}
# the sweep ran when the preset had 4,200 steps; pinned so that a variant names the same run today
VARIANTS = {name: {"steps": 4200, **v} for name, v in VARIANTS.items()}


def run_variant(name: str, args) -> dict:
    zs, curve = ZeroShot(args.device), []
    t0 = time.time()

    def callback(step, model, tokenizer):
        curve.append({"step": step, "time_s": round(time.time() - t0, 1), **zs(model, tokenizer)})
        print(f"[{name}] step {step}: {curve[-1]}", flush=True)
        write_json(Path(args.out) / f"{name}.json", {"variant": name, "overrides": VARIANTS[name], "curve": curve})

    overrides = dict(VARIANTS[name])
    if args.steps_scale != 1:
        overrides["steps"] = max(2, round(make_recipe("embedded", overrides).steps * args.steps_scale))
    info = pretrain(Path(args.out) / name, seed=args.seed, device=args.device, workers=args.workers,
                    overrides=overrides, callback=callback, callback_every=args.eval_every,
                    ckpt_every=0, progress=False, threads=args.threads)
    rec = {"variant": name, "overrides": VARIANTS[name], "recipe": info["recipe"], "curve": curve,
           "train_seconds": info["train_seconds"], "device": args.device}
    write_json(Path(args.out) / f"{name}.json", rec)
    return rec


def cpu_cost(names, steps: int = 6, threads: int = 2) -> dict:
    """Median seconds per training step on this machine (model only; data adds ~0.09 s at batch 128)."""
    from tgems.training.pretrain import build_model

    torch.set_num_threads(threads)
    costs = {}
    for name in names:
        r = make_recipe("embedded", VARIANTS[name])
        model = build_model(r, 64, 0).train()
        opt = torch.optim.AdamW(model.parameters(), r.lr)
        g = torch.Generator().manual_seed(0)
        px = torch.randn(r.batch_size, 3, 32, 32, generator=g)
        ids = torch.randint(4, 64, (r.batch_size, 10), generator=g)
        lab = torch.randint(0, 64, (r.batch_size,), generator=g)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            train_step(model, opt, ids, None, px, lab)
            times.append(time.perf_counter() - t)
        s = sorted(times[1:])[len(times[1:]) // 2]
        costs[name] = {"s_per_step": round(s, 3), "steps": r.steps,
                       "est_minutes": round(r.steps * (s + 0.12 * r.batch_size / 128) / 60, 1)}
        print(f"{name:>14}: {s:.3f} s/step, {r.steps} steps -> ~{costs[name]['est_minutes']} min on this machine")
    return costs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="results/sweep")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=1050)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every variant's steps (smoke runs)")
    ap.add_argument("--cpu-cost", action="store_true", help="only measure seconds per step on this machine")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.cpu_cost:
        res = cpu_cost(args.variants, threads=args.threads)
        if args.json:
            write_json(args.json, {"threads": args.threads, "costs": res})
        return
    if args.child:
        run_variant(args.variants[0], args)
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    child = [sys.executable, __file__, "--child", "--out", args.out, "--device", args.device, "--workers",
             str(args.workers), "--threads", str(args.threads), "--eval-every", str(args.eval_every),
             "--seed", str(args.seed), "--steps-scale", str(args.steps_scale), "--variants"]
    pending, running = list(args.variants), []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            log = open(Path(args.out) / f"{name}.log", "w")
            running.append((name, subprocess.Popen(child + [name], stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            print(f"{item[0]} finished (rc {item[1].returncode})", flush=True)
    rows = {}
    for name in args.variants:
        f = Path(args.out) / f"{name}.json"
        rows[name] = json.loads(f.read_text()) if f.exists() else None
    print(f"{'variant':>14} {'step':>6} {'seen %':>7} {'held %':>7}")
    for name, rec in rows.items():
        for c in (rec or {}).get("curve", []):
            print(f"{name:>14} {c['step']:>6} {100 * c['seen']:>7.2f} {100 * c['heldout']:>7.2f}")
    if args.json:
        write_json(args.json, {"device": args.device, "base": asdict(PRESETS["embedded"]), "variants": rows})


if __name__ == "__main__":
    main()
