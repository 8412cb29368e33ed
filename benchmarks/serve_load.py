"""Serving load: the depth-queue scheduler (tgems.scheduler) against exit-and-drop batching, in process.

Three servers over the same preprocessed images, each with batches of at most --batch rows:
  exit        depth queues, classifier calibrated to budget 0.5 (label-free)
  never_exit  depth queues, tau 2 (every image runs all L blocks: the plain encoder's compute)
  drop        exit-and-drop batching: EarlyExitClassifier.predict on each micro-batch of up to --batch images
              (engine.run_early_exit: later blocks run on the rows that stay), same tau, so the same FLOPs
Closed loop (all images queued at once): sustained images/s and mean batch occupancy per layer. Open loop
(seeded Poisson arrivals at fractions of the exit server's closed-loop rate, bounded by --seconds): p50 /
p95 / p99 latency. RSS growth over a soak of --soak images through the exit server.

Models: the shipped embedded model, and (without --quick) a ViT-B/32-shaped random-weight CLIP as in
batch_throughput.py. Writes JSON (--json); `--quick` runs the embedded model on a few hundred images in
well under a minute on 2 cores. Loopback only: no sockets at all.

    python benchmarks/serve_load.py --quick --json results/serve_load_quick.json
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.make_tiny_clip (vit_b32)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def build(model: str, n_calib: int, work: Path, device: str = "cpu", dtype: str = "float32"):
    import tgems

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = tgems.load_dataset(f"scenes:calib:{n_calib}", seed=0)
        if model == "embedded":
            bb = tgems.load_backbone("embedded", device=device, dtype=dtype)
            clf = tgems.EarlyExitClassifier(bb, "embedded:cls", calib.classes)
            clf = clf.calibrate(calib, budget=0.5, use_labels=False)
        else:
            from batch_throughput import vit_b32  # noqa: E402  (benchmarks/ is on sys.path as the script's dir)

            from tgems.features import extract_features

            bb = tgems.load_backbone(vit_b32(work / "vit_b32"), device=device, dtype=dtype)
            feats = extract_features(bb, calib, rates=False, progress=False)
            clf = tgems.EarlyExitClassifier.from_samples(bb, calib, k=4, feats=feats)
            clf = clf.calibrate(feats, budget=0.5, use_labels=False)
    return bb, clf


def closed_depth(bb, policy, pixels, batch):
    from tgems.scheduler import DepthScheduler

    s = DepthScheduler(bb, max_batch_size=batch, queue_size=len(pixels))
    s.submit(pixels, policy, lambda i, r: None)
    t = time.perf_counter()
    s.run_until_idle()
    dt = time.perf_counter() - t
    occ, sat = s.occupancy(), s.occupancy(saturated=True)
    return {"rps": len(pixels) / dt, "seconds": dt, "flops_ratio": s.stats["flops"] / s.stats["flops_full"],
            "occupancy": occ, "occupancy_saturated": sat,
            "min_layer_occupancy": min((o for o in sat if o is not None), default=None)}


def closed_drop(bb, clf, pixels, batch):
    from tgems.engine import run_early_exit

    rows = np.zeros(bb.num_layers)
    steps = np.zeros(bb.num_layers)
    flops = 0.0
    t = time.perf_counter()
    for s in range(0, len(pixels), batch):
        res = run_early_exit(bb, pixels[s:s + batch], clf.policy())
        layers = res.exit_layers.numpy()
        for l in range(1, bb.num_layers + 1):
            k = int((layers >= l).sum())
            rows[l - 1] += k
            steps[l - 1] += k > 0
        flops += float(res.flops.sum())
    dt = time.perf_counter() - t
    occ = [float(r / (st * batch)) if st else None for r, st in zip(rows, steps)]  # no drain: every batch counts
    return {"rps": len(pixels) / dt, "seconds": dt, "flops_ratio": flops / (len(pixels) * bb.flops_full()),
            "occupancy": occ, "min_layer_occupancy": min(o for o in occ if o is not None)}


def arrivals(rate, seconds, n_max, seed):
    rng = random.Random(seed)
    t, out = 0.0, []
    while t < seconds and len(out) < n_max:
        t += rng.expovariate(rate)
        out.append(t)
    return out


def open_depth(bb, policy, pixels, batch, rate, seconds, seed, wait_s):
    from tgems.scheduler import DepthScheduler

    times = arrivals(rate, seconds, len(pixels), seed)
    lat = [None] * len(times)
    done = threading.Event()
    left = [len(times)]
    lock = threading.Lock()
    s = DepthScheduler(bb, max_batch_size=batch, max_wait_s=wait_s, queue_size=len(pixels) + 1).start()
    t0 = time.perf_counter()

    def answer(k):
        def cb(i, r):
            lat[k] = time.perf_counter() - t0 - times[k]
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()
        return cb

    for k, at in enumerate(times):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        s.submit(pixels[k:k + 1], policy, answer(k))
    done.wait(600)
    s.stop(60)
    return _latency(lat, time.perf_counter() - t0)


def open_drop(bb, clf, pixels, batch, rate, seconds, seed, wait_s):
    from tgems.engine import run_early_exit

    times = arrivals(rate, seconds, len(pixels), seed)
    lat = [None] * len(times)
    q = queue.Queue()
    t0 = time.perf_counter()

    def worker():
        served = 0
        while served < len(times):
            ks = [q.get()]
            deadline = time.perf_counter() + wait_s
            while len(ks) < batch:
                try:
                    ks.append(q.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            run_early_exit(bb, pixels[ks], clf.policy())
            now = time.perf_counter() - t0
            for k in ks:
                lat[k] = now - times[k]
            served += len(ks)

    w = threading.Thread(target=worker, daemon=True)
    w.start()
    for k, at in enumerate(times):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        q.put(k)
    w.join(600)
    return _latency(lat, time.perf_counter() - t0)


def _latency(lat, wall):
    ms = np.array([x for x in lat if x is not None]) * 1000
    return {"n": int(len(ms)), "rps": len(ms) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99))}


def soak(bb, policy, pixels, batch, n):
    from tgems.scheduler import DepthScheduler

    s = DepthScheduler(bb, max_batch_size=batch, queue_size=len(pixels))
    warm = min(len(pixels), n // 10 or 1)
    s.submit(pixels[:warm], policy, lambda i, r: None)
    s.run_until_idle()
    before, done = rss_mb(), 0
    while done < n:
        k = min(len(pixels), n - done)
        s.submit(pixels[:k], policy, lambda i, r: None)
        s.run_until_idle()
        done += k
    after = rss_mb()
    return {"images": n, "rss_mb_before": before, "rss_mb_after": after, "rss_growth": (after - before) / before}


def bench(model, args, work):
    import torch

    import tgems

    t = time.perf_counter()
    bb, clf = build(model, args.n_calib, work, args.device, args.dtype)
    log(f"{model}: classifier calibrated to budget 0.5, tau {clf.tau:.4f} ({time.perf_counter() - t:.0f} s)")
    data = tgems.load_dataset(f"scenes:test:{args.n}", seed=0)
    pixels = bb.preprocess(list(data.images) if isinstance(data.images, list) else data.images)
    exit_pol, never = clf.policy(), clf.with_tau(2.0).policy()
    out = {"model": model, "device": str(bb.device), "num_layers": bb.num_layers, "batch": args.batch, "images": len(pixels),
           "tau": clf.tau, "threads": torch.get_num_threads()}
    closed_depth(bb, exit_pol, pixels[: args.batch * 2], args.batch)  # warm-up
    out["exit"] = closed_depth(bb, exit_pol, pixels, args.batch)
    out["never_exit"] = closed_depth(bb, never, pixels, args.batch)
    out["drop"] = closed_drop(bb, clf, pixels, args.batch)
    for k in ("exit", "never_exit", "drop"):
        c = out[k]
        occ = c["min_layer_occupancy"]
        log(f"  {k:>10}: {c['rps']:8.1f} img/s  FLOPs ratio {c['flops_ratio']:.3f}  min layer occupancy "
            + ("n/a" if occ is None else f"{occ:.2f}"))
    out["open_loop"] = []
    for frac in args.loads:
        rate = frac * out["exit"]["rps"]
        row = {"load": frac, "rate": rate,
               "exit": open_depth(bb, exit_pol, pixels, args.batch, rate, args.seconds, args.seed, args.wait_ms / 1000),
               "drop": open_drop(bb, clf, pixels, args.batch, rate, args.seconds, args.seed, args.wait_ms / 1000)}
        out["open_loop"].append(row)
        log(f"  open loop at {rate:.0f}/s: depth queues p50/p95/p99 {row['exit']['p50_ms']:.1f}/"
            f"{row['exit']['p95_ms']:.1f}/{row['exit']['p99_ms']:.1f} ms; exit-and-drop "
            f"{row['drop']['p50_ms']:.1f}/{row['drop']['p95_ms']:.1f}/{row['drop']['p99_ms']:.1f} ms")
    out["soak"] = soak(bb, exit_pol, pixels, args.batch, args.soak)
    log(f"  soak of {args.soak} images: RSS {out['soak']['rss_mb_before']:.0f} -> {out['soak']['rss_mb_after']:.0f} MB")
    out["summary"] = {"rps_exit": out["exit"]["rps"], "rps_never_exit": out["never_exit"]["rps"],
                      "rps_drop_batching": out["drop"]["rps"],
                      "speedup_vs_never_exit": out["exit"]["rps"] / out["never_exit"]["rps"],
                      "speedup_vs_drop": out["exit"]["rps"] / out["drop"]["rps"],
                      "p95_ms_exit": out["open_loop"][-1]["exit"]["p95_ms"] if out["open_loop"] else None,
                      "min_layer_occupancy": out["exit"]["min_layer_occupancy"],
                      "rss_growth": out["soak"]["rss_growth"]}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="embedded model only, few images (well under a minute)")
    p.add_argument("--models", default="embedded,vit_b32")
    p.add_argument("--n", type=int, default=2000, help="test images (closed loop, and the open-loop pool)")
    p.add_argument("--n-calib", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--wait-ms", type=float, default=5.0)
    p.add_argument("--loads", default="0.5,0.8", help="open-loop rates as fractions of the closed-loop rate")
    p.add_argument("--seconds", type=float, default=10.0, help="open-loop duration bound per case")
    p.add_argument("--soak", type=int, default=20000, help="images through the exit server for the RSS check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the depth queues are meant for a GPU)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--work", default="results/serve_load_work")
    p.add_argument("--json")
    args = p.parse_args()
    if args.quick:
        args.models, args.n, args.n_calib, args.batch, args.seconds, args.soak = "embedded", 256, 120, 16, 1.5, 768
        args.loads, args.threads = "0.5", args.threads or 1
    args.loads = [float(x) for x in str(args.loads).split(",") if x]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"bench": "serve_load", "quick": args.quick, "settings": {k: v for k, v in vars(args).items()},
              "results": [bench(m, args, work) for m in args.models.split(",")]}
    text = json.dumps(report, indent=1)
    if args.json:
        from tgems.io import write_json

        write_json(args.json, report)
    else:
        print(text)


if __name__ == "__main__":
    main()
