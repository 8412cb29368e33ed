"""The `trajectory_ablation` table of docs/results.md (kept apart from results_md.py, which renders it)."""
from __future__ import annotations

from results_md import num, table


def fmt_trajectory_ablation(rec: dict) -> str:
    """Per recipe: accuracy at each budget, the max_drop study, then per-layer readout accuracy and AUROC."""
    d = rec["data"]
    runs = d.get("runs") or []
    rows = []
    for r in runs:
        for b in r["budgets"]:
            rows.append([r["name"], r["recipe"] + ("" if r["recipe"] == "tgem" or r.get("mix") else " (no mix)"),
                         f"{b['budget']:g}", f"{b['seen']:.2f}", f"{b['heldout']:.2f}", num(b["mean_layers"]),
                         num(b["flops_ratio"], 3)])
    out = ("Calibrated on `scenes:calib` (labels), tested on `scenes:testall`; accuracy % on seen and on text-only "
           "(held-out) classes.\n\n"
           + table(["arm", "recipe", "budget", "seen %", "held-out %", "mean layers", "FLOPs ratio"], rows, "lllrrrr"))
    md = [[r["name"], f"{r['max_drop']['held']}/{r['max_drop']['n_splits']}", num(r["max_drop"]["mean_test_layers"]),
           f"{r['max_drop']['n_calib']:,} / {r['max_drop']['n_test']:,}", num(r["oracle_mean_layers"]["all"]),
           f"{r['full']['seen']:.2f} / {r['full']['heldout']:.2f}"] for r in runs]
    out += ("\n\n`max_drop` 0.01, `delta` 0.1 over re-drawn calibration sets, and the agreement oracle (first candidate "
            "layer that agrees with the full model):\n\n"
            + table(["arm", "draws held", "mean layers", "calib / test images", "oracle mean layers",
                     "full model seen / held-out %"], md, "lrrrrr"))
    for r in runs:
        lay = r.get("layers") or []
        if not lay:
            continue
        keys = [k for k in ("lens", "tgem", "distilled", "mix") if f"{k}_seen" in lay[0]]
        head = ["layer"] + [f"{k} {s}" for k in keys for s in ("seen", "held-out")] + \
            ["AUROC budget seen / held-out", "AUROC agree seen / held-out"]
        body = [[x["layer"]] + [f"{x[f'{k}_{s}']:.1f}" for k in keys for s in ("seen", "heldout")]
                + [f"{num(x['auroc_budget_seen'], 3)} / {num(x['auroc_budget_heldout'], 3)}",
                   f"{num(x['auroc_agree_seen'], 3)} / {num(x['auroc_agree_heldout'], 3)}"] for x in lay]
        out += (f"\n\n**{r['name']}**: per candidate layer, top-1 % of the logit lens, the T-GEM profiles, the "
                f"distilled readout and the served mix (each alone), and the failure-ranking AUROC of the budget "
                f"Jumper (target: the exit costs nothing) and of the agreement model (target: agrees with full):\n\n"
                + table(head, body, "r" * len(head)))
    return out
