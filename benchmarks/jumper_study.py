"""The Jumper in isolation, on cached features: how much of the gap from static truncation to an oracle
exit does an exit policy close, on seen and held-out (text-only) classes?

Shipped embedded model and `embedded:cls` T-GEM; `scenes:testall` tested, `scenes:calib` calibrates. Per-layer
features are extracted once and cached under results/jumper_study/ (safetensors); everything after that is
cached-feature arithmetic plus one small threshold search. Per split (seen, heldout) and budget 0.3 .. 0.7:

- `static`: fixed-layer exit with the T-GEM profiles at mean depth budget * L (per-image mix of the two
  layers around it, as the harness's vs_static does).
- `shipped`: the `--tgem` checkpoint's budget Jumper (the no-loss model), one tau calibrated on calib
  (`calibrate(budget=b, allow_uncovered=True)`), simulated on test.
- `agree_jumper` (variant): the checkpoint's agreement model (label-set-free confidence signals only, no
  z_l) used for the budget goal, one tau calibrated on calib the same way.
- `per_layer_tau` (variant): the shipped budget Jumper's scores with one threshold per candidate layer,
  found by coordinate ascent on calib accuracy under the budget (start: the shipped single tau).
- `confidence` (baseline): exit at the first candidate layer whose T-GEM top-1 probability reaches one
  tau (image-side confidence only, no Jumper), calibrated the same way.
- `branchy` (baseline: BranchyNet / Shallow-Deep Networks): per-layer linear probes on the unit readout z_l,
  trained with labels on `scenes:train` (the fit's images, seen classes only: held-out classes have no
  images to train a probe on), exit when the probe's top-1 probability reaches one tau; the last layer is
  the full CLIP's zero-shot head. Calibrated the same way.
- `oracle_agree`: knows, per image, c_i = the first candidate layer whose prediction equals the full
  model's (L if none). It gives as many images as the depth allows their agreeing exit, cheapest c_i first;
  the others exit at layer 1 (the cheapest). Mean depth <= budget * L; above sum c_i / N it is the full
  model's accuracy at that (smaller) depth.
- `oracle_correct`: the same with c_i = the first layer whose prediction is right; images that no layer gets
  right (and those the depth cannot afford) exit at layer 1.

`closed_fraction` = (acc - static at the policy's own mean depth) / (oracle_agree - static, both at that
depth): the share of the static-to-agreement-oracle distance the policy closes (1 for oracle_agree).
Per-layer AUC: the budget Jumper's score s_l against "exiting at l costs nothing" (layer l right, or the
full model wrong), per split; the agreement model's AUC for "layer l equals the full model" beside it.

    python benchmarks/jumper_study.py --json results/jumper_study.json
    python benchmarks/record.py jumper_study -- .venv/bin/python benchmarks/jumper_study.py --json {json}
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import tgems
from tgems.calibration import calibrate_budget, first_exit, simulate
from tgems.evaluation.baselines import ProbeExits
from tgems.features import LayerFeatures
from tgems.io import write_json
from tgems.profiles import layer_probs

BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
SPLITS = ("seen", "heldout")
CACHE = Path("results/jumper_study")


# ----------------------------------------------------------------------------- feature cache

def cached_features(bb, spec: str, seed: int, model: str, rates: bool = False) -> tuple[LayerFeatures, np.ndarray]:
    """(features, per-image split names) for a dataset spec, extracted once and kept as safetensors
    (with the activation rates when `rates`, for T-GEMs of the rates space), keyed by the backbone's weights."""
    from safetensors.torch import load_file, save_file

    path = CACHE / (f"{model}-{bb.fingerprint()[:12]}_{spec.replace(':', '-')}_s{seed}{'_rates' if rates else ''}"
                    f".safetensors")
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        t, m = load_file(str(path)), json.loads(meta.read_text())
        if "patch" in t:  # caches made before the mean-patch readouts are made again
            return (LayerFeatures(t["z"], t.get("rates"), t["labels"], m["difficulty"] and np.asarray(m["difficulty"]),
                                  m["classes"], t["patch"]), np.asarray(m["splits"], dtype=object))
    data = tgems.load_dataset(spec, seed=seed)
    f = tgems.extract_features(bb, data, rates=rates, desc=spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"z": f.z.contiguous(), "labels": f.labels.contiguous(), "patch": f.patch.contiguous()}
    if rates:
        out["rates"] = f.rates.contiguous()
    save_file(out, str(path))
    meta.write_text(json.dumps({"classes": f.classes, "splits": data.sample_split().tolist(),
                                "difficulty": None if f.difficulty is None else np.asarray(f.difficulty).tolist()}))
    return f, data.sample_split()


# ----------------------------------------------------------------------------- policies on cached data

def auc(score: np.ndarray, y: np.ndarray) -> float | None:
    """Mann-Whitney AUC (ties count half); None if one class is empty."""
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def static_mix(correct: torch.Tensor, layers: list[int], d: float) -> torch.Tensor:
    """Per-image expected correctness of static truncation at mean depth d (mix of the two layers around d)."""
    lo = max([j for j, k in enumerate(layers) if k <= d], default=0)
    hi = min([j for j, k in enumerate(layers) if k >= d], default=len(layers) - 1)
    f = 0.0 if hi == lo else (d - layers[lo]) / (layers[hi] - layers[lo])
    return (1 - f) * correct[:, lo] + f * correct[:, hi]


def static_at(correct: torch.Tensor, layers: list[int], d: float) -> float:
    return float(static_mix(correct, layers, d).mean())


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean difference and its paired standard error."""
    v = a.float() - b.float()
    return round(float(v.mean()), 5), round(float(v.std() / np.sqrt(len(v))), 5)


def oracle(preds: torch.Tensor, target: torch.Tensor, layers: list[int], depth: float):
    """Exit at c_i (first layer with preds == target, else L) for the cheapest images the mean depth affords,
    at layer 1 otherwise. Returns (predictions, exit layers)."""
    n = len(preds)
    lay = torch.as_tensor(layers, dtype=torch.long)
    hit = preds == target[:, None]
    first = torch.where(hit.any(1), hit.int().argmax(1), torch.full((n,), len(layers) - 1))
    useful = hit.any(1)
    cost = (lay[first] - lay[0]).double()
    spare = depth * n - float(lay[0]) * n
    e = torch.zeros(n, dtype=torch.long)
    order = torch.argsort(torch.where(useful, cost, torch.full_like(cost, float("inf"))), stable=True)
    spent = 0.0
    for i in order.tolist():
        if not useful[i] or spent + cost[i] > spare + 1e-9:
            break
        e[i] = first[i]
        spent += float(cost[i])
    return preds.gather(1, e[:, None])[:, 0], lay[e]


def per_layer_taus(scores, preds, layers, L, budget, labels, tau0, sweeps: int = 2, grid: int = 24):
    """Coordinate ascent over one threshold per candidate layer: best calib accuracy with mean depth / L <= budget."""
    n = scores.shape[1]
    lay = torch.as_tensor(layers, dtype=torch.long)
    taus = torch.full((n,), float(tau0))
    qs = torch.linspace(0, 1, grid)

    def evaluate(t):
        hit = scores >= t[None]
        e = torch.where(hit.any(1), hit.int().argmax(1), torch.full((len(scores),), n))
        ok = lay[e].float().mean().item() / L <= budget + 1e-9
        return (preds.gather(1, e[:, None])[:, 0] == labels).float().mean().item() if ok else -1.0

    best = evaluate(taus)
    for _ in range(sweeps):
        for j in range(n):
            cands = torch.cat([torch.quantile(scores[:, j], qs), torch.tensor([2.0])]).unique()
            for v in cands.tolist():
                t = taus.clone()
                t[j] = v
                a = evaluate(t)
                if a > best + 1e-12:
                    best, taus = a, t
    return taus


def probe_heads(feats: LayerFeatures, layers: list[int], num_classes: int, l2: float = 1e-4,
                steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per candidate layer, a multinomial logistic probe on the unit readout, fit by L-BFGS on labelled images
    (the BranchyNet / SDN exit heads, trained with labels instead of text): (weight (n, D, C), bias (n, C)),
    the layout of `evaluation.baselines.ProbeExits`. Fit to convergence, they are stronger than the demo's
    `fit_probes` (Adam, a fixed number of epochs)."""
    ws, bs = [], []
    y = feats.labels
    for l in layers:
        x = torch.nn.functional.normalize(feats.z[:, l - 1].float(), dim=-1)
        w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
        b = torch.zeros(num_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        ws.append(w.detach())
        bs.append(b.detach())
    return torch.stack(ws), torch.stack(bs)


def cached_probes(feats: LayerFeatures, layers: list[int], num_classes: int, path: Path):
    """probe_heads, kept as safetensors (they depend on the backbone and its training images only)."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        t = load_file(str(path))
        if t["layers"].tolist() == list(layers):
            return t["weight"], t["bias"]
    w, b = probe_heads(feats, layers, num_classes)
    save_file({"layers": torch.as_tensor(layers), "weight": w.contiguous(), "bias": b.contiguous()}, str(path))
    return w, b


def simulate_taus(scores, preds, layers, taus):
    n = scores.shape[1]
    hit = scores >= taus[None]
    e = torch.where(hit.any(1), hit.int().argmax(1), torch.full((len(scores),), n))
    return preds.gather(1, e[:, None])[:, 0], torch.as_tensor(layers, dtype=torch.long)[e]


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tgem", default="embedded:cls")
    ap.add_argument("--test", default="scenes:testall")
    ap.add_argument("--calib", default="scenes:calib")
    ap.add_argument("--seed", type=int, default=0, help="draw of the test and calibration images")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    bb = tgems.load_backbone(args.model)
    ft, split_t = cached_features(bb, args.test, args.seed, args.model)
    clf = tgems.EarlyExitClassifier(bb, args.tgem, ft.classes)
    rates = clf.profiles.space == "rates"
    if rates:
        ft, split_t = cached_features(bb, args.test, args.seed, args.model, rates=True)
    fc, _ = cached_features(bb, args.calib, args.seed, args.model, rates=rates)
    L, layers = bb.num_layers, clf.profiles.exit_layers
    y = ft.labels
    s_budget, lp = clf.layer_predictions(ft, "budget")
    s_agree, _ = clf.layer_predictions(ft, "max_drop")
    full = lp[:, -1]
    correct = lp.eq(y[:, None]).float()
    masks = {s: torch.as_tensor(split_t == s) for s in SPLITS}
    print(f"features ready ({time.time() - t0:.0f} s): {len(ft)} test, {len(fc)} calib; layers {layers}", flush=True)

    # per-layer AUC
    no_loss = (lp[:, :-1] == y[:, None]) | (full != y)[:, None]
    agree = lp[:, :-1] == full[:, None]
    auc_rows = []
    for j, l in enumerate(layers[:-1]):
        row = {"layer": l}
        for s, m in masks.items():
            row[f"{s}_no_loss_auc"] = auc(s_budget[m, j].numpy(), no_loss[m, j].numpy())
            row[f"{s}_agree_auc"] = auc(s_agree[m, j].numpy(), agree[m, j].numpy())
            row[f"{s}_agree_model_no_loss_auc"] = auc(s_agree[m, j].numpy(), no_loss[m, j].numpy())
            row[f"{s}_no_loss_rate"] = round(float(no_loss[m, j].float().mean()), 4)
        auc_rows.append(row)

    # calibration-side data for the variants
    cal_labels = clf.match_labels(fc, allow_uncovered=True)
    cs_budget, clp = clf.layer_predictions(fc, "budget")
    cs_agree, _ = clf.layer_predictions(fc, "max_drop")

    # baselines: image-side confidence of the T-GEM profiles; BranchyNet-style probes trained with labels
    conf_t = layer_probs(clf.profiles, ft)[:, :-1].max(-1).values
    conf_c = layer_probs(clf.profiles, fc)[:, :-1].max(-1).values
    ftr, _ = cached_features(bb, "scenes:train", 0, args.model)
    assert ftr.classes == ft.classes == fc.classes
    w, b = cached_probes(ftr, layers[:-1], len(ft.classes), CACHE / f"{args.model}_probe_heads.safetensors")
    probes = ProbeExits(w, b, clf.profiles)
    br_t, br_lp = probes.layer_predictions(ft)
    br_c, br_clp = probes.layer_predictions(fc)
    print(f"baselines ready ({time.time() - t0:.0f} s)", flush=True)

    results = []

    def add(policy, budget, split, preds, depth, **extra):
        m = masks[split]
        d = float(depth[m].float().mean())
        ok = (preds[m] == y[m]).float()
        acc = float(ok.mean())
        st = static_at(correct[m], layers, d)
        vs, se = paired(ok, static_mix(correct[m], layers, d))
        extra.update(vs_static=vs, vs_static_se=se)
        if policy not in ("shipped", "oracle_agree", "oracle_correct"):
            vs, se = paired(ok, (p_ship[m] == y[m]).float())
            extra.update(vs_shipped=vs, vs_shipped_se=se)
        orc, _ = oracle(lp[m], full[m], layers, d)
        oa = float((orc == y[m]).float().mean())
        results.append({"policy": policy, "budget": budget, "split": split, "accuracy": round(acc, 5),
                        "agreement": round(float((preds[m] == full[m]).float().mean()), 5),
                        "mean_layers": round(d, 4), "static_same_depth": round(st, 5),
                        "oracle_agree_same_depth": round(oa, 5),
                        "closed_fraction": round((acc - st) / (oa - st), 4) if oa - st > 1e-9 else None,
                        "n": int(m.sum()), **extra})

    for b in BUDGETS:
        D = b * L
        # shipped Jumper, calibrated by the library
        c = clf.calibrate(fc, budget=b, allow_uncovered=True)
        p_ship, d_ship = c.simulate(ft)
        # variant A: agreement model (confidence signals only) for the budget goal
        tau_a = calibrate_budget(cs_agree, clp, layers, L, b, cal_labels)
        p_a, d_a = simulate(s_agree, lp, layers, tau_a)
        # variant B: per-layer thresholds on the shipped budget scores
        taus = per_layer_taus(cs_budget, clp, layers, L, b, cal_labels, c.tau)
        p_b, d_b = simulate_taus(s_budget, lp, layers, taus)
        tau_c = calibrate_budget(conf_c, clp, layers, L, b, cal_labels)
        p_c, d_c = simulate(conf_t, lp, layers, tau_c)
        tau_br = calibrate_budget(br_c, br_clp, layers, L, b, cal_labels)
        p_br, d_br = simulate(br_t, br_lp, layers, tau_br)
        for s, m in masks.items():
            st = static_at(correct[m], layers, D)
            # static: a per-image mix, so there are no predictions; record the expected figures directly
            lo = max(j for j, k in enumerate(layers) if k <= D)
            hi = min(j for j, k in enumerate(layers) if k >= D)
            f = 0.0 if hi == lo else (D - layers[lo]) / (layers[hi] - layers[lo])
            ag = float(((1 - f) * (lp[m, lo] == full[m]).float() + f * (lp[m, hi] == full[m]).float()).mean())
            orc, _ = oracle(lp[m], full[m], layers, D)
            oa = float((orc == y[m]).float().mean())
            results.append({"policy": "static", "budget": b, "split": s, "accuracy": round(st, 5),
                            "agreement": round(ag, 5), "mean_layers": round(D, 4), "static_same_depth": round(st, 5),
                            "oracle_agree_same_depth": round(oa, 5), "closed_fraction": 0.0, "n": int(m.sum())})
            add("shipped", b, s, p_ship, d_ship, tau=round(c.tau, 5))
            add("agree_jumper", b, s, p_a, d_a, tau=round(tau_a, 5))
            add("per_layer_tau", b, s, p_b, d_b, taus=[round(float(t), 4) for t in taus])
            add("confidence", b, s, p_c, d_c, tau=round(tau_c, 5))
            add("branchy", b, s, p_br, d_br, tau=round(tau_br, 5))
            for name, target in (("oracle_agree", full), ("oracle_correct", y)):
                po, do = oracle(lp[m], target[m], layers, D)
                pf = full.clone()
                pf[m] = po
                dd = torch.zeros(len(y), dtype=torch.long)
                dd[m] = do
                add(name, b, s, pf, dd)
        print(f"budget {b}: done ({time.time() - t0:.0f} s)", flush=True)

    # oracle depths for full agreement / full correctness (unconstrained)
    sat = {}
    for s, m in masks.items():
        for name, target in (("oracle_agree", full), ("oracle_correct", y)):
            po, do = oracle(lp[m], target[m], layers, float(L))
            sat[f"{s}_{name}"] = {"accuracy": round(float((po == y[m]).float().mean()), 5),
                                  "mean_layers": round(float(do.float().mean()), 4)}
        sat[f"{s}_full"] = {"accuracy": round(float(correct[m, -1].mean()), 5), "mean_layers": float(L)}

    pols = ("static", "shipped", "agree_jumper", "per_layer_tau", "confidence", "branchy", "oracle_agree",
            "oracle_correct")
    print(f"\n{'split':<8}{'budget':>6}" + "".join(f"{p:>16}" for p in pols) + "   (acc % / closed fraction; layers)")
    for s in SPLITS:
        for b in BUDGETS:
            line = f"{s:<8}{b:>6.1f}"
            for p in pols:
                r = next(r for r in results if r["policy"] == p and r["split"] == s and r["budget"] == b)
                cf = "" if r["closed_fraction"] is None else f"{r['closed_fraction']:+.2f}"
                line += f"{100 * r['accuracy']:.1f} {cf:>5} {r['mean_layers']:.1f}".rjust(16)
            print(line)
    print(f"\n{'split':<8}{'budget':>6}{'shipped vs static':>20}" + "".join(f"{p + ' vs shipped':>26}" for p in
                                                                    ("agree_jumper", "per_layer_tau", "confidence",
                                                                     "branchy")))
    for s in SPLITS:
        for b in BUDGETS:
            get = lambda p: next(r for r in results if r["policy"] == p and r["split"] == s and r["budget"] == b)
            sh = get("shipped")
            line = f"{s:<8}{b:>6.1f}" + f"{100 * sh['vs_static']:+.2f}±{100 * sh['vs_static_se']:.2f}".rjust(20)
            for p in ("agree_jumper", "per_layer_tau", "confidence", "branchy"):
                r = get(p)
                line += f"{100 * r['vs_shipped']:+.2f}±{100 * r['vs_shipped_se']:.2f}".rjust(26)
            print(line)
    print("\nunconstrained oracles and full model: " + "; ".join(
        f"{k} {100 * v['accuracy']:.1f} % at {v['mean_layers']:.2f} layers" for k, v in sat.items()))
    print("\nper-layer AUC: budget model for no_loss; agreement model for agreement, and for no_loss; no_loss base rate")
    print(f"{'layer':>5}" + "".join(f"{h:>14}" for h in ("seen no_loss", "held no_loss", "seen agree", "held agree",
                                                        "seen agr->nl", "held agr->nl", "seen nl-rate", "held nl-rate")))
    for r in auc_rows:
        vals = [r["seen_no_loss_auc"], r["heldout_no_loss_auc"], r["seen_agree_auc"], r["heldout_agree_auc"],
                r["seen_agree_model_no_loss_auc"], r["heldout_agree_model_no_loss_auc"]]
        print(f"{r['layer']:>5}" + "".join(f"{'' if v is None else f'{v:.3f}':>14}" for v in vals)
              + f"{r['seen_no_loss_rate']:>14.3f}{r['heldout_no_loss_rate']:>14.3f}")
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.json:
        write_json(args.json, {"model": args.model, "tgem": args.tgem, "test": args.test, "calib": args.calib,
                               "seed": args.seed, "budgets": list(BUDGETS), "num_layers": L, "layers": layers,
                               "results": results, "auc": auc_rows, "unconstrained": sat,
                               "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
