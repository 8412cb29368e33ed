"""Cross-modal retrieval with early exits on scenes captions, against full CLIP (issue 14).

Gallery: the `--test` images (default scenes:testall: 2,600 seen + 1,200 held-out-combination images).
Texts: the distinct captions of those images (the caption generator's own wording). Relevance is
class-level: an image is relevant to a caption when the caption names the image's colour-shape class
(captions always name it; size and position words are not used for relevance). t2i: each distinct
caption queries the images; i2t: each image queries the distinct captions; recall@k is the share of
queries with a relevant item in the top k. `split` is the query's class (t2i: the caption's class,
i2t: the image's class): seen or held-out combination.

Methods (every figure on cached features; the engine decides identically, checked on a subset):
full (z_L), static (every image at layer l with the method's map M_l), lens (the plain readout z_l),
index (the label-free early-exit index, tau calibrated on --calib for each budget), and, with
--text-guided, reading (a): the same exits but images scored in their layer's space against the
T-GEM profile G_l(t) of the query, with a per-layer affine score calibration fitted to full CLIP's
scores (label-free).

    python benchmarks/retrieval.py --json results/retrieval/retrieval.json --plot results/retrieval/retrieval.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tgems
from tgems.data import load_dataset
from tgems.engine import full_flops
from tgems.features import extract_features
from tgems.retrieval import EarlyExitIndex, calibrate_index, load_index_model, write_index_model

from tgems.calibration import first_exit

KS = (1, 5, 10)


def cached(bb, spec, cache_dir: Path, seed: int):
    """(z (N, L, D), mean-patch readouts (N, L, D), labels, captions, heldout per image): one backbone pass, then
    a safetensors file (one made before the mean-patch readouts is made again)."""
    from safetensors.torch import load_file, save_file

    key = f"{spec.replace(':', '_')}_s{seed}_{bb.fingerprint()}"
    tf, jf = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    if tf.is_file() and jf.is_file():
        t = load_file(str(tf))
        if "patch" in t:
            return t["z"], t["patch"], t["labels"], json.loads(jf.read_text())["captions"], t["heldout"].bool()
    data = load_dataset(spec, seed=seed)
    f = extract_features(bb, data, desc=f"features {spec}")
    held = torch.as_tensor(data.heldout[data.labels]) if data.heldout is not None else torch.zeros(len(data), dtype=torch.bool)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"z": f.z.contiguous(), "patch": f.patch.contiguous(), "labels": f.labels.contiguous(),
               "heldout": held.to(torch.uint8)}, str(tf))
    jf.write_text(json.dumps({"spec": spec, "captions": data.captions}))
    return f.z, f.patch, f.labels, data.captions, held


def recalls(scores, relevant, query_split):
    """scores (Q, G), relevant (Q, G) bool -> {split: {k: recall, "mAP": mean average precision}} for seen /
    heldout / all queries. mAP reads the whole ranking: with dozens of relevant items per query, recall@k
    is decided by the few top-ranked items and saturates."""
    top = scores.topk(max(KS), dim=1).indices
    hit = relevant.gather(1, top)
    order = scores.argsort(dim=1, descending=True)
    rel = relevant.gather(1, order).double()
    prec = rel.cumsum(1) / torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    ap = (prec * rel).sum(1) / rel.sum(1).clamp_min(1)
    out = {}
    for split, mask in (("seen", ~query_split), ("heldout", query_split), ("all", torch.ones_like(query_split))):
        if mask.any():
            out[split] = {**{k: float(hit[mask, :k].any(1).float().mean()) for k in KS},
                          "mAP": float(ap[mask].mean())}
    return out


def records(method, budget, layer, emb_scores, rel, cap_held, img_held, mean_layers, flops_ratio):
    rows = []
    for direction, s, r, qs in (("t2i", emb_scores, rel, cap_held), ("i2t", emb_scores.t(), rel.t(), img_held)):
        for split, rk in recalls(s, r, qs).items():
            rows.append({"method": method, "budget": budget, "layer": layer, "split": split, "direction": direction,
                         **{f"recall@{k}": round(100 * rk[k], 2) for k in KS}, "mAP": round(100 * rk["mAP"], 2),
                         "mean_layers": round(mean_layers, 4), "flops_ratio": round(flops_ratio, 4)})
    return rows


def engine_flops(bb, candidate_layers, head, depth):
    """Per-image FLOPs as `run_early_exit` counts them (readout + head at every candidate layer visited)."""
    readouts = sorted(set(candidate_layers) | {bb.num_layers})
    visits = torch.searchsorted(torch.tensor(readouts), depth, right=True)
    return (bb.flops_embed() + depth.double() * bb.flops_block() + visits.double() * (bb.flops_readout() + head))


def text_guided_scores(tgem, z, text, depth, calib_z, calib_text):
    """Reading (a): image i at layer l scored as a_l cos(z_l, G_l(t)) + b_l (a_l, b_l: least squares onto
    full CLIP's cos(z_L, t) over calibration images x texts); images at L score cos(z_L, t)."""
    L = z.shape[1]
    out = F.normalize(z[:, -1], dim=-1) @ text.t()
    with torch.no_grad():
        prof, cprof = tgem.raw_profiles(text), tgem.raw_profiles(calib_text)
    cfull = (F.normalize(calib_z[:, -1], dim=-1) @ calib_text.t()).flatten()
    for j, l in enumerate(tgem.layers):
        rows = (depth == l).nonzero().squeeze(1)
        if len(rows) == 0 or l == L:
            continue
        x = (F.normalize(calib_z[:, l - 1], dim=-1) @ cprof[j].t()).flatten()
        a = ((x - x.mean()) * (cfull - cfull.mean())).sum() / ((x - x.mean()) ** 2).sum()
        b = cfull.mean() - a * x.mean()
        out[rows] = a * (F.normalize(z[rows, l - 1], dim=-1) @ prof[j].t()) + b
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--index-model", default="embedded",
                    help="retrieval maps + scorer ('embedded': the shipped ones); with --fit, where to write them")
    ap.add_argument("--fit", action="store_true", help="fit the maps and scorer on --train first")
    ap.add_argument("--hidden", type=int, default=256, help="with --fit: hidden width of the maps' MLP (0: linear maps)")
    ap.add_argument("--epochs", type=int, default=40, help="with --fit: epochs of the maps")
    ap.add_argument("--caption-weight", type=float, default=0.0, help="with --fit: caption-contrastive term")
    ap.add_argument("--no-readout-patch", dest="readout_patch", action="store_false",
                    help="with --fit: the maps read z_l alone, not also the mean-patch readout m_l")
    ap.add_argument("--train", default="scenes:train")
    ap.add_argument("--calib", default="scenes:calib")
    ap.add_argument("--test", default="scenes:testall")
    ap.add_argument("--budgets", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--text-guided", metavar="TGEM", nargs="?", const="embedded:cls",
                    help="also measure reading (a) with this T-GEM checkpoint (default embedded:cls)")
    ap.add_argument("--max-drop", default="0.05,0.1", help="eps values of the guarantee study (comma-separated)")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--rank", default="1,5", help="ranks of the guarantee study (comma-separated)")
    ap.add_argument("--draws", type=int, default=20,
                    help="guarantee study: re-drawn calibration sets from the seen images of --calib + --test")
    ap.add_argument("--n-cal", type=int, default=1500, help="guarantee study: calibration images per draw")
    ap.add_argument("--engine-check", type=int, default=512, help="images run on the engine to check the simulation")
    ap.add_argument("--cache", default="results/retrieval/cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--plot", metavar="PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = tgems.load_backbone(args.model)
    L = bb.num_layers
    cache = Path(args.cache)
    if args.fit:
        from tgems.training.index_fit import IndexFitSettings, fit_index_model

        ztr, ptr, *_ = cached(bb, args.train, cache, args.seed)
        from tgems.features import LayerFeatures
        data = load_dataset(args.train, seed=args.seed) if args.caption_weight > 0 else None
        settings = IndexFitSettings(seed=args.seed, caption_weight=args.caption_weight, hidden=args.hidden,
                                    epochs=args.epochs, readout_patch=args.readout_patch)
        model, info = fit_index_model(bb, data, settings, feats=LayerFeatures(
            ztr, None, torch.zeros(len(ztr), dtype=torch.long), patch=ptr))
        write_index_model(args.index_model, model, bb, {"data": args.train, **info})
        print(f"fit the index maps on {args.train} ({len(ztr)} images) -> {args.index_model}")
    model = load_index_model(args.index_model, bb)
    zc, pc, _, _, _ = cached(bb, args.calib, cache, args.seed)
    z, pz, labels, captions, img_held = cached(bb, args.test, cache, args.seed)
    if not model.reads_patch:
        pc = pz = None
    caps = sorted(set(captions))
    cap_label = {}
    for c, y in zip(captions, labels.tolist()):
        cap_label.setdefault(c, y)
    cap_y = torch.tensor([cap_label[c] for c in caps])
    held_class = {int(y): bool(h) for y, h in zip(labels.tolist(), img_held.tolist())}
    cap_held = torch.tensor([held_class[int(y)] for y in cap_y])
    text = F.normalize(bb.encode_text(caps).float(), dim=-1)
    rel = cap_y[:, None] == labels[None, :]  # (captions, images)
    full_f = full_flops(bb)  # an embedding: no labels scored
    head = model.head_flops()
    results = []

    def add(method, budget, layer, emb, depth, flops):
        results.extend(records(method, budget, layer, text @ emb.t(), rel, cap_held, img_held,
                               float(depth.double().mean()), float(flops.mean()) / full_f))

    est = model.layer_estimates(z, pz)  # (N, n + 1, D)
    ones = torch.ones(len(z), dtype=torch.long)
    add("full", None, L, est[:, -1], ones * L, torch.full((len(z),), float(full_f), dtype=torch.float64))
    for j, l in enumerate(model.layers):
        base = bb.flops_embed() + l * bb.flops_block() + bb.flops_readout()
        add("static", None, l, est[:, j], ones * l, torch.full((len(z),), float(base + head), dtype=torch.float64))
        add("lens", None, l, F.normalize(z[:, l - 1], dim=-1), ones * l, torch.full((len(z),), float(base), dtype=torch.float64))
    budgets = [float(b) for b in args.budgets.split(",")]
    tgem = calib_text = None
    if args.text_guided:
        from tgems.tgem import load_tgem
        tgem = load_tgem(args.text_guided, bb)[0]
        cdata_caps = sorted(set(json.loads((cache / f"{args.calib.replace(':', '_')}_s{args.seed}_{bb.fingerprint()}.json")
                                           .read_text())["captions"]))
        calib_text = F.normalize(bb.encode_text(cdata_caps).float(), dim=-1)
    calibrations = {}
    for b in budgets:
        tau, info = calibrate_index(model, zc, budget=b, patch=pc)
        calibrations[str(b)] = info
        emb, depth = model.simulate(z, tau, pz)
        flops = engine_flops(bb, model.layers, head, depth)
        add("index", b, None, emb, depth, flops)
        if tgem is not None:
            s = text_guided_scores(tgem, z, text, depth, zc, calib_text)
            results.extend(records("text_guided", b, None, s.t(), rel, cap_held, img_held,
                                   float(depth.double().mean()), float(flops.mean()) / full_f))
    # the guarantee: calibrate on --calib (seen combinations), measure on the test images of each split
    guarantee = []
    if args.max_drop:
        from tgems.retrieval import rank_failures

        ccaps = json.loads((cache / f"{args.calib.replace(':', '_')}_s{args.seed}_{bb.fingerprint()}.json").read_text())
        from tgems.data.scenes import CLASSES
        ref = list(CLASSES) + sorted(set(ccaps["captions"]) - set(CLASSES))
        rtext = F.normalize(bb.encode_text(ref).float(), dim=-1)
        for rank in [int(r) for r in args.rank.split(",")]:
            fails = rank_failures(est, rtext, rank)
            for eps in [float(e) for e in args.max_drop.split(",")]:
                tau, info = calibrate_index(model, zc, max_drop=eps, delta=args.delta, text=rtext, rank=rank,
                                            patch=pc)
                e_ = first_exit(model.layer_scores(z, est), tau)
                f_ = fails[torch.arange(len(z)), e_].double()
                depth = torch.as_tensor(model.layers + [L])[e_]
                row = {"eps": eps, "delta": args.delta, "rank": rank, "tau": tau, "calib_failures": info["disagree"],
                       "calib_ucb": round(info["ucb"], 4), "reference_texts": len(ref),
                       "test_failure_seen": round(float(f_[~img_held].mean()), 4),
                       "test_failure_heldout": round(float(f_[img_held].mean()), 4),
                       "mean_layers_seen": round(float(depth[~img_held].double().mean()), 3),
                       "mean_layers_heldout": round(float(depth[img_held].double().mean()), 3)}
                if args.draws > 0:  # re-drawn calibration sets from one pool of seen images
                    pool_z = torch.cat([zc, z[~img_held]])
                    pool_p = None if pz is None else torch.cat([pc, pz[~img_held]])
                    pool_est = model.layer_estimates(pool_z, pool_p)
                    pool_fail = rank_failures(pool_est, rtext, rank).double()
                    pool_scores = model.layer_scores(pool_z, pool_est)
                    rates = []
                    for d in range(args.draws):
                        perm = torch.as_tensor(np.random.default_rng([args.seed, d]).permutation(len(pool_z)))
                        cal, test = perm[:args.n_cal], perm[args.n_cal:]
                        t_, _ = calibrate_index(model, pool_z[cal], max_drop=eps, delta=args.delta, text=rtext,
                                                rank=rank, patch=None if pool_p is None else pool_p[cal])
                        e2 = first_exit(pool_scores[test], t_)
                        rates.append(float(pool_fail[test][torch.arange(len(test)), e2].mean()))
                    row.update(draws=args.draws, n_cal=args.n_cal, n_test=len(pool_z) - args.n_cal,
                               draws_within_eps=int(sum(r <= eps for r in rates)),
                               median_failure=round(float(np.median(rates)), 4), max_failure=round(max(rates), 4))
                guarantee.append(row)
                print("guarantee", row)
    # the engine decides as the simulation: check it on the first images at the middle budget
    check = None
    if args.engine_check > 0:
        b = budgets[len(budgets) // 2]
        data = load_dataset(args.test, seed=args.seed)
        n = min(args.engine_check, len(data))
        idx = np.linspace(0, len(data) - 1, n).round().astype(np.int64)
        tau = calibrations[str(b)]["tau"]
        index = EarlyExitIndex.build(bb, data.subset(idx), model, tau=tau)
        emb, depth = model.simulate(z[idx], tau, None if pz is None else pz[idx])
        check = {"budget": b, "images": n, "exit_layers_equal": bool(torch.equal(index.exit_layers, depth)),
                 "max_embedding_diff": float((index.embeddings - emb).abs().max()),
                 "flops_equal": bool(torch.allclose(index.flops, engine_flops(bb, model.layers, head, depth)))}
        print(f"engine check at budget {b} on {n} images: {check}")
    report = {"benchmark": "retrieval", "model": args.model, "index_model": str(args.index_model),
              "test": args.test, "calib": args.calib, "seed": args.seed, "num_layers": L, "gallery_images": len(z),
              "query_captions": len(caps), "relevance": "class-level: caption names the image's colour-shape class",
              "calibration": calibrations, "guarantee": guarantee, "engine_check": check, "seconds": round(time.time() - t0, 1),
              "results": results}
    print_table(results, budgets, L)
    if args.json:
        from tgems.io import write_json
        write_json(args.json, report)
    if args.plot:
        plot(results, args.plot)


def _get(results, method, direction, split, budget=None, layer=None):
    for r in results:
        if (r["method"], r["direction"], r["split"]) == (method, direction, split) and r["budget"] == budget \
                and r["layer"] == layer:
            return r
    return None


def at_depth(results, method, direction, split, depth, key="recall@10"):
    """Linear interpolation of a per-layer method's figure at a fractional mean depth."""
    pts = sorted((r["mean_layers"], r[key]) for r in results
                 if (r["method"], r["direction"], r["split"]) == (method, direction, split) and r["budget"] is None)
    xs, ys = zip(*pts)
    return float(np.interp(depth, xs, ys))


def print_table(results, budgets, L):
    print("| method | budget | layer | dir | split | R@1 | R@5 | R@10 | mAP | mean layers | FLOPs ratio |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r["method"] in ("static", "lens") and r["layer"] not in (3, 6, 9):
            continue
        print(f"| {r['method']} | {r['budget'] or ''} | {r['layer'] or ''} | {r['direction']} | {r['split']} | "
              f"{r['recall@1']:.2f} | {r['recall@5']:.2f} | {r['recall@10']:.2f} | {r['mAP']:.2f} | {r['mean_layers']:.2f} | "
              f"{r['flops_ratio']:.3f} |")
    for key in ("recall@10", "mAP"):
        print(f"\ntargets ({key}, points): index minus full; index minus static (with the maps) at the same mean depth")
        for b in budgets:
            for d in ("t2i", "i2t"):
                parts = []
                for split in ("seen", "heldout", "all"):
                    r, f = _get(results, "index", d, split, b), _get(results, "full", d, split, None, L)
                    if r is None:
                        continue
                    st = at_depth(results, "static", d, split, r["mean_layers"], key)
                    parts.append(f"{split} {r[key] - f[key]:+.2f} / {r[key] - st:+.2f}")
                print(f"  budget {b} {d}: " + "; ".join(parts))


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgems.io import atomic_path

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    panels = [(key, d, s) for key in ("recall@10", "mAP") for d in ("t2i", "i2t") for s in ("seen", "heldout")]
    for ax, (key, d, split) in zip(axes.flat, panels):
        for method, style in (("static", "o-"), ("lens", "s--"), ("index", "D-"), ("text_guided", "^:")):
            pts = sorted((r["mean_layers"], r[key]) for r in results
                         if (r["method"], r["direction"], r["split"]) == (method, d, split))
            if pts:
                ax.plot(*zip(*pts), style, label=method, ms=4)
        f = [r for r in results if (r["method"], r["direction"], r["split"]) == ("full", d, split)][0]
        ax.axhline(f[key], color="k", lw=0.8, ls=":", label="full CLIP")
        ax.set_title(f"{d}, {split}: {key}")
        ax.set_xlabel("mean executed layers")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
