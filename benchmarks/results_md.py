"""Render docs/results.md from the records in docs/results/*.json (written by record.py).

    python benchmarks/results_md.py                    # rewrite docs/results.md
    python benchmarks/results_md.py --check            # exit 1 if docs/results.md is out of date
    python benchmarks/results_md.py --headline demo    # print the README's headline table of a record
    python benchmarks/results_md.py --readme           # rewrite the README's results section (demo record)

One section per record: title, command, date, machine, commit, then the tables a small formatter
makes of its "data", chosen by the record's "kind" (demo / eval reports, engine_speed, guarantee,
regularizer, seeds, targets, zero_shot_layers); any other kind gets a generic table. Nothing is typed by
hand: to change a figure, re-record it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
OUT = ROOT / "docs" / "results.md"

TITLES = {
    "demo": "Demo: every method on the embedded default (`tgems demo`)",
    "eval": "Evaluation report (`tgems eval`)",
    "zero_shot_layers": "Zero-shot top-1 of every layer's readout (logit lens)",
    "engine_speed": "Engine speed against the plain transformers forward",
    "guarantee": "max_drop guarantee over re-drawn calibration sets",
    "regularizer": "Rate-based regularizer on and off",
    "seeds": "T-GEM minus static truncation over fit seeds",
    "targets": "T-GEM against the baselines at the same budget (read off a demo report)",
    "jumper_seeds": "The Jumper over fit seeds and image draws (issue 12 targets)",
    "jumper_study": "The Jumper in isolation on cached features",
    "trajectory_ablation": "Exit recipes side by side: T-GEM, distilled readouts, mixed readouts (issue 27)",
    "retrieval": "Early-exit image-text retrieval on scenes captions (`benchmarks/retrieval.py`)",
    "serve_soak": "The server's resident memory over a long soak (`benchmarks/serve_soak.py`)",
}
ORDER = list(TITLES)
SPLITS = ("all", "seen", "heldout")
SPLIT_NAMES = {"all": "all", "seen": "seen", "heldout": "held-out"}


# ------------------------------------------------------------------ helpers


def pct(v, digits=2) -> str:
    return "" if v is None else f"{100 * v:.{digits}f}"


def num(v, digits=2) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 1000 else str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """Markdown table; `align` is one letter per column, l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ------------------------------------------------------------------ demo / eval reports


def _index(results):
    """{(method, budget, layer, split): record}"""
    return {(r.get("method"), r.get("budget"), r.get("layer"), r.get("split", "all")): r for r in results}


def _row_keys(results):
    seen, keys = set(), []
    for r in results:
        k = (r.get("method"), r.get("budget"), r.get("layer"))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    return keys


def _label(method, budget, layer):
    return method + (f" @ layer {layer}" if layer is not None else "")


def _ips(v):
    return "" if v is None else f"{v:.0f}"


def report_table(data: dict, keep=None) -> str:
    """One row per (method, budget[, layer]): accuracy per split, then agreement, layers, FLOPs, img/s
    of the whole test set. `keep(method, budget, layer)` filters the rows."""
    results = data.get("results") or []
    idx = _index(results)
    splits = [s for s in SPLITS if any(r.get("split", "all") == s for r in results)]
    header = ["method", "budget"] + [f"acc % {SPLIT_NAMES[s]}" for s in splits] + [
        "agreement %", "mean layers", "FLOPs ratio", "img/s"]
    rows = []
    for m, b, l in _row_keys(results):
        if keep is not None and not keep(m, b, l):
            continue
        base = idx.get((m, b, l, "all")) or next(r for k, r in idx.items() if k[:3] == (m, b, l))
        rows.append([_label(m, b, l), "" if b is None else f"{b:g}"]
                    + [pct(idx[(m, b, l, s)]["accuracy"]) if (m, b, l, s) in idx else "" for s in splits]
                    + [pct(base.get("agreement")), num(base.get("mean_layers")), num(base.get("flops_ratio"), 3),
                       _ips(base.get("images_per_second"))])
    return table(header, rows, "lr" + "r" * (len(header) - 2))


def headline_keep(data: dict):
    """The README's short table: full, static at L/4, L/2, 3L/4, lens at L/2, every budgeted method at
    the lowest, middle and highest budget, oracle."""
    L = int(data.get("num_layers") or 12)
    budgets = sorted({r["budget"] for r in data.get("results", []) if r.get("budget") is not None})
    show = {budgets[0], budgets[len(budgets) // 2], budgets[-1]} if budgets else set()
    static = {L // 4, L // 2, 3 * L // 4}

    def keep(m, b, l):
        if m == "static":
            return l in static
        if m == "lens":
            return l == L // 2
        return b is None or b in show
    return keep


def summary_line(data: dict, budget=0.5) -> str:
    idx = _index(data.get("results") or [])
    t = next((r for k, r in idx.items() if k[0] == "tgem_cls" and k[1] == budget and k[3] == "all"), None)
    f = next((r for k, r in idx.items() if k[0] == "full" and k[3] == "all"), None)
    if t is None or f is None:
        return ""
    s = (f"T-GEM (cls) at budget {budget:g}: accuracy {pct(t['accuracy'])} % (full model {pct(f['accuracy'])} %), "
         f"{1 / t['flops_ratio']:.2f}x fewer encoder FLOPs")
    if t.get("images_per_second") and f.get("images_per_second"):
        s += f", {t['images_per_second'] / f['images_per_second']:.2f}x measured throughput"
    return s + "."


def vs_static_table(data: dict) -> str:
    """T-GEM against static truncation at the same mean depth, per split and budget (paired, with s.e.)."""
    rows = []
    for r in data.get("results") or []:
        if r.get("vs_static") is None or not str(r.get("method", "")).startswith("tgem"):
            continue
        se = r.get("vs_static_se")
        rows.append([r["method"], SPLIT_NAMES.get(r.get("split"), r.get("split")), f"{r['budget']:g}",
                     num(r.get("mean_layers")), pct(r.get("accuracy")),
                     f"{100 * r['vs_static']:+.2f}" + ("" if se is None else f" ± {100 * se:.2f}")])
    if not rows:
        return ""
    return table(["method", "split", "budget", "mean layers", "acc %", "minus static (± s.e.), points"], rows,
                 "llrrrr")


def guarantee_block(g: dict) -> str:
    dis = [r["test_disagreement"] for r in g.get("rows", [])]
    line = (f"max_drop eps {g.get('eps')}, delta {g.get('delta')}: disagreement with the full model <= eps on "
            f"**{g.get('held')}/{g.get('n_splits')}** draws of {num(g.get('n_calib'))} calibration images "
            f"(test parts of {num(g.get('n_test'))} images)")
    if dis:
        line += (f"; test disagreement min {pct(min(dis))} %, median {pct(statistics.median(dis))} %, "
                 f"max {pct(max(dis))} %")
    if g.get("mean_test_layers") is not None:
        line += f"; mean executed layers {num(g['mean_test_layers'])}"
    return line + "."


def fmt_report(rec: dict) -> str:
    d = rec["data"]
    parts = []
    head = [f"Model `{d.get('model')}`, test data `{d.get('data')}`, {d.get('num_layers')} layers, seed {d.get('seed')}."]
    line = summary_line(d)
    if line:
        head.append(line)
    parts.append(" ".join(head))
    parts.append("Accuracy per class split; agreement with the full model, mean executed layers, FLOPs ratio "
                 "(per image, exit heads included, against plain CLIP: the full encoder and one scoring of the labels) "
                 "and measured throughput on the engine are over all test images.\n\n" + report_table(d))
    vs = vs_static_table(d)
    if vs:
        parts.append("T-GEM minus static truncation at the same mean depth (static interpolated between the two "
                     "fixed layers around it, paired over the same images):\n\n" + vs)
    ex = (d.get("extras") or {}).get("exit_layers") or {}
    if ex.get("histogram"):
        h = ex["histogram"]
        parts.append(f"Where T-GEM (cls) images exit at budget {ex.get('budget')}: "
                     + ", ".join(f"layer {k}: {v}" for k, v in h.items()) + "."
                     + ("" if not ex.get("mean_by_difficulty_quintile") else
                        " Mean exit layer by difficulty quintile, easiest first: "
                        + ", ".join(num(v) for v in ex["mean_by_difficulty_quintile"]) + "."))
    if isinstance(d.get("guarantee"), dict):
        parts.append(guarantee_block(d["guarantee"]))
    return "\n\n".join(parts)


# ------------------------------------------------------------------ benchmarks


def fmt_engine_speed(rec: dict) -> str:
    d = rec["data"]
    cases = [c for c in ("plain", "never_exit", "half_exit", "mixed", "readouts_half") if c in d]
    ratios = {"plain": 1.0, "never_exit": 1.0, "half_exit": d.get("half_flops_ratio"),
              "mixed": d.get("mixed_flops_ratio"), "readouts_half": d.get("readouts_flops_ratio")}
    rows = []
    for c in cases:
        r = ratios.get(c)
        rows.append([c, num(d[c], 1), f"{d[c] / d['plain']:.3f}x", num(r, 3), "" if not r else f"{1 / r:.3f}x"])
    txt = (f"Model `{d.get('model')}`, batch {d.get('batch')}, torch threads: {d.get('threads')}, median of "
           f"{d.get('repeats')} repeats, {d.get('clock')} clock.\n\n"
           + table(["case", "images/s", "vs plain", "FLOPs ratio", "speed-up the FLOPs predict"], rows))
    if all(c in d for c in ("plain", "never_exit", "half_exit", "mixed")) and d.get("mixed_flops_ratio"):
        never, half = d["never_exit"] / d["plain"], d["half_exit"] / d["plain"]
        mixed = half and d["mixed"] / d["plain"] * d["mixed_flops_ratio"]
        txt += (f"\n\nnever_exit overhead {100 * (1 - never):+.1f} % (target <= 5 %); half_exit {half:.2f}x "
                f"(target >= 1.8x); mixed at {100 * mixed:.0f} % of the speed-up its FLOPs predict (target >= 85 %).")
        if "readouts_half" in d:
            txt += (f" readouts_half (the default recipe's exit head at every candidate layer up to the middle, "
                    f"{d.get('classes')} labels) {d['readouts_half'] / d['plain']:.2f}x (target >= 1.8x).")
    return txt


def fmt_zero_shot_layers(rec: dict) -> str:
    d = rec["data"]
    rows = d.get("layers") or []
    cols = [c for c in SPLITS[1:] + ("all",) if rows and c in rows[0]]
    return (f"Top-1 of the readout z_l of every layer against the class texts ({d.get('num_classes')}-way, "
            f"prompt ensemble), model `{d.get('model')}` on `{d.get('data')}`. The last layer is the full model.\n\n"
            + table(["layer"] + [f"{SPLIT_NAMES[c]} %" for c in cols],
                    [[r["layer"]] + [pct(r[c]) for c in cols] for r in rows]))


def fmt_guarantee(rec: dict) -> str:
    g = rec["data"]
    rows = [[r.get("split"), num(r.get("tau"), 4), pct(r.get("test_disagreement")), num(r.get("test_mean_layers")),
             pct(r.get("calib_ucb"))] for r in g.get("rows", [])]
    out = guarantee_block(g) + "\n\n"
    if g.get("arms"):
        out += ("Per checkpoint, on the same pool and draws; the best single threshold is the fewest mean layers of "
                "one tau on the whole pool at disagreement <= eps (what the score's ranking allows):\n\n"
                + table(["arm", "checkpoint", "draws held", "mean layers", "best single threshold: layers"],
                        [[a["name"], f"`{a['tgem']}`", f"{a['held']}/{a['n_splits']}", num(a["mean_test_layers"]),
                          num(a["headroom"]["mean_layers"])] for a in g["arms"]]) + "\n\n")
    return out + table(["draw", "tau", "test disagreement %", "test mean layers", "calibration upper bound %"], rows)


def fmt_regularizer(rec: dict) -> str:
    d = rec["data"]
    curves = d.get("curves") or {}
    lams = list(curves)
    if not lams:
        return fmt_generic(rec)
    n = len(curves[lams[0]]["rows"])
    rows = []
    for i in range(n):
        rs = [curves[l]["rows"][i] for l in lams]
        rows.append([num(rs[0]["budget"])]
                    + [" / ".join(num(r["mean_layers"]) for r in rs)]
                    + [" / ".join(pct(r.get(k)) for r in rs) for k in ("acc_seen", "acc_heldout", "agreement")])
    lam_txt = " / ".join(lams)
    depth = "; ".join(f"lambda {l}: {curves[l].get('expected_depth_last_epoch')}" for l in lams)
    return (f"Model `{d.get('model')}`, seed {d.get('seed')}, r_target {d.get('r_target')}; each column is "
            f"lambda {lam_txt}. Expected depth under the soft exits at the last epoch: {depth}.\n\n"
            + table(["budget", "mean layers", "acc seen %", "acc held-out %", "agreement %"], rows))


def fmt_seeds(rec: dict) -> str:
    d = rec["data"]
    summary = d.get("summary") or []
    budgets = sorted({s["budget"] for s in summary})
    groups = []
    for s in summary:
        if (s["jumper"], s["split"]) not in groups:
            groups.append((s["jumper"], s["split"]))
    by = {(s["jumper"], s["split"], s["budget"]): s for s in summary}

    def cell(s, key):
        if s is None:
            return ""
        sd = s.get(f"{key}_sd")
        txt = f"{100 * s[f'{key}_mean']:+.2f}" if key == "vs_static" else pct(s[f"{key}_mean"])
        return txt + ("" if sd is None else f" ± {100 * sd:.2f}") + (
            f" ({s['ahead']}/{s['seeds']})" if key == "vs_static" else "")

    head = ["Jumper for budgets", "split"] + [f"{b:g}" for b in budgets]
    t1 = table(head, [[j, SPLIT_NAMES.get(sp, sp)] + [cell(by.get((j, sp, b)), "vs_static") for b in budgets]
                      for j, sp in groups], "ll" + "r" * len(budgets))
    t2 = table(head, [[j, SPLIT_NAMES.get(sp, sp)] + [cell(by.get((j, sp, b)), "accuracy") for b in budgets]
                      for j, sp in groups], "ll" + "r" * len(budgets))
    return (f"Model `{d.get('model')}`, fit seeds {d.get('seeds')}, test seed {d.get('test_seed')}. `goal` is the "
            f"default Jumper (no-loss model with z_l for budgets), `agree` the agreement model alone.\n\n"
            f"T-GEM minus static truncation at the same mean depth, points, mean ± sd over seeds (seeds ahead):\n\n"
            f"{t1}\n\nAccuracy %, mean ± sd over seeds:\n\n{t2}")


def fmt_targets(rec: dict) -> str:
    rows = []
    for r in rec["data"].get("rows") or []:
        se = r.get("vs_static_se")
        vs = "" if r.get("vs_static") is None else f"{100 * r['vs_static']:+.2f}" + ("" if se is None else f" ± {100 * se:.2f}")
        rows.append([r["method"], SPLIT_NAMES.get(r["split"], r["split"]), f"{r['budget']:g}", num(r.get("mean_layers")),
                     pct(r.get("accuracy")), pct(r.get("static_same_depth")), vs, pct(r.get("lens_same_depth")),
                     pct(r.get("sample")), pct(r.get("probe")), f"{100 * r['gap_to_full']:+.2f}"])
    return ("Static truncation and plain truncated CLIP (lens) are interpolated to T-GEM's mean depth; the 16-shot "
            "profiles (sample) and the probes are calibrated for the same budget. \"minus static\" is paired over "
            "the same images, with its standard error. Accuracy in %, differences in points.\n\n"
            + table(["method", "split", "budget", "mean layers", "acc %", "static, same depth", "minus static (± s.e.)",
                     "lens, same depth", "16-shot", "probe", "minus full"], rows, "llrrrrrrrrr"))


JUMPER_POLICIES = ("static", "shipped", "per_layer_tau", "agree_jumper", "confidence", "branchy", "oracle_agree",
                   "oracle_correct")


def fmt_jumper_study(rec: dict) -> str:
    """Accuracy per policy, split and budget, with the share of the static-to-oracle distance closed; then
    the Jumper's per-layer AUC."""
    d = rec["data"]
    res = d.get("results") or []
    budgets = d.get("budgets") or sorted({r["budget"] for r in res})
    by = {(r["policy"], r["split"], r["budget"]): r for r in res}
    pols = [p for p in JUMPER_POLICIES if any(k[0] == p for k in by)]
    rows = []
    for sp in ("seen", "heldout"):
        for p in pols:
            cells = []
            for b in budgets:
                r = by.get((p, sp, b))
                if r is None:
                    cells.append("")
                    continue
                cf = r.get("closed_fraction")
                if (r.get("oracle_agree_same_depth") or 0) - (r.get("static_same_depth") or 0) < 0.01:
                    cf = None  # under a point from static to the oracle: the share is noise
                cells.append(f"{pct(r['accuracy'], 1)} ({num(r['mean_layers'], 1)})"
                             + ("" if cf is None or p in ("static", "oracle_agree") else f" {cf:+.2f}"))
            rows.append([SPLIT_NAMES.get(sp, sp), p] + cells)
    auc = d.get("auc") or []
    auc_rows = [[r["layer"]] + [num(r.get(k), 3) for k in ("seen_no_loss_auc", "heldout_no_loss_auc", "seen_agree_auc",
                                                            "heldout_agree_auc")] for r in auc]
    return (f"T-GEM `{d.get('tgem')}` on `{d.get('test')}` (draw {d.get('seed')}), calibrated on `{d.get('calib')}`. "
            f"`shipped` is that checkpoint's budget Jumper; `static` exits at a fixed depth; `confidence` thresholds "
            f"the T-GEM top-1 probability; `branchy` thresholds per-layer linear probes trained with labels on the "
            f"seen classes (BranchyNet / SDN); the oracles know where the prediction equals the full model's (agree) "
            f"or is right (correct). Cells: accuracy % (mean layers) and the share of the distance from static to "
            f"the agreement oracle the policy closes at its own depth (left out where that distance is under a "
            f"point).\n\n"
            + table(["split", "policy"] + [f"budget {b:g}" for b in budgets], rows, "ll" + "r" * len(budgets))
            + "\n\nPer-layer AUC of the budget model for \"exiting here costs nothing\" and of the agreement model "
              "for \"equals the full model\":\n\n"
            + table(["layer", "no-loss seen", "no-loss held-out", "agree seen", "agree held-out"], auc_rows))


def fmt_jumper_seeds(rec: dict) -> str:
    d = rec["data"]
    rows = []
    for r in d.get("rows") or []:
        rows.append([SPLIT_NAMES.get(r["split"], r["split"]), f"{r['budget']:g}",
                     f"{pct(r['accuracy_mean'], 1)} ({pct(r['accuracy_min'], 1)} .. {pct(r['accuracy_max'], 1)})",
                     pct(r["agreement_mean"], 1), num(r["mean_layers"]), pct(r["static_mean"], 1),
                     f"{100 * r['vs_static_mean']:+.2f} ({r['runs_ahead_of_static_2se']}/{r['runs']})",
                     pct(r["confidence_mean"], 1), f"{100 * r['vs_confidence_mean']:+.2f}",
                     pct(r["branchy_mean"], 1), f"{100 * r['vs_branchy_mean']:+.2f}", pct(r["oracle_agree_mean"], 1),
                     "" if "target" not in r else f"{pct(r['target'], 1)} ({r['runs_meeting_target']}/{r['runs']})"])
        if "vs_against_mean" in r:
            rows[-1].append(f"{100 * r['vs_against_mean']:+.2f} ± {100 * (r['vs_against_sd'] or 0):.2f} "
                            f"({r['runs_ahead_of_against']}/{r['runs']}; {num(r['against_layers'])} layers)")
    against = bool(rows) and len(rows[0]) > 13
    return (f"{len(d.get('tgems') or [])} T-GEM fits (seeds) x image draws {d.get('draws')}; each run is "
            f"`benchmarks/jumper_study.py`. Accuracy %, mean over runs (min .. max); \"minus static\" in points with "
            f"the runs ahead by more than two paired standard errors; the baselines' columns are their accuracy and "
            f"the Jumper minus them.\n\n"
            + table(["split", "budget", "Jumper acc %", "agreement %", "mean layers", "static %",
                     "minus static (runs > 2 s.e.)", "confidence %", "minus conf.", "BranchyNet %", "minus Branchy",
                     "agree oracle %", "target (runs met)"] + (["minus --against (runs ahead)"] if against else []),
                    rows, "ll" + "r" * (12 if against else 11))
            + ("" if not against else f"\n\n`--against`: {', '.join(d.get('against') or [])}, paired by position "
               f"with the checkpoints above (same images); mean ± sd of the accuracy difference over the runs."))


def fmt_generic(rec: dict) -> str:
    """Scalars as a list, each list of flat records as a table; anything else as JSON."""
    d = rec["data"]
    if not isinstance(d, dict):
        return "```json\n" + json.dumps(d, indent=1)[:4000] + "\n```"
    parts, scalars = [], []
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            scalars.append(f"- {k}: {num(v, 4)}")
        elif isinstance(v, list) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
            shown = ", ".join(num(x, 4) for x in v[:50]) + (f", ... ({len(v)} in all)" if len(v) > 50 else "")
            scalars.append(f"- {k}: [{shown}]")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            cols = []
            for x in v:
                cols += [c for c, y in x.items() if c not in cols and not isinstance(y, (dict, list))]
            parts.append(f"`{k}`:\n\n" + table(cols, [[num(x.get(c), 4) for c in cols] for x in v[:100]],
                                                 "r" * len(cols)))
        else:
            parts.append(f"`{k}`:\n\n```json\n" + json.dumps(v, indent=1)[:2000] + "\n```")
    return "\n\n".join(["\n".join(scalars)] + parts if scalars else parts)


FORMATTERS = {"demo": fmt_report, "eval": fmt_report, "engine_speed": fmt_engine_speed,
              "zero_shot_layers": fmt_zero_shot_layers, "guarantee": fmt_guarantee,
              "regularizer": fmt_regularizer, "seeds": fmt_seeds, "targets": fmt_targets,
              "jumper_study": fmt_jumper_study, "jumper_seeds": fmt_jumper_seeds,
              "trajectory_ablation": lambda rec: __import__("results_ablation").fmt_trajectory_ablation(rec)}


def fmt_serve_load(rec: dict) -> str:
    """serve_load.py: per model, the closed loop of each mode, the open-loop latency and the soak."""
    d, parts = rec["data"], []
    for r in d["results"]:
        modes = r["modes"]
        rows = [[m, num(c["rps"]), num(c["images_per_s"], 1), num(c["p50_ms"], 0), num(c["p95_ms"], 0),
                 num(c["p99_ms"], 0), num(c["flops_ratio"], 3), num(c["mean_exit_layer"]),
                 num(c["min_layer_occupancy"])] for m, c in ((m, v["closed"]) for m, v in modes.items())]
        parts.append(f"**{r['model']}** ({r['num_layers']} layers, batch cap {r['batch']}, {r['clients']} clients x "
                     f"{r['images_per_request']} images, {r['device']} {r['dtype']}), closed loop:\n\n"
                     + table(["mode", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms", "FLOPs", "exit layer",
                              "least occupancy"], rows, "lrrrrrrrr"))
        rows = [[m, num(o["load"]), num(o["rate"]), num(o["requests"], 0), num(o["p50_ms"], 0), num(o["p95_ms"], 0),
                 num(o["p99_ms"], 0), json.dumps(o["errors"]) if o["errors"] else ""]
                for m, v in modes.items() for o in v["open"]]
        parts.append("open loop:\n\n" + table(["mode", "load", "req/s offered", "answered", "p50 ms", "p95 ms",
                                                 "p99 ms", "errors"], rows, "lrrrrrrl"))
        s = r["soak"]
        parts.append(f"soak: {s['requests']} requests, server RSS {num(s['rss_mb_warm'], 0)} MB after the first "
                     f"tenth, {num(s['rss_mb_end'], 0)} MB at the end ({pct(s['rss_growth'])} %)")
    keys = ("rps_exit", "rps_never_exit", "rps_drop_batching", "speedup_vs_never_exit", "p95_ms_exit",
            "min_layer_occupancy", "rss_growth")
    parts.append(f"{d.get('model')}: " + ", ".join(f"{k} {num(d.get(k), 3)}" for k in keys)
                 + "; targets met: " + ", ".join(f"{k}: {v}" for k, v in (d.get("targets") or {}).items()))
    return "\n\n".join(parts)


FORMATTERS["serve_load"] = fmt_serve_load


def fmt_serve_soak(rec: dict) -> str:
    """serve_soak.py: the server's resident memory over a long closed loop of one-image requests."""
    d = rec["data"]
    samples = d.get("rss_samples") or []
    warm = [(n, mb) for n, mb in samples if n > d.get("requests", 0) // 10]
    trend = ""
    if len(warm) >= 4:  # least squares after warm-up: the end-to-warm ratio alone reads the sampling noise
        import numpy as np

        x, y = np.array(warm, dtype=float).T
        half = len(y) // 2
        trend = (f" After warm-up, a least-squares trend of {np.polyfit(x, y, 1)[0] * 1000:+.2f} MB per 1,000 "
                 f"requests; mean {y[:half].mean():.1f} MB over the first half of the samples, {y[half:].mean():.1f} "
                 f"MB over the second (in-flight buffers swing it {y.min():.0f} - {y.max():.0f} MB).")
    step = max(1, len(samples) // 10)
    rows = [[num(n, 0), num(mb, 1)] for n, mb in samples[::step]] + ([[num(samples[-1][0], 0), num(samples[-1][1], 1)]]
                                                                       if samples and (len(samples) - 1) % step else [])
    return (f"Model shape `{d.get('model')}`, batch cap {d.get('batch')}, {d.get('in_flight')} requests in flight, "
            f"{d.get('server_threads')} server thread{'' if d.get('server_threads') == 1 else 's'}: "
            f"{num(d.get('requests'), 0)} requests in "
            f"{num(d.get('seconds'), 0)} s ({num(d.get('rps'))} req/s), errors {json.dumps(d.get('errors') or {})}, "
            f"server exit code {d.get('server_exit_code')}. Resident memory: {num(d.get('rss_mb_ready'), 1)} MB when "
            f"ready, {num(d.get('rss_mb_warm'), 1)} MB after the first tenth (warm-up), {num(d.get('rss_mb_end'), 1)} MB "
            f"at the end ({pct(d.get('rss_growth'))} % after warm-up), {num(d.get('rss_mb_max'), 1)} MB at most.{trend}\n\n"
            + table(["requests answered", "server RSS MB"], rows, "rr"))


FORMATTERS["serve_soak"] = fmt_serve_soak


def fmt_retrieval(rec: dict) -> str:
    """benchmarks/retrieval.py: recall@k and mAP per direction, seen / held-out queries, static and lens at a few
    layers, the index at every budget; then the calibrations, the guarantee study and the engine check."""
    d = rec["data"]
    rows_in, L = d.get("results") or [], int(d.get("num_layers") or 12)
    static = {L // 4, 5 * L // 12, L // 2, 7 * L // 12, 3 * L // 4}
    keys = ("recall@1", "recall@5", "recall@10", "mAP")
    parts = [f"Gallery: {num(d.get('gallery_images'))} `{d.get('test')}` images, {num(d.get('query_captions'))} "
             f"distinct captions; relevance {d.get('relevance')}; index model `{d.get('index_model')}`; "
             f"{d.get('seconds')} s."]
    for direction, name in (("t2i", "Text-to-image"), ("i2t", "Image-to-text")):
        by = {(r["method"], r["budget"], r["layer"], r["split"]): r for r in rows_in if r["direction"] == direction}
        rows = []
        for (m, b, l, split), r in by.items():
            if split != "seen" or (m == "static" and l not in static) or (m == "lens" and l not in {L // 4, L // 2, 3 * L // 4}):
                continue
            h = by.get((m, b, l, "heldout"), {})
            rows.append([m, f"{b:g}" if b is not None else f"layer {l}", num(r["mean_layers"]),
                         f"{r['flops_ratio']:.3f}", *[num(r[k]) for k in keys], *[num(h.get(k)) for k in keys]])
        parts.append(f"{name} (recall@k and mAP in %; seen, then held-out queries):\n\n" + table(
            ["method", "budget / layer", "mean layers", "FLOPs ratio", "seen R@1", "R@5", "R@10", "mAP",
             "held-out R@1", "R@5", "R@10", "mAP"], rows, "llrrrrrrrrrr"))
    if d.get("guarantee"):
        parts.append("Guarantee study:\n\n" + fmt_generic({"data": {"guarantee": d["guarantee"]}}))
    if d.get("engine_check"):
        parts.append("Engine check (the index built on the engine against the simulation): " +
                     ", ".join(f"{k} {v}" for k, v in d["engine_check"].items()) + ".")
    return "\n\n".join(parts)


FORMATTERS["retrieval"] = fmt_retrieval

def kind_of(rec: dict) -> str:
    """The record's kind when a formatter knows it; a record without a kind (or "generic") is recognised
    by the shape of its data; any other kind gets the generic view."""
    k = rec.get("kind")
    if k in FORMATTERS:
        return k
    if k not in (None, "", "generic"):
        return k
    d = rec.get("data")
    if not isinstance(d, dict):
        return "generic"

    def first(key):
        v = d.get(key)
        return v[0] if isinstance(v, list) and v and isinstance(v[0], dict) else {}

    if "method" in first("results"):
        return "eval"
    if {"plain", "never_exit"} <= set(d):
        return "engine_speed"
    if "held" in d and "rows" in d:
        return "guarantee"
    if isinstance(d.get("curves"), dict):
        return "regularizer"
    if "summary" in d and "seeds" in d:
        return "seeds"
    if "report" in d and "rows" in d:
        return "targets"
    if "layer" in first("layers"):
        return "zero_shot_layers"
    return "generic"


# ------------------------------------------------------------------ the page


def machine_line(m: dict) -> str:
    bits = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"]
    if m.get("gpus"):
        bits.append(", ".join(m["gpus"]))
    for k in ("torch", "transformers", "python"):
        if m.get(k):
            bits.append(f"{k} {m[k]}")
    if m.get("load_average"):
        bits.append("load average at start " + " / ".join(str(x) for x in m["load_average"]))
    return "; ".join(bits)


def title_of(rec: dict, recs: list[dict] | None = None) -> str:
    """The record's title, or its kind's; with the record's name added when another record has the same."""
    title = rec.get("title") or TITLES.get(kind_of(rec), rec["name"])
    if recs and sum((r.get("title") or TITLES.get(kind_of(r), r["name"])) == title for r in recs) > 1:
        title += f" ({rec['name']})"
    return title


def code(text) -> str:
    """Inline code that survives backticks in the text."""
    text = str(text)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def section(rec: dict, recs: list[dict] | None = None) -> str:
    kind = kind_of(rec)
    title = title_of(rec, recs)
    name = rec["name"]
    lines = [f"## {title}", "", f"Record `docs/results/{name}.json`."]
    if rec.get("note"):
        lines += ["", rec["note"]]
    lines += ["", f"- command: {code(rec.get('command'))}"]
    lines += [f"- date: {rec.get('date')}", f"- machine: {machine_line(rec.get('machine') or {})}",
              f"- commit: `{rec.get('commit')}`"]
    if rec.get("seconds") is not None:
        lines.append(f"- took: {rec['seconds']:g} s")
    try:
        body = FORMATTERS.get(kind, fmt_generic)(rec)
    except Exception as e:  # a record of an unexpected shape must not stop the page
        body = f"(the {kind} formatter could not read this record: {type(e).__name__}: {e}; generic view)\n\n" \
               + fmt_generic(rec)
    return "\n".join(lines) + "\n\n" + body + "\n"


def load_records() -> list[dict]:
    recs = []
    for p in sorted(RESULTS.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            rec = {"kind": "generic", "data": {"error": f"unreadable record: {e}"}}
        rec["name"] = str(rec.get("name") or p.stem)
        recs.append(rec)
    rank = {k: i for i, k in enumerate(ORDER)}
    return sorted(recs, key=lambda r: (rank.get(kind_of(r), len(ORDER)), r["name"]))


def render() -> str:
    recs = load_records()
    head = ["# Measured results", "",
            "<!-- Generated by benchmarks/results_md.py from docs/results/*.json: do not edit by hand. -->",
            "",
            "This page is generated: every table below is read from a JSON record in `docs/results/`, "
            "which `benchmarks/record.py` writes with the command, date, machine and commit of the run. "
            "To add or refresh a record and regenerate this page:", "",
            "```bash",
            "python benchmarks/record.py NAME -- COMMAND...   # COMMAND takes --json PATH",
            "python benchmarks/results_md.py", "```", "",
            "Accuracies, layers and FLOPs are deterministic for a given seed on a machine, whatever its thread "
            "count (another CPU can round the encoder's features differently: docs/design.md, Reproducibility); "
            "images per second depend on the "
            "machine and its load at the time (shown with each record). Earlier results, from models and "
            "defaults that have since changed, are in [CHANGELOG.md](CHANGELOG.md).", "",
            "Records: " + ", ".join(f"[{r['name']}](#{_anchor(r, recs)})" for r in recs) + ".", ""]
    return "\n".join(head) + "\n" + "\n".join(section(r, recs) for r in recs)


def _anchor(rec: dict, recs: list[dict]) -> str:
    """GitHub's heading slug: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    title = title_of(rec, recs)
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- results:begin (benchmarks/results_md.py --readme) -->", "<!-- results:end -->"


def _thousands(v) -> str:
    return "" if v is None else f"{v:,.0f}"


def readme_block(rec: dict) -> str:
    """The README's results section from the demo record: where it was run, the short table, and the prose
    figures (T-GEM at budget 0.5 against full and static truncation, the guarantee, the retrieval line)."""
    d, m = rec["data"], rec.get("machine") or {}
    L = int(d.get("num_layers") or 12)
    idx = _index(d["results"])
    full = {s: idx["full", None, None, s] for s in SPLITS}
    cls = {s: idx["tgem_cls", 0.5, None, s] for s in SPLITS}
    static = {s: idx["static", None, L // 2, s] for s in SPLITS}
    n_seen, n_held = full["seen"]["n"], full["heldout"]["n"]
    load = (m.get("load_average") or [None])[0]
    g, ret = d.get("guarantee") or {}, d.get("retrieval") or {}
    t, f = cls["all"], full["all"]
    lines = [
        f"From the demo record [`docs/results/demo.json`](docs/results/demo.json) (`tgems demo`, seed {d.get('seed', 0)}, "
        f"run {rec['date'].split()[0]} at commit `{rec['commit']}` on a {m.get('cores', '?')}-core {m.get('cpu', '?')} "
        f"machine, load average {load} at the start, {rec['seconds']:.0f}\u00a0s): every method is calibrated on "
        f"`scenes:calib` and tested on `{d.get('data')}` ({num(n_seen)} images of seen colour-shape classes and "
        f"{num(n_held)} of 12 held-out classes that the modules never saw, 64-way zero-shot). The table is a subset "
        f"of that record, printed by `python benchmarks/results_md.py --readme` (which writes this section); the "
        f"full table is in [docs/results.md](docs/results.md).", "",
        report_table(d, headline_keep(d)), "",
        f"T-GEM (cls) at budget 0.5: accuracy {pct(t['accuracy'])} % (full model {pct(f['accuracy'])} %; "
        f"{pct(cls['seen']['accuracy'])} % on seen and {pct(cls['heldout']['accuracy'])} % on held-out classes, against "
        f"{pct(static['seen']['accuracy'])} % and {pct(static['heldout']['accuracy'])} % for static truncation at layer "
        f"{L // 2}), {1 / t['flops_ratio']:.2f}x fewer encoder FLOPs"]
    if t.get("images_per_second") and f.get("images_per_second"):
        lines[-1] += (f", {t['images_per_second'] / f['images_per_second']:.2f}x measured throughput (median of "
                      f"{t.get('repeats', 1)} repeats: T-GEM {_thousands(t['images_per_second'])} img/s, "
                      f"{_thousands(t.get('ips_min'))}-{_thousands(t.get('ips_max'))} over the repeats; full model "
                      f"{_thousands(f['images_per_second'])}, {_thousands(f.get('ips_min'))}-{_thousands(f.get('ips_max'))})")
    lines[-1] += "."
    if g:
        lines[-1] += (f" With `max_drop` {g['eps']:g} and `delta` {g['delta']:g}, the disagreement with the full "
                      f"model stayed at or below {100 * g['eps']:g} % on {g['held']} of {g['n_splits']} re-drawn "
                      f"calibration sets ({num(g['n_calib'])} calibration and {num(g['n_test'])} test images each), "
                      f"at {num(g.get('mean_test_layers'))} layers on average.")
    if ret:
        lines[-1] += (f" The demo's retrieval line: the shipped early-exit index at budget {ret['budget']:g} "
                      f"({num(ret['mean_layers'])} of {L} layers, FLOPs ratio {ret['flops_ratio']:.3f}) finds "
                      f"images of the queried class among its top {ret['k']} for {pct(ret['precision'])} % of the "
                      f"hits where full CLIP finds {pct(ret['precision_full'])} % ({ret['queries']} class-text "
                      f"queries over the {num(ret['images'])} test images); [docs/retrieval.md](docs/retrieval.md) "
                      f"has recall on the scenes captions.")
    wrap = lambda p: textwrap.fill(p, 104, break_long_words=False, break_on_hyphens=False)  # noqa: E731
    return "\n".join(line if line.startswith("|") else wrap(line) for line in lines)


def render_readme(text: str, rec: dict) -> str:
    """`text` (the README) with its results section, between the markers, rewritten from `rec`."""
    head, sep, rest = text.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not (sep and sep2):
        raise SystemExit(f"README.md has no results markers ({README_BEGIN} ... {README_END})")
    return f"{head}{README_BEGIN}\n{readme_block(rec)}\n{README_END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/results.md differs from the records")
    ap.add_argument("--headline", metavar="NAME", help="print the README's short table of a demo/eval record")
    ap.add_argument("--readme", action="store_true", help="rewrite the README's results section from the demo "
                                                           "record (with --check: exit 1 if it is out of date)")
    args = ap.parse_args(argv)
    if args.readme:
        text = README.read_text()
        new = render_readme(text, json.loads((RESULTS / "demo.json").read_text()))
        if args.check:
            print("README.md's results are up to date" if new == text else
                  "README.md's results are out of date: run benchmarks/results_md.py --readme")
            return 0 if new == text else 1
        README.write_text(new)
        print("wrote README.md's results section from docs/results/demo.json")
        return 0
    if args.headline:
        rec = json.loads((RESULTS / f"{args.headline}.json").read_text())
        print(report_table(rec["data"], headline_keep(rec["data"])))
        print()
        print(summary_line(rec["data"]))
        return 0
    text = render()
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print("docs/results.md is up to date" if same else "docs/results.md is out of date: run benchmarks/results_md.py")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(load_records())} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
