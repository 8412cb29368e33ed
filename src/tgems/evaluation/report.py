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


def summary_line(results, budget: float = 0.5, warnings=None) -> str:
    """The headline at one budget. Degenerate data (report["warnings"]) replaces the headline; a throughput
    ratio is printed only with the reasons it cannot be trusted when the repeats spread or the machine was
    busy (the records' ips_min / ips_max / load / cores)."""
    from tgems.evaluation.harness import timing_doubts

    t, f = pick(results, "tgem_cls", budget), pick(results, "full")
    if t is None or f is None:
        return "no T-GEM result at that budget"
    from tgems.evaluation.harness import DEGENERATE_KINDS

    degenerate = [w for w in warnings or [] if w.get("kind") in DEGENERATE_KINDS]
    if degenerate:
        return (f"no result to report: {degenerate[0]['message']} (T-GEM at budget {budget}: accuracy "
                f"{100 * t['accuracy']:.2f}%, full {100 * f['accuracy']:.2f}%; a speed-up on such data means nothing)")
    speed = ""
    if t["images_per_second"] and f["images_per_second"]:
        ratio = t["images_per_second"] / f["images_per_second"]
        doubts = [f"{who} {d}" for who, r in (("T-GEM", t), ("full", f)) for d in timing_doubts(r)
                  if d.startswith("repeats")] + sorted({d for d in timing_doubts(t) + timing_doubts(f)
                                                        if d.startswith(("load", "the timed"))})
        if doubts:
            speed = f", measured throughput not to be trusted ({'; '.join(doubts)}; median ratio {ratio:.2f} x)"
        else:
            speed = (f", {ratio:.2f} x measured throughput (T-GEM {t['ips_min']:.0f}-{t['ips_max']:.0f}, full "
                     f"{f['ips_min']:.0f}-{f['ips_max']:.0f} img/s)" if "ips_min" in t and "ips_min" in f
                     else f", {ratio:.2f} x measured throughput")
    return (f"T-GEM at budget {budget}: accuracy {100 * t['accuracy']:.2f}% (full {100 * f['accuracy']:.2f}%), "
            f"{1 / t['flops_ratio']:.2f} x fewer encoder FLOPs{speed}")


def retrieval_line(r: dict) -> str:
    return (f"retrieval at budget {r['budget']} ({r['queries']} class-text queries over {r['images']} images): "
            f"precision@{r['k']} {100 * r['precision']:.2f}% (full CLIP {100 * r['precision_full']:.2f}%), "
            f"top-{r['k']} overlap with full CLIP {100 * r['overlap_full']:.1f}%, {r['mean_layers']:.2f} layers, "
            f"FLOPs ratio {r['flops_ratio']:.3f}")


def guarantee_line(g: dict) -> str:
    return (f"max_drop guarantee (eps {g['eps']}, delta {g['delta']}): disagreement <= eps on "
            f"{g['held']}/{g['n_splits']} draws of {g['n_calib']} calibration images "
            f"(test parts of {g['n_test']}), mean {g['mean_test_layers']:.2f} layers")


def max_drop_line(results, eps: float, delta: float, warnings=None) -> str:
    """One line per T-GEM calibrated for a max drop: the promise and what the test images measured
    (prefixed by the degenerate-data warning, if any: agreement on such data is trivially high)."""
    from tgems.evaluation.harness import DEGENERATE_KINDS

    degenerate = [w["message"] for w in warnings or [] if w.get("kind") in DEGENERATE_KINDS]
    prefix = f"no result to report: {degenerate[0]}; " if degenerate else ""
    rows = [r for r in results if r.get("max_drop") == eps and r["split"] == "all"]
    parts = [f"{r['method']}: disagreement {100 * (1 - r['agreement']):.2f}% at {r['mean_layers']:.2f} layers "
             f"(FLOPs ratio {r['flops_ratio']:.3f})" for r in rows]
    return prefix + f"max_drop {eps} with delta {delta}: " + ("; ".join(parts) or "no T-GEM result")
