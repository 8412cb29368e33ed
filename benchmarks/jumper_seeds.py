"""Issue 12's targets over fit seeds and image draws: `jumper_study.py` for every (T-GEM checkpoint, draw)
pair, then one table of what the targets ask.

Each checkpoint is a `tgems fit` of the same recipe with another `--seed`; each draw (`--draws`) is a fresh
sample of `scenes:testall` test and `scenes:calib` calibration images (draw 0 is the one the Jumper's design
was chosen on; later draws no choice looked at). Per split and budget: the Jumper's accuracy and agreement
with the full model, mean over runs (min .. max), its lead over static truncation at the same mean depth and
how many runs lead by more than two paired standard errors, and its lead over the confidence-threshold and
BranchyNet baselines; then the budget-0.5 targets (seen >= 68.0 %, held-out >= 37.7 %).

    python benchmarks/jumper_seeds.py results/fit/cls_s0 results/fit/cls_s1 results/fit/cls_s2 --draws 0 1 \\
        --json results/jumper_seeds.json

`--against` takes as many other checkpoints (e.g. the same fits with `--no-cross-fit`), paired with the
first list by position: per split and budget, the Jumper's accuracy minus theirs on the same images,
mean and standard deviation over the runs, and the runs where it is ahead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tgems.io import write_json

HERE = Path(__file__).resolve().parent
TARGETS = {"seen": 0.680, "heldout": 0.377}
SPLITS = ("seen", "heldout")


def run_study(tgem: str, draw: int, cache: Path) -> dict:
    """jumper_study.py's JSON for a checkpoint and draw, run once and kept under `cache`."""
    out = cache / (f"{Path(tgem).name or tgem}".replace(":", "-") + f"_draw{draw}.json")
    if not out.is_file():
        cmd = [sys.executable, str(HERE / "jumper_study.py"), "--tgem", tgem, "--seed", str(draw), "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tgems", nargs="+", help="T-GEM checkpoints (one per fit seed)")
    ap.add_argument("--draws", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--against", nargs="+", help="checkpoints to compare with, paired by position")
    ap.add_argument("--cache", default="results/jumper_seeds", help="per-run study JSONs (reused when present)")
    ap.add_argument("--json")
    args = ap.parse_args()
    t0 = time.time()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.against and len(args.against) != len(args.tgems):
        ap.error("--against needs one checkpoint for each checkpoint compared")
    runs = []
    for i, tg in enumerate(args.tgems):
        for d in args.draws:
            run = {"tgem": tg, "draw": d, "study": run_study(tg, d, cache)}
            if args.against:
                run["against"] = run_study(args.against[i], d, cache)
            runs.append(run)
            print(f"{tg} draw {d}: done ({time.time() - t0:.0f} s)", flush=True)

    budgets = runs[0]["study"]["budgets"]
    rows = []
    for s in SPLITS:
        for b in budgets:
            get = lambda r, p, key="study": next(x for x in r[key]["results"] if x["policy"] == p
                                                 and x["split"] == s and x["budget"] == b)
            acc = [get(r, "shipped")["accuracy"] for r in runs]
            row = {"split": s, "budget": b, "runs": len(runs),
                   "accuracy_mean": round(statistics.mean(acc), 5), "accuracy_min": min(acc), "accuracy_max": max(acc),
                   "agreement_mean": round(statistics.mean(get(r, "shipped")["agreement"] for r in runs), 5),
                   "mean_layers": round(statistics.mean(get(r, "shipped")["mean_layers"] for r in runs), 3)}
            for p in ("static", "confidence", "branchy", "oracle_agree"):
                row[f"{p}_mean"] = round(statistics.mean(get(r, p)["accuracy"] for r in runs), 5)
            vs = [(get(r, "shipped")["vs_static"], get(r, "shipped")["vs_static_se"]) for r in runs]
            row["vs_static_mean"] = round(statistics.mean(v for v, _ in vs), 5)
            row["runs_ahead_of_static_2se"] = sum(v > 2 * se for v, se in vs)
            row["runs_behind_static"] = sum(v < 0 for v, _ in vs)
            for p in ("confidence", "branchy"):
                d = [-get(r, p)["vs_shipped"] for r in runs]  # Jumper minus baseline, paired on the same images
                row[f"vs_{p}_mean"] = round(statistics.mean(d), 5)
                row[f"runs_ahead_of_{p}"] = sum(v > 0 for v in d)
            if args.against:
                d = [get(r, "shipped")["accuracy"] - get(r, "shipped", "against")["accuracy"] for r in runs]
                row["vs_against_mean"] = round(statistics.mean(d), 5)
                row["vs_against_sd"] = round(statistics.stdev(d), 5) if len(d) > 1 else None
                row["runs_ahead_of_against"] = sum(v > 0 for v in d)
                row["against_layers"] = round(statistics.mean(get(r, "shipped", "against")["mean_layers"]
                                                              for r in runs), 3)
            if b == 0.5:
                row["target"] = TARGETS[s]
                row["runs_meeting_target"] = sum(a >= TARGETS[s] for a in acc)
            rows.append(row)

    print(f"\n{len(runs)} runs: {len(args.tgems)} fit seeds x draws {args.draws}")
    print(f"{'split':<8}{'budget':>6}{'acc mean (min..max)':>22}{'agree':>7}{'layers':>7}{'static':>7}"
          f"{'conf':>7}{'branchy':>8}{'oracle':>7}{'vs static':>10}{'>2se':>5}{'vs conf':>8}{'vs br':>7}")
    for r in rows:
        print(f"{r['split']:<8}{r['budget']:>6.1f}"
              f"{100 * r['accuracy_mean']:>10.1f} ({100 * r['accuracy_min']:.1f}..{100 * r['accuracy_max']:.1f})"
              f"{100 * r['agreement_mean']:>7.1f}{r['mean_layers']:>7.2f}{100 * r['static_mean']:>7.1f}"
              f"{100 * r['confidence_mean']:>7.1f}{100 * r['branchy_mean']:>8.1f}{100 * r['oracle_agree_mean']:>7.1f}"
              f"{100 * r['vs_static_mean']:>+10.2f}{r['runs_ahead_of_static_2se']:>3}/{r['runs']}"
              f"{100 * r['vs_confidence_mean']:>+8.2f}{100 * r['vs_branchy_mean']:>+7.2f}")
    if args.against:
        print("\nminus --against (same images, paired by fit seed and draw): mean ± sd over runs, runs ahead")
        for r in rows:
            sd = r["vs_against_sd"]
            print(f"{r['split']:<8}{r['budget']:>6.1f}{100 * r['vs_against_mean']:>+8.2f} ± {100 * (sd or 0):.2f}"
                  f"  {r['runs_ahead_of_against']}/{r['runs']}  (layers {r['mean_layers']:.2f} vs {r['against_layers']:.2f})")
    for r in rows:
        if "target" in r:
            print(f"budget 0.5 {r['split']}: {100 * r['accuracy_mean']:.1f} % mean against the target "
                  f"{100 * r['target']:.1f} %; met in {r['runs_meeting_target']}/{r['runs']} runs")
    if args.json:
        write_json(args.json, {"tgems": args.tgems, "against": args.against, "draws": args.draws, "targets": TARGETS, "rows": rows,
                               "runs": [{"tgem": r["tgem"], "draw": r["draw"], "seconds": r["study"]["seconds"]}
                                        for r in runs],
                               "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
