"""The T-GEM targets, read off a `tgems demo` / `tgems eval --sweep` report (nothing recomputed here).

For every budget and class split: T-GEM (cls and rates) against static truncation at the same mean
depth (linear interpolation between the two static layers around it), the 16-shot sample-based
profiles and the linear probes at the same budget, and the gap to the full model; then the oracle
exit depth against T-GEM's depth at (near) zero drop. Two static truncations: `static` scores each
layer with the T-GEM profiles (so T-GEM vs static isolates the Jumper), `lens` is plain truncated CLIP
(z_l against the raw class texts), both interpolated to T-GEM's mean depth. "vs static" is T-GEM minus
static with its paired standard error over the split's images (from the report, which has it since
per-image correctness is needed): a difference within about two of them is a tie, not a win.

    tgems demo --out results/demo
    python benchmarks/targets.py results/demo/results.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from tgems.io import write_json


def fmt(v) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def fmt_diff(r) -> str:
    if r.get("vs_static") is None:
        return ""
    se = r.get("vs_static_se")
    return f"{100 * r['vs_static']:+.2f}" + ("" if se is None else f"±{100 * se:.2f}")


def rows(results, method, split):
    return [r for r in results if r["method"] == method and r["split"] == split]


def at_depth(results, split, depth, method="static"):
    """Accuracy of a fixed-layer method interpolated to a mean depth (None if the report lacks it)."""
    st = sorted(rows(results, method, split), key=lambda r: r["mean_layers"])
    if not st:
        return None
    return float(np.interp(depth, [r["mean_layers"] for r in st], [r["accuracy"] for r in st]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("--json")
    args = ap.parse_args()
    rep = json.load(open(args.report))
    res, L = rep["results"], rep["num_layers"]
    splits = [s for s in ("seen", "heldout") if rows(res, "full", s)] or ["all"]
    out = []
    print(f"{'split':<8}{'budget':>7}{'method':>11}{'layers':>7}{'acc %':>7}{'static %':>9}{'vs static':>13}"
          f"{'16-shot %':>10}{'probe %':>8}{'lens %':>8}{'vs full':>8}")
    for split in splits:
        full = rows(res, "full", split)[0]["accuracy"]
        for m in ("tgem_cls", "tgem_rates"):
            for r in sorted(rows(res, m, split), key=lambda r: r["budget"]):
                b = r["budget"]
                st = at_depth(res, split, r["mean_layers"])
                sa = next((x["accuracy"] for x in rows(res, "sample", split) if x["budget"] == b), None)
                pr = next((x["accuracy"] for x in rows(res, "probe", split) if x["budget"] == b), None)
                ll = at_depth(res, split, r["mean_layers"], "lens")
                rec = {"split": split, "budget": b, "method": m, "mean_layers": r["mean_layers"],
                       "accuracy": r["accuracy"], "static_same_depth": round(st, 5), "sample": sa, "probe": pr,
                       "lens_same_depth": None if ll is None else round(ll, 5),
                       "gap_to_full": round(r["accuracy"] - full, 5),
                       "vs_static": r.get("vs_static"), "vs_static_se": r.get("vs_static_se"),
                       "beats_static": r["accuracy"] > st, "beats_lens": ll is not None and r["accuracy"] > ll,
                       "beats_sample": sa is not None and r["accuracy"] > sa}
                out.append(rec)
                print(f"{split:<8}{b:>7.2f}{m:>11}{r['mean_layers']:>7.2f}{100 * r['accuracy']:>7.2f}{100 * st:>9.2f}"
                      f"{fmt_diff(r):>13}{fmt(sa):>10}{fmt(pr):>8}{fmt(ll):>8}{100 * rec['gap_to_full']:>+8.2f}")
    print("oracle exit (zero drop) mean layers: " + ", ".join(
        f"{s} {rows(res, 'oracle', s)[0]['mean_layers']:.2f}" for s in splits + ["all"]) + f" of {L}")
    g = rep.get("guarantee")
    if g:
        print(f"T-GEM (cls) at max_drop {g['eps']} (delta {g['delta']}): mean layers {g['mean_test_layers']:.2f}, "
              f"held on {g['held']}/{g['n_splits']} re-splits")
    if args.json:
        write_json(args.json, {"report": args.report, "rows": out})


if __name__ == "__main__":
    main()
