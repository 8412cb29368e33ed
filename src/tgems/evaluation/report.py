"""The report of `tgems eval` / `tgems demo`: its table and its one-line summary (schema: docs/design.md)."""
from __future__ import annotations


def format_table(results, num_layers: int) -> str:
    head = f"{'method':<11}{'budget':>7}{'split':>9}{'acc %':>8}{'agree %':>9}{'layers':>8}{'FLOPs':>8}{'img/s':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        budget = "" if r["budget"] is None else f"{r['budget']:.2f}"
        name = r["method"] + (f"@{r['layer']}" if r.get("layer") else "")
        ips = "" if r["images_per_second"] is None else f"{r['images_per_second']:.0f}"
        lines.append(f"{name:<11}{budget:>7}{r['split']:>9}{100 * r['accuracy']:>8.2f}{100 * r['agreement']:>9.2f}"
                     f"{r['mean_layers']:>8.2f}{r['flops_ratio']:>8.3f}{ips:>9}")
    return "\n".join(lines)


def pick(results, method, budget=None, split="all"):
    for r in results:
        if r["method"] == method and r["split"] == split and (budget is None or r["budget"] == budget):
            return r
    return None


def summary_line(results, budget: float = 0.5) -> str:
    t, f = pick(results, "tgem_cls", budget), pick(results, "full")
    if t is None or f is None:
        return "no T-GEM result at that budget"
    speed = ""
    if t["images_per_second"] and f["images_per_second"]:
        speed = f", {t['images_per_second'] / f['images_per_second']:.2f} x measured throughput"
    return (f"T-GEM at budget {budget}: accuracy {100 * t['accuracy']:.2f}% (full {100 * f['accuracy']:.2f}%), "
            f"{1 / t['flops_ratio']:.2f} x fewer encoder FLOPs{speed}")


def guarantee_line(g: dict) -> str:
    return (f"max_drop guarantee (eps {g['eps']}, delta {g['delta']}): disagreement <= eps on "
            f"{g['held']}/{g['n_splits']} draws of {g['n_calib']} calibration images "
            f"(test parts of {g['n_test']}), mean {g['mean_test_layers']:.2f} layers")


def max_drop_line(results, eps: float, delta: float) -> str:
    """One line per T-GEM calibrated for a max drop: the promise and what the test images measured."""
    rows = [r for r in results if r.get("max_drop") == eps and r["split"] == "all"]
    parts = [f"{r['method']}: disagreement {100 * (1 - r['agreement']):.2f}% at {r['mean_layers']:.2f} layers "
             f"(FLOPs ratio {r['flops_ratio']:.3f})" for r in rows]
    return f"max_drop {eps} with delta {delta}: " + ("; ".join(parts) or "no T-GEM result")
