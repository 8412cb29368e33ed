"""The demo's story on one backbone (the shipped embedded CLIP by default): every method over the budget
sweep on the procedural scenes, measured throughput, the max-drop guarantee study, a table and a plot."""
from __future__ import annotations

import time
from pathlib import Path

from tgems.evaluation.guarantee import guarantee_pool, guarantee_study
from tgems.evaluation.harness import DEFAULT_BUDGETS, default_aux, make_report
from tgems.evaluation.plots import tradeoff_plot
from tgems.io import write_json

DEMO_TGEMS = ("embedded:cls", "embedded:rates")


def _ensure_tgems(bb, tgems, out: Path, seed: int, progress: bool, log) -> list:
    """The given checkpoints; a shipped one missing from this install is fitted quickly into `out`."""
    from tgems.pretrained import tgem_path

    dirs = []
    for name in tgems:
        d = tgem_path(name)
        if not (d / "tgem.json").exists() and str(name).startswith("embedded:"):
            from tgems.data import load_dataset
            from tgems.tgem import save_tgem
            from tgems.training.fit import FitSettings, fit_tgem

            space = str(name).split(":")[1]
            d = out / f"tgem_{space}"
            log(f"no shipped T-GEM ({space}) found: fitting one quickly into {d}")
            data = load_dataset("scenes:train", n=6000, seed=seed)
            tgem, jumper, info = fit_tgem(bb, data, FitSettings(space=space, epochs=15, seed=seed), progress=progress)
            save_tgem(d, tgem, jumper, bb, info, "scenes:train:6000")
        dirs.append(d)
    return dirs


def retrieval_check(bb, ft, fc, text, budget: float = 0.6, k: int = 10) -> dict:
    """The shipped early-exit index at a budget, on cached features: the class texts as queries over the test
    images, precision@k (an image is relevant when it shows the query's class) against full CLIP's, and the
    overlap of the top k with full CLIP's top k."""
    import torch
    import torch.nn.functional as F

    from tgems.engine import full_flops
    from tgems.evaluation.harness import analytic_flops
    from tgems.retrieval import calibrate_index, load_index_model

    model = load_index_model("embedded:retrieval", bb).to("cpu")
    tau, _ = calibrate_index(model, fc.z, budget=budget, patch=fc.patch)
    emb, depth = model.simulate(ft.z, tau, ft.patch)
    full = F.normalize(ft.z[:, -1].float(), dim=-1)
    q = text.float().cpu()
    top_idx = (q @ F.normalize(emb.float(), dim=-1).t()).topk(k, dim=1).indices
    top_full = (q @ full.t()).topk(k, dim=1).indices
    cls = torch.arange(len(q))[:, None]
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_idx, top_full)]
    flops = analytic_flops(bb, depth, model.layers, model.head_flops())
    return {"budget": budget, "k": k, "queries": len(q), "images": len(ft),
            "precision": round(float((ft.labels[top_idx] == cls).float().mean()), 4),
            "precision_full": round(float((ft.labels[top_full] == cls).float().mean()), 4),
            "overlap_full": round(float(sum(overlap) / len(overlap)), 4),
            "mean_layers": round(float(depth.double().mean()), 3),
            "flops_ratio": round(float(flops.mean() / full_flops(bb)), 4)}


def run_demo(model: str = "embedded", tgems=None, out="results/demo", n: int | None = None,
             speed: bool = True, seed: int = 0, progress: bool = True, device="cpu", dtype="float32",
             log=print) -> dict:
    """Run the demo and write `out/results.json` and `out/tradeoff.png`; returns the report."""
    import torch

    from tgems.backbones import load_backbone
    from tgems.data import load_dataset
    from tgems.features import LayerFeatures

    t0 = time.time()
    out = Path(out)
    bb = load_backbone(model, device=device, dtype=dtype)
    log(f"model: {model} ({bb.num_layers} blocks, width {bb.width}, {bb.image_size}px, {bb.device}, {bb.dtype})")
    tgems = tuple(tgems or DEMO_TGEMS)
    dirs = _ensure_tgems(bb, tgems, out, seed, progress, log)
    test = load_dataset("scenes:testall", n=n, seed=seed)
    calib, train, shots = default_aux("scenes:test", 4000, seed)
    report, raw = make_report(bb, model, dirs, test, calib, train, shots, DEFAULT_BUDGETS, seed, progress,
                              speed, log=log)
    ref = raw["classifiers"]["tgem_cls"]
    if n is None:  # as benchmarks/guarantee.py
        log("max-drop guarantee: 20 draws of 2,900 calibration / 20,000 test images, eps 0.01, delta 0.1")
        pool = guarantee_pool(bb, 2900, 20000, seed, progress=progress)
        frac = 2900 / len(pool)
    else:
        log("max-drop guarantee: 20 calibration/test half-splits of the demo's images, eps 0.01, delta 0.1")
        ft, fc = raw["features"]["test"], raw["features"]["calib"]
        pool = LayerFeatures(torch.cat([fc.z, ft.z]), None, torch.cat([fc.labels, ft.labels]), classes=ft.classes,
                             patch=torch.cat([fc.patch, ft.patch]))
        frac = 0.5
    report["guarantee"] = guarantee_study(ref, pool, eps=0.01, delta=0.1, n_splits=20, seed=seed,
                                          calib_fraction=frac)
    if model == "embedded":
        report["retrieval"] = retrieval_check(bb, raw["features"]["test"], raw["features"]["calib"], ref.text)
    report["data"] = "scenes:testall"
    report["tgem"] = [str(d) for d in tgems]
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out / "results.json", report)
    tradeoff_plot(report, out / "tradeoff.png", title=f"T-GEMs on {model} (scenes:testall)")
    log(f"wrote {out / 'results.json'} and {out / 'tradeoff.png'} in {report['seconds']:.0f} s")
    return report
