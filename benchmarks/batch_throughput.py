"""End-to-end batch throughput (decode + encoder + parquet writing) and memory of `tgems classify`.

Cases, in one run on one machine, same decoding (the streaming reader with --workers processes),
same batch size, same writer:
  plain     the plain HF pipeline: get_image_features + zero-shot softmax, every layer
  tgems     the early-exit classifier calibrated at budget 0.5 (its measured FLOPs ratio is reported)
  ray       the same classifier on Ray actors (a local Ray with every CPU, actors and threads chosen by
            tgems); `ray` is images per second once Ray and the actors are up, `ray_startup_s` beside it
  plain_1080p, tgems_1080p   plain and tgems on --n-1080p JPEGs of 1920x1080 (the workers resize and crop)
  embedded  the shipped embedded model and T-GEM (budget 0.5) on `scenes` JPEGs (32 px)
  tgems_depth  (with --scheduler: only this and tgems) the same classifier with `--scheduler depth`
            (depth queues refilled from the stream) against exit-and-drop; `depth_over_drop` is the ratio;
            also embedded / embedded_depth, and `encoder_*`: the encode stage alone on one thread, timed by
            CPU time (the steady figure when other jobs share the machine)
on a ViT-B/32-shaped CLIP with random weights (the decisions are meaningless, their cost is real) and
--n JPEGs at 224 px. Each case also reports its per-stage seconds (`<case>_stages`: read, decode,
preprocess, normalize, encode, write, queue waits). `--quick` is a smoke run of every case (a minute or
two), not a measurement. Peak resident memory of a `tgems classify` job is measured in a fresh subprocess
on --rss-n and --rss-n-big images (embedded model, scenes JPEGs, so the big case stays cheap): the job
streams, so the two should be about equal.

    python benchmarks/batch_throughput.py --n 2000 --n-big 20000 --json results/batch_throughput.json
    python benchmarks/batch_throughput.py --scheduler [--quick]    # drop vs depth only (quick: under a minute)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers.make_tiny_clip writes HF CLIP directories of any shape


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_jpegs(root: Path, n: int, size, seed: int = 0) -> str:
    """n scenes images as JPEGs (upscaled to `size` px, or to (width, height), when given), in blocks of 1,000
    per sub-folder."""
    from PIL import Image

    import tgems

    root = Path(root)
    done = root / f".done-{n}-{'x'.join(map(str, size)) if isinstance(size, (tuple, list)) else size}"
    if done.exists():
        return str(root)
    step = 1000
    for start in range(0, n, step):
        ds = tgems.load_dataset(f"scenes:test:{min(step, n - start)}", seed=seed + start)
        d = root / f"b{start // step:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(len(ds)):
            img = ds.pil(i)
            if size:
                img = img.resize(tuple(size) if isinstance(size, (tuple, list)) else (size, size), Image.BICUBIC)
            img.save(d / f"{start + i:06d}.jpg", quality=90)
    done.write_text("ok")
    return str(root)


def vit_b32(path: Path, quick: bool = False) -> str:
    """A random-init CLIP with ViT-B/32's vision tower (12 x 768, patch 32, 224 px); a small text side.
    With `quick`, a 12 x 64 tower of the same input size: the stages run, nothing is measured."""
    from helpers import WORDS, make_tiny_clip

    import tgems

    width, heads, mlp = (64, 2, 128) if quick else (768, 12, 3072)
    if not (path / "config.json").exists():
        words = tuple(WORDS) + tuple(w for c in tgems.load_dataset("scenes:test:10").classes for w in c.split())
        make_tiny_clip(path, layers=12, width=width, heads=heads, mlp=mlp, patch=32, image_size=224,
                       projection=64 if quick else 512, text_layers=2, text_width=128, text_heads=2, max_length=16,
                       resize=224, seed=0, words=words)
    return str(path)


class PlainCLIP:
    """The plain HF pipeline as a predictor: get_image_features on every layer, cosine with the class texts.

    It has a `backbone`, so the job's workers resize and crop for it as they do for tgems."""

    def __init__(self, bb, labels):
        import torch

        self.bb, self.backbone, self.labels = bb, bb, list(labels)
        with torch.no_grad():
            t = bb.encode_text(self.labels)
        self.text = torch.nn.functional.normalize(t.float(), dim=-1)
        self.scale = float(bb.model.logit_scale.exp())

    def predict(self, images):
        import torch

        from tgems.engine import full_flops

        with torch.no_grad():
            px = images if isinstance(images, torch.Tensor) else self.bb.preprocess(images)
            z = self.bb.model.get_image_features(pixel_values=px)
            z = z if isinstance(z, torch.Tensor) else z.pooler_output
            probs = (self.scale * torch.nn.functional.normalize(z.float(), dim=-1) @ self.text.T).softmax(-1)
        idx = probs.argmax(1).numpy()
        n, L = len(px), self.bb.num_layers
        return SimpleNamespace(labels=[self.labels[i] for i in idx], indices=idx, probs=probs.numpy(),
                               exit_layers=np.full(n, L), flops=np.full(n, full_flops(self.bb, len(self.labels))),
                               flops_ratio=np.ones(n))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decoding workers are joined at the end)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def timed_job(predictor, data, out, args, settings, scheduler=None):
    """(images per wall second, summary, images per CPU second): on a shared machine the CPU figure is the
    steadier one."""
    from tgems.jobs.runner import run_job
    from tgems.spec import JobSpec

    job = JobSpec(data=data, out=str(out), batch_size=args.batch_size, workers=args.workers,
                  **({"scheduler": scheduler} if scheduler else {}))
    t, c = time.perf_counter(), _cpu_seconds()
    s = run_job(predictor, job, settings=settings, progress=False)
    dt, dc = time.perf_counter() - t, _cpu_seconds() - c
    s["images_per_cpu_s"] = round(s["images"] / dc, 2) if dc > 0 else None
    return s["images"] / dt, s


def encoder_only(clf, pixels, batch_size: int, repeats: int) -> dict:
    """The encode stage alone on the same pixels: micro-batches through `predict` (drop) against
    `predict_rows` through a DepthScheduler (depth). Torch on one thread, timed by this process's CPU time
    (other jobs on a shared machine barely move it), median of interleaved repeats."""
    import statistics

    import torch

    from tgems.scheduling.depth import DepthScheduler, predict_rows

    def drop():
        return [clf.predict(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]

    def depth():
        sched = DepthScheduler(clf.backbone, max_batch_size=batch_size, queue_size=len(pixels))
        return predict_rows(sched, [(pixels, clf.policy())])[0]

    threads, times = torch.get_num_threads(), {"drop": [], "depth": []}
    torch.set_num_threads(1)
    try:
        for _ in range(repeats):
            for name, fn in (("drop", drop), ("depth", depth)):
                c = time.process_time()
                out = fn()
                times[name].append(time.process_time() - c)
                if name == "drop":
                    layers = np.concatenate([p.exit_layers for p in out])
                else:
                    assert np.array_equal(layers, [r.exit_layer for r in out]), "depth took other exits than drop"
    finally:
        torch.set_num_threads(threads)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n": len(pixels), "drop_per_cpu_s": round(len(pixels) / med["drop"], 2),
            "depth_per_cpu_s": round(len(pixels) / med["depth"], 2),
            "depth_over_drop": round(med["drop"] / med["depth"], 3), "mean_exit_layer": round(float(layers.mean()), 3)}


def rss_child(argv):
    """Subprocess: one `tgems classify` job with the embedded model; prints its peak RSS in MB."""
    data, out = argv
    from tgems.batch import run_command

    summary, code = run_command(data=f"folder:{data}", out=out, labels_file=str(Path(out).parent / "labels.txt"),
                                workers=2, batch_size=64, quiet=True)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report its parent's peak
    peak_kb = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
                   if ln.startswith("VmHWM:"))
    print(json.dumps({"images": summary["images"], "rss_mb": peak_kb / 1024}))


def measure_rss(work: Path, n: int) -> float:
    import tgems

    data = make_jpegs(work / f"scenes32_{n}", n, None, seed=1)
    labels = work / "labels.txt"
    labels.write_text("\n".join(tgems.load_dataset("scenes:test:10").classes))
    out = work / f"rss_out_{n}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, __file__, "--_rss-child", data, str(out)], capture_output=True, text=True,
                         check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["images"] == n, got
    return round(got["rss_mb"], 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="224 px JPEGs for the throughput cases")
    p.add_argument("--n-big", type=int, default=20000, help="images of the big memory case")
    p.add_argument("--rss-n", type=int, default=None, help="images of the small memory case (default: --n)")
    p.add_argument("--n-embedded", type=int, default=None, help="scenes JPEGs for the embedded case (default: --n)")
    p.add_argument("--n-calib", type=int, default=300, help="images for the sample profiles and calibration")
    p.add_argument("--n-1080p", type=int, default=200, help="1920x1080 JPEGs for the 1080p cases")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of every case on a few images (checks the script, measures nothing)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="results/batch_bench", help="scratch folder (gitignored)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of plain and tgems (best counts)")
    p.add_argument("--skip", default="",
                   help="comma-separated cases to skip: plain,tgems,ray,plain_1080p,tgems_1080p,embedded,rss")
    p.add_argument("--scheduler", action="store_true",
                   help="compare the job schedulers only: exit-and-drop (tgems) against depth queues (tgems_depth)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--_rss-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._rss_child:
        return rss_child(args._rss_child)
    if args.quick:
        args.n, args.n_big, args.rss_n, args.n_embedded, args.n_calib = 96, 128, 64, 64, 40
        args.n_1080p, args.batch_size, args.repeats = 8, 16, 1
        args.work = str(Path(args.work).with_name(Path(args.work).name + "_quick"))
    import shutil

    import torch

    import tgems
    from tgems.spec import JobSpec, PredictorSpec, predictor_settings
    from tgems.io import write_json

    skip = set(filter(None, args.skip.split(",")))
    if args.scheduler:
        skip |= {"plain", "ray", "plain_1080p", "tgems_1080p", "rss"}
        if args.quick:  # the ViT case smaller than the full quick run (its random exits are all at layer 1), the
            args.n, args.n_calib, args.n_embedded = 64, 24, 320  # embedded one (real exits) larger: < 1 min
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"n": args.n, "batch_size": args.batch_size, "workers": args.workers, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "quick": args.quick, "scheduler_comparison": args.scheduler}

    vit_cases = {"plain", "tgems", "ray", "plain_1080p", "tgems_1080p"}
    if vit_cases <= skip:  # nothing needs the ViT-B/32-shaped model
        args.repeats = 0
        skip.add("ray")
    t = time.perf_counter()
    data = "folder:" + make_jpegs(work / f"jpeg224_{args.n}", args.n, 224)
    log(f"{args.n} JPEGs at 224 px ready ({time.perf_counter() - t:.0f} s)")
    clf = bb = None
    if not vit_cases <= skip:
        bb = tgems.load_backbone(vit_b32(work / ("vit_quick" if args.quick else "vit_b32"), quick=args.quick))
        calib = tgems.load_dataset(f"scenes:calib:{args.n_calib}", seed=0)
        t = time.perf_counter()
        from tgems.features import extract_features

        feats = extract_features(bb, calib, rates=False, progress=False)  # once: profiles, Jumper, calibration
        # sample profiles (k images per class): a T-GEM fit is not needed to measure speed
        from tgems.training.jumper_fit import from_samples

        clf = from_samples(bb, calib, k=4, feats=feats)
        clf = clf.calibrate(feats, budget=0.5, use_labels=False)
        log(f"ViT-B/32-shaped classifier built and calibrated at budget 0.5 ({time.perf_counter() - t:.0f} s)")
    settings = {"bench": "vit_b32", "n_calib": args.n_calib}

    def case(name, fn):
        if name in skip:
            return
        shutil.rmtree(work / f"out_{name}", ignore_errors=True)
        t0 = time.perf_counter()
        try:
            res.update(fn())
        except Exception as e:  # one failing case should not hide the others
            res[name] = None
            res[f"{name}_error"] = f"{type(e).__name__}: {e}"
        log(f"{name}: {res.get(name)} img/s ({time.perf_counter() - t0:.0f} s)")

    def plain(name="plain", data=data):
        ips, s = timed_job(PlainCLIP(bb, clf.labels), data, work / f"out_{name}", args, {**settings, "plain": 1})
        return {name: round(ips, 1), f"{name}_per_cpu_s": s["images_per_cpu_s"], f"{name}_stages": s["stages"]}

    def tg(name="tgems", data=data, scheduler="drop"):
        ips, s = timed_job(clf, data, work / f"out_{name}", args, settings, scheduler)
        out = {name: round(ips, 1), f"{name}_per_cpu_s": s["images_per_cpu_s"], f"{name}_stages": s["stages"]}
        if name == "tgems":
            out.update(flops_ratio=round(s["flops_ratio"], 4), tgems_mean_exit_layer=round(s["mean_exit_layer"], 3))
        if name == "tgems_depth":
            out.update(depth_flops_ratio=round(s["flops_ratio"], 4),
                       depth_mean_exit_layer=round(s["mean_exit_layer"], 3))
        return out

    def tg_depth():
        return tg("tgems_depth", scheduler="depth")

    def hd(fn, name):
        def run():
            t = time.perf_counter()
            hd_data = "folder:" + make_jpegs(work / f"jpeg1080p_{args.n_1080p}", args.n_1080p, (1920, 1080))
            log(f"{args.n_1080p} JPEGs at 1920x1080 ready ({time.perf_counter() - t:.0f} s)")
            return {**fn(name, hd_data), "n_1080p": args.n_1080p}
        return run

    def ray_case():
        import ray

        from tgems.integrations.ray import run_ray_job

        saved = work / "vit_b32_classifier"
        shutil.rmtree(saved, ignore_errors=True)
        clf.save(saved)
        try:  # run_ray_job starts a local Ray on every CPU and chooses actors and threads itself
            s = run_ray_job(PredictorSpec(classifier=str(saved)),
                            JobSpec(data=data, out=str(work / "out_ray"), batch_size=args.batch_size), progress=False)
            st = s["stages"]
            if s["engine"] != "ray":
                raise RuntimeError("the job was small enough to run locally; raise --n")
            return {"ray": round(s["images"] / st["ray_run_s"], 1),
                    "ray_startup_s": round(st["ray_startup_s"] + st["actor_startup_s"], 2), "ray_stages": st,
                    "ray_actors": s["actors"], "ray_threads": s["threads"]}
        finally:
            ray.shutdown()

    built = {}

    def embedded_classifier():
        if not built:
            labels = tgems.load_dataset("scenes:test:10").classes
            # label-free calibration: scenes:calib has no image of the 12 held-out (text-only) classes
            calib = f"scenes:calib:{200 if args.quick else 2000}"
            spec = PredictorSpec(labels=labels, budget=0.5, calib=calib, label_free=True).check()
            clf = spec.build()
            built.update(clf=clf, settings=predictor_settings(clf))
        return built["clf"]

    def embedded(name="embedded", scheduler="drop"):
        n = args.n_embedded or args.n
        edata = "folder:" + make_jpegs(work / f"scenes32_{n}", n, None, seed=1)
        embedded_classifier()
        ips, s = timed_job(built["clf"], edata, work / f"out_{name}", args, built["settings"], scheduler)
        return {name: round(ips, 1), f"{name}_per_cpu_s": s["images_per_cpu_s"],
                f"{name}_flops_ratio": round(s["flops_ratio"], 4), "n_embedded": n, f"{name}_stages": s["stages"]}

    def embedded_depth():
        return embedded("embedded_depth", "depth")

    def encoders():
        """drop vs depth on the encode stage alone (one thread, CPU time): the steady figure on a shared machine."""
        out = {}
        if "embedded" not in skip:
            eclf = embedded_classifier()
            n = 256 if args.quick else 1024
            px = eclf.backbone.preprocess(list(tgems.load_dataset(f"scenes:test:{n}", seed=3).images))
            out["encoder_embedded"] = encoder_only(eclf, px, args.batch_size, 3)
        if clf is not None and not args.quick:  # the quick ViT's random exits are all at layer 1: nothing to see
            px = clf.backbone.preprocess(list(tgems.load_dataset("scenes:test:64", seed=3).images))
            out["encoder_vit_b32"] = encoder_only(clf, px, args.batch_size, 2)
        return out

    def rss():
        return {"rss_mb_2000": measure_rss(work, args.rss_n or args.n), "rss_mb_20000": measure_rss(work, args.n_big),
                "rss_n": args.rss_n or args.n, "rss_n_big": args.n_big}

    timed = (("plain", plain), ("tgems", tg)) + ((("tgems_depth", tg_depth), ("embedded", embedded),
                                                  ("embedded_depth", embedded_depth)) if args.scheduler else ())
    for r in range(args.repeats):  # interleaved, best of R: the machine may be shared
        for name, fn in timed:
            best = {k: res.get(k) for k in (name, f"{name}_per_cpu_s")}
            case(name, fn)
            for k, v in best.items():
                if v and res.get(k) and v > res[k]:
                    res[k] = v
        res["repeats"] = r + 1
    case("ray", ray_case)
    case("plain_1080p", hd(plain, "plain_1080p"))
    case("tgems_1080p", hd(tg, "tgems_1080p"))
    if args.scheduler:
        case("encoders", encoders)
    else:
        case("embedded", embedded)
    case("rss", rss)
    if res.get("plain") and res.get("tgems"):
        res["tgems_over_plain"] = round(res["tgems"] / res["plain"], 3)
    if res.get("plain_per_cpu_s") and res.get("tgems_per_cpu_s"):
        res["tgems_over_plain_cpu"] = round(res["tgems_per_cpu_s"] / res["plain_per_cpu_s"], 3)
    if res.get("tgems") and res.get("tgems_depth"):
        res["depth_over_drop"] = round(res["tgems_depth"] / res["tgems"], 3)
        res["depth_over_drop_cpu"] = round(res["tgems_depth_per_cpu_s"] / res["tgems_per_cpu_s"], 3)
        res["depth_same_exits"] = res["flops_ratio"] == res["depth_flops_ratio"]
    if res.get("embedded") and res.get("embedded_depth"):
        res["embedded_depth_over_drop"] = round(res["embedded_depth"] / res["embedded"], 3)
        res["embedded_depth_over_drop_cpu"] = round(res["embedded_depth_per_cpu_s"] / res["embedded_per_cpu_s"], 3)
        res["embedded_depth_same_exits"] = res["embedded_flops_ratio"] == res["embedded_depth_flops_ratio"]
    if res.get("ray") and res.get("tgems"):
        res["ray_over_tgems"] = round(res["ray"] / res["tgems"], 3)
    if res.get("plain_1080p") and res.get("tgems_1080p"):
        res["tgems_over_plain_1080p"] = round(res["tgems_1080p"] / res["plain_1080p"], 3)
    if res.get("rss_mb_2000") and res.get("rss_mb_20000"):
        res["rss_big_over_small"] = round(res["rss_mb_20000"] / res["rss_mb_2000"], 3)
    print(json.dumps(res, indent=1))
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
