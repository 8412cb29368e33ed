"""Scale of `tgems fit` on streamed data: training time and peak memory against the number of images.

On a CLIP with ViT-B/16's vision tower (12 x 768, MLP 3,072, patch 16, 224 px, projection 512; random
weights and a small text side: the decisions are meaningless, the shapes and costs are real):

- training: synthetic feature caches (the on-disk format of tgems.training.feature_cache, random float16
  readouts and rates, 64 scenes class labels) of each --sizes, fit with `fit_tgem_cached` in a fresh
  child process per size and space; the child reports its wall seconds and peak resident memory;
- extraction: --extract-n scenes images upscaled to 224 px JPEGs, streamed (folder: reader, decoding
  workers) into a real feature cache, in a child process: images per second and peak memory.

Targets (issue 22): peak RSS at the largest size <= 1.2x that at the smallest, for cls and for rates; seconds
per image at the largest size <= 1.3x that at the smallest.

    python benchmarks/fit_scale.py --json fit_scale.json            # 8,000 / 32,000 / 128,000, 2,000 extracted
    python benchmarks/fit_scale.py --quick --json fit_scale_quick.json   # 2,000 / 8,000, 2 epochs, 32 extracted
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
SHARD = 1000  # synthetic cache rows per shard


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def vit_b16(path: Path) -> str:
    """A random-init CLIP with ViT-B/16's vision tower and a small text side (see batch_throughput.vit_b32)."""
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from helpers import WORDS, make_tiny_clip

    import tgems

    if not (path / "config.json").exists():
        words = tuple(WORDS) + tuple(w for c in tgems.load_dataset("scenes:test:10").classes for w in c.split())
        make_tiny_clip(path, layers=12, width=768, heads=12, mlp=3072, patch=16, image_size=224, projection=512,
                       text_layers=2, text_width=128, text_heads=2, max_length=16, resize=224, seed=0, words=words)
    return str(path)


def synthetic_cache(root: Path, bb, classes: list, n: int, rates: bool, seed: int = 0) -> Path:
    """A complete feature cache of n random rows in the on-disk format (docs/fit.md), mean-patch readouts
    included (the default cls recipe reads them)."""
    from tgems.features import CACHE_FORMAT, CACHE_KIND, MANIFEST, shard_file

    root = Path(root)
    if (root / MANIFEST).exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    L, D, M = bb.num_layers, bb.embed_dim, bb.mlp_dim
    shards = []
    for k, start in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - start)
        arrays = {"z": rng.standard_normal((m, L, D), dtype=np.float32).astype(np.float16),
                  "text": np.zeros((m, D), np.float16), "label": rng.integers(0, len(classes), m).astype(np.int32),
                  "key": np.zeros(m, np.int64),
                  "patch": rng.standard_normal((m, L, D), dtype=np.float32).astype(np.float16)}
        if rates:
            arrays["rates"] = rng.random((m, L, M), dtype=np.float32).astype(np.float16)
        for what, a in arrays.items():
            np.save(shard_file(root, k, what), a)
        shard_file(root, k, "json").write_text(json.dumps(
            {"index": k, "input": "synthetic", "n": m, "label_names": list(classes), "complete": True, "ids": [],
             "labels": [], "captions": [], "skipped": []}))
        shards.append(k)
    (root / MANIFEST).write_text(json.dumps(
        {"format": CACHE_FORMAT, "kind": CACHE_KIND, "backbone": bb.name, "fingerprint": bb.fingerprint(),
         "settings": {"rates": rates, "patch": True, "dtype": "float16"}, "input": {"synthetic": n}, "complete": True,
         "shards_used": shards}))
    return root


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads): steadier than wall time on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_fit(args) -> dict:
    from tgems.backbones import load_backbone
    from tgems.features import FeatureCache
    from tgems.training.fit import FitSettings, fit_tgem_cached

    bb = load_backbone(args.model)
    bb.fingerprint()
    cache = FeatureCache.open(args.cache, bb, need_rates=args.space == "rates")
    base = _peak_rss_mb()
    t0, c0 = time.time(), _cpu_seconds()
    s = FitSettings(space=args.space, epochs=args.epochs, **({"jumper_max": args.jumper_max} if args.jumper_max else {}))
    _, _, info = fit_tgem_cached(bb, cache, s, progress=False)
    return {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(_cpu_seconds() - c0, 2),
            "peak_rss_mb": _peak_rss_mb(), "base_rss_mb": base, "num_jumper": info["num_jumper"],
            "load_average": round(os.getloadavg()[0], 2)}


def child_extract(args) -> dict:
    from tgems.backbones import load_backbone
    from tgems.training.feature_cache import build_cache

    bb = load_backbone(args.model)
    bb.fingerprint()
    base = _peak_rss_mb()
    t0, c0 = time.time(), _cpu_seconds()
    s = build_cache(bb, args.data, args.cache, rates=args.space == "rates", workers=args.workers, progress=False)
    return {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(_cpu_seconds() - c0, 2),
            "peak_rss_mb": _peak_rss_mb(), "base_rss_mb": base, "images": s["images"], "images_per_second": s["images_per_second"]}


def run_child(*argv) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, argv)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child {argv[:1]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", nargs="?", default="run", choices=("run", "child-fit", "child-extract"))
    p.add_argument("--quick", action="store_true", help="2,000 / 8,000 images, 2 epochs, 32 images extracted")
    p.add_argument("--sizes", default="8000,32000,128000")
    p.add_argument("--spaces", default="cls,rates")
    p.add_argument("--epochs", type=int, default=None, help="default: the fit default (30); --quick: 2")
    p.add_argument("--extract-n", type=int, default=2000)
    p.add_argument("--jumper-max", type=int, help="FitSettings.jumper_max (default: the fit default)")
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--extract-spaces", default="rates",
                   help="caches to extract (a rates cache holds the cls readouts too: one extraction serves both)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", help="folder for the model, caches and JPEGs (default: a temporary one)")
    p.add_argument("--json")
    p.add_argument("--model"), p.add_argument("--cache"), p.add_argument("--space"), p.add_argument("--data")
    args = p.parse_args(argv)
    if args.mode == "child-fit":
        print(json.dumps(child_fit(args)))
        return 0
    if args.mode == "child-extract":
        print(json.dumps(child_extract(args)))
        return 0
    from tgems.training.fit import FitSettings

    if args.quick:
        args.sizes, args.extract_n = "2000,8000", 32
        args.epochs = args.epochs or 2
    epochs = args.epochs or FitSettings().epochs
    sizes = [int(x) for x in args.sizes.split(",")]
    spaces = args.spaces.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="fit_scale-"))
    t_all = time.time()

    import tgems
    from batch_throughput import make_jpegs

    model = vit_b16(work / "model")
    bb = tgems.load_backbone(model)
    classes = list(tgems.load_dataset("scenes:test:10").classes)
    rows = []
    for space in spaces:
        for n in sizes:
            cache = synthetic_cache(work / f"synthetic-{space}-{n}", bb, classes, n, space == "rates")
            r = run_child("child-fit", "--model", model, "--cache", cache, "--space", space, "--epochs", epochs,
                          *(["--jumper-max", args.jumper_max] if args.jumper_max else []))
            rows.append({"n": n, "space": space, **r})
            log(f"fit {space:5s} n={n:>7}: {r['seconds']:8.1f} s ({1000 * r['seconds'] / n:.2f} ms/image, "
                f"CPU {1000 * r['cpu_seconds'] / n:.2f} ms/image, load {r['load_average']}), "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (after loading {r['base_rss_mb']:.0f} MB)")
    extraction = []
    for space in [] if args.skip_extract else args.extract_spaces.split(","):
        jpegs = make_jpegs(work / "jpegs", args.extract_n, 224)
        r = run_child("child-extract", "--model", model, "--data", f"folder:{jpegs}", "--cache",
                      work / f"extract-{space}", "--space", space, "--workers", args.workers)
        extraction.append({"n": r["images"], "space": space, **r})
        log(f"extract {space:5s} n={r['images']}: {r['images_per_second']} images/s, peak RSS {r['peak_rss_mb']:.0f} MB")
    checks = {}
    for space in spaces:
        mine = sorted((r for r in rows if r["space"] == space), key=lambda r: r["n"])
        lo, hi = mine[0], mine[-1]
        checks[space] = {"rss_ratio": round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3),
                         "seconds_per_image_ratio": round((hi["seconds"] / hi["n"]) / (lo["seconds"] / lo["n"]), 3),
                         "cpu_seconds_per_image_ratio": round((hi["cpu_seconds"] / hi["n"]) / (lo["cpu_seconds"] / lo["n"]),
                                                              3),
                         "from_n": lo["n"], "to_n": hi["n"]}
        checks[space]["met"] = checks[space]["rss_ratio"] <= 1.2 and checks[space]["seconds_per_image_ratio"] <= 1.3
        log(f"{space}: peak RSS x{checks[space]['rss_ratio']} (target <= 1.2), seconds per image "
            f"x{checks[space]['seconds_per_image_ratio']} (CPU seconds x{checks[space]['cpu_seconds_per_image_ratio']}; "
            f"target <= 1.3) from {lo['n']} to {hi['n']}")
    report = {"machine": {"cpus": os.cpu_count()}, "model": "ViT-B/16 vision tower, random weights (fit_scale.vit_b16)",
              "epochs": epochs,
              "jumper_max": args.jumper_max or FitSettings().jumper_max,
              "quick": args.quick, "rows": rows, "extraction": extraction, "checks": checks,
              "seconds": round(time.time() - t_all, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
