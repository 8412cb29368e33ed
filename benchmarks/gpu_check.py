"""The prepared check for a lent GPU: the exit path on CUDA agrees with the CPU, and the engine's float16
throughput against the plain transformers forward on a ViT-B/32-shaped CLIP.

    python benchmarks/gpu_check.py --json results/gpu_check.json           # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --dtype float32 --batch 16  # a dry run of the same code here

1. Agreement: the shipped embedded model and its `embedded:cls` T-GEM, calibrated on the CPU for budget 0.5
   and saved; loaded again on the device in the given dtype; the same 512 scenes images classified on both.
   Reports how many labels and exit layers are equal (float16 moves scores near the threshold, so a few
   exit layers may differ; labels of images that exit at the same layer should agree).
2. Speed: a random-init ViT-B/32-shaped CLIP (224 px, 12 blocks, width 768) at batch `--batch`: plain
   `get_image_features`, the engine never exiting, every row exiting at layer 6, and exits spread evenly over
   the 12 layers; median of `--repeats` interleaved runs, synchronised.
3. Serving: benchmarks/serve_load.py on the ViT-B/32 shape, `tgems serve` on the device in the given dtype
   over loopback HTTP: the depth queues at budget 0.5, never exiting, and exit-and-drop batching; the keys
   rps_exit, rps_never_exit, rps_drop_batching, p95_ms_exit, min_layer_occupancy, rss_growth (and the
   per-mode tables under "serve"). `--serve quick` runs serve_load's --quick on the ViT-B/32 stand-in (checks
   the path anywhere); `--serve off` skips it. Without CUDA, `--device cuda` skips every case in one line.

    python benchmarks/gpu_check.py --device cpu --dtype float32 --batch 16 --n 64 --serve quick  # the path, here
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import tgems
from tgems.backbones import as_dtype
from tgems.backbones.hf_clip import CLIPBackbone
from tgems.engine import run_early_exit
from tgems.io import write_json
from tgems.policies import ExitAtLayer, ExitPerRow, NeverExit


def agreement(device: str, dtype: str, n: int) -> dict:
    data = tgems.load_dataset(f"scenes:testall:{n}", seed=1)
    cpu = tgems.EarlyExitClassifier(tgems.load_backbone("embedded"), "embedded:cls", data.classes)
    cpu = cpu.calibrate(tgems.load_dataset("scenes:calib"), budget=0.5, allow_uncovered=True)
    with tempfile.TemporaryDirectory() as tmp:
        cpu.save(tmp)
        dev = tgems.EarlyExitClassifier.load(tmp, device=device, dtype=dtype)
    a, b = cpu.predict(data.images), dev.predict(data.images)
    same_layer = a.exit_layers == b.exit_layers
    return {"n": n, "labels_equal": float((a.indices == b.indices).mean()),
            "exit_layers_equal": float(same_layer.mean()),
            "labels_equal_where_same_layer": float((a.indices == b.indices)[same_layer].mean()),
            "mean_layers_cpu": a.mean_layers, "mean_layers_device": b.mean_layers}


def vit_b32(device: str, dtype) -> CLIPBackbone:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2),
        projection_dim=512)
    model = CLIPModel(config).eval().requires_grad_(False).to(device=device, dtype=dtype)
    return CLIPBackbone("random ViT-B/32", None, model, None, None, device, dtype)


def speed(device: str, dtype, batch: int, repeats: int) -> dict:
    bb = vit_b32(device, dtype)
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    L = bb.num_layers
    spread = torch.as_tensor(np.random.default_rng(0).permutation(np.arange(batch) % L + 1))

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    cases = {
        "plain": lambda: bb.model.get_image_features(pixel_values=pixels.to(dtype)),
        "never_exit": lambda: run_early_exit(bb, pixels, NeverExit()),
        "half_exit": lambda: run_early_exit(bb, pixels, ExitAtLayer(L // 2)),
        "mixed": lambda: run_early_exit(bb, pixels, ExitPerRow(spread, list(range(1, L + 1)))),
    }
    times = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()
        for _ in range(repeats):
            for k, fn in cases.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t)
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    flops = {"plain": 1.0, "never_exit": 1.0,
             "half_exit": float(run_early_exit(bb, pixels[:2], ExitAtLayer(L // 2)).flops_ratio),
             "mixed": float(run_early_exit(bb, pixels, ExitPerRow(spread, list(range(1, L + 1)))).flops_ratio)}
    return {k: {"images_per_second": round(ips[k], 1), "vs_plain": round(ips[k] / ips["plain"], 3),
                "flops_ratio": round(flops[k], 3), "ips_min": round(batch / max(times[k]), 1),
                "ips_max": round(batch / min(times[k]), 1)} for k in cases}


SERVE_GPU = ["--seconds", "20", "--warmup-seconds", "20", "--open-seconds", "10", "--drain-seconds", "10",
             "--soak", "20000", "--soak-seconds", "180"]  # the device time of a lent GPU is short


def serving(device: str, dtype: str, mode: str, work: str) -> dict:
    """serve_load's measurement on the ViT-B/32 shape; its summary keys, with the per-mode tables."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve_load

    argv = ["--models", "vit_b32", "--device", device, "--dtype", dtype, "--work", work]
    argv += ["--quick"] if mode == "quick" else SERVE_GPU
    report = serve_load.run(serve_load.parse_args(argv))
    keys = ("rps_exit", "rps_never_exit", "rps_drop_batching", "p95_ms_exit", "min_layer_occupancy", "rss_growth",
            "speedup_vs_never_exit", "speedup_vs_drop", "images_per_s_exit", "flops_ratio_exit", "targets")
    return {**{k: report[k] for k in keys}, "quick": mode == "quick", "serve_load": report}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--n", type=int, default=512, help="images for the agreement check")
    ap.add_argument("--serve", choices=("full", "quick", "off"), default="full",
                    help="the serving case: full (ViT-B/32 shape), quick (serve_load --quick, a stand-in), off")
    ap.add_argument("--work", default="results/gpu_check_work", help="scratch folder of the serving case")
    ap.add_argument("--json")
    args = ap.parse_args()
    device, dtype = args.device, as_dtype(args.dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: skipped (run with --device cpu --dtype float32 for a dry run)")
        if args.json:
            write_json(args.json, {"device": device, "skipped": "no CUDA device"})
        return
    out = {"device": device, "dtype": args.dtype, "batch": args.batch,
           "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
           "torch": torch.__version__}
    out["agreement"] = agreement(device, args.dtype, args.n)
    print("agreement with the CPU:", out["agreement"])
    out["speed"] = speed(device, dtype, args.batch, args.repeats)
    print(f"{'case':<12}{'img/s':>10}{'vs plain':>10}{'FLOPs':>8}")
    for k, r in out["speed"].items():
        print(f"{k:<12}{r['images_per_second']:>10.1f}{r['vs_plain']:>10.3f}{r['flops_ratio']:>8.3f}")
    if args.serve != "off":
        serve = serving(device, args.dtype, args.serve, args.work)
        out["serve"] = serve
        for k in ("rps_exit", "rps_never_exit", "rps_drop_batching", "p95_ms_exit", "min_layer_occupancy",
                  "rss_growth"):
            out[k] = serve[k]
        print("serving:", {k: serve[k] for k in ("rps_exit", "rps_never_exit", "rps_drop_batching", "p95_ms_exit",
                                                 "min_layer_occupancy", "rss_growth")})
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
