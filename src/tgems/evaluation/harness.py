"""Accuracy / compute of every method at one budget or a sweep, on the same images and machine.

Exit decisions are made on cached per-layer features (identical to what the engine decides; the
test suite checks this), and throughput is measured by running the engine itself on a fixed batch.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from tgems.baselines import ProbeExits, fit_probes, oracle_depth
from tgems.classifier import EarlyExitClassifier
from tgems.engine import ExitAtLayer, NeverExit, run_early_exit
from tgems.features import LayerFeatures, extract_features
from tgems.fit import final_scale, fit_jumper, load_tgem
from tgems.jumper import calibrate_max_drop, simulate
from tgems.profiles import sample_profiles

DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
METHODS = ("full", "lens", "static", "probe", "sample", "tgem_cls", "tgem_rates", "oracle")


def analytic_flops(backbone, depth: torch.Tensor, candidates: list[int], head_flops: float) -> torch.Tensor:
    """Per-sample FLOPs as the engine counts them: embedding, `depth` blocks, and a readout plus exit
    head at every candidate layer visited (the last layer is always one)."""
    L = backbone.num_layers
    cands = torch.as_tensor(sorted(set(candidates) | {L}), dtype=torch.long)
    visited = (cands[None, :] <= depth[:, None]).sum(1)
    return (backbone.flops_embed() + depth.double() * backbone.flops_block()
            + visited.double() * (backbone.flops_readout() + head_flops))


def measure_throughput(backbone, pixels: torch.Tensor, policy, repeats: int = 5, batch_size: int = 256) -> float:
    """Median images/second of the engine with this policy on a fixed batch."""
    run_early_exit(backbone, pixels[: min(len(pixels), 32)], policy, batch_size=batch_size)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run_early_exit(backbone, pixels, policy, batch_size=batch_size)
        times.append(time.perf_counter() - t)
    return float(len(pixels) / np.median(times))


class Recorder:
    """Turns per-sample predictions and depths into result records, one per class split."""

    def __init__(self, backbone, labels: torch.Tensor, full_preds: torch.Tensor, splits: np.ndarray):
        self.backbone, self.labels, self.full, self.results = backbone, labels, full_preds, []
        self.static_correct = None  # (fixed layers, (N, n) correctness at each), for paired comparisons
        self.masks = {"all": np.ones(len(labels), dtype=bool)}
        for name in ("seen", "heldout"):
            m = splits == name
            if m.any() and not m.all():
                self.masks[name] = m

    def add(self, method: str, budget, preds, depth, flops, ips=None, **extra):
        full_flops = self.backbone.flops_full()
        for split, m in self.masks.items():
            mt = torch.as_tensor(m)
            self.results.append({
                "method": method, "budget": budget, "split": split,
                "accuracy": round(float((preds[mt] == self.labels[mt]).float().mean()), 5),
                "agreement": round(float((preds[mt] == self.full[mt]).float().mean()), 5),
                "mean_layers": round(float(depth[mt].float().mean()), 4),
                "flops_ratio": round(float(flops[mt].mean() / full_flops), 5),
                "images_per_second": None if ips is None else round(ips, 1),
                "n": int(m.sum()), **self._vs_static(preds, depth, mt, budget), **extra})

    def _vs_static(self, preds, depth, m, budget) -> dict:
        """Accuracy minus static truncation at the same mean depth (interpolated between the two fixed
        layers around it, as a per-image mix), with its paired standard error over these images."""
        if budget is None or self.static_correct is None:
            return {}
        ks, correct = self.static_correct
        d = float(depth[m].float().mean())
        lo = max([j for j, k in enumerate(ks) if k <= d], default=0)
        hi = min([j for j, k in enumerate(ks) if k >= d], default=len(ks) - 1)
        f = 0.0 if hi == lo else (d - ks[lo]) / (ks[hi] - ks[lo])
        v = (preds[m] == self.labels[m]).float() - ((1 - f) * correct[m, lo] + f * correct[m, hi])
        return {"vs_static": round(float(v.mean()), 5),
                "vs_static_se": round(float(v.std() / np.sqrt(len(v))), 5) if len(v) > 1 else None}


def _classifier_from_tgem(backbone, path, labels, templates):
    tgem, jumper, cfg = load_tgem(path, backbone)
    clf = EarlyExitClassifier(backbone, tgem, labels, templates or cfg.get("templates"), jumper=jumper)
    return clf, cfg


def run_eval(backbone, tgem_dirs: list, test, calib, train=None, shots=None, budgets=DEFAULT_BUDGETS,
             k_shot: int = 16, seed: int = 0, progress: bool = True, speed: bool = True, timing_n: int = 1024,
             templates=None, log=print) -> dict:
    """Every method, every budget; returns {"results": [...], "extras": {...}} (see DESIGN.md)."""
    L = backbone.num_layers
    labels = list(test.classes)
    clfs = {}
    for d in tgem_dirs:
        clf, cfg = _classifier_from_tgem(backbone, d, labels, templates)
        clfs[f"tgem_{cfg['space']}"] = clf
    if "tgem_cls" not in clfs:
        from tgems.errors import TGEMError

        raise TGEMError("tgems eval needs a `cls` T-GEM checkpoint (the reference for static truncation and oracle)")
    need_rates = "tgem_rates" in clfs
    ref = clfs["tgem_cls"]
    log(f"extracting features ({len(test)} test, {len(calib)} calibration images)")
    ft = extract_features(backbone, test, rates=need_rates, progress=progress, desc="test features")
    fc = extract_features(backbone, calib, rates=need_rates, progress=progress, desc="calib features")
    ftr = extract_features(backbone, train, progress=progress, desc="train features") if train is not None else None
    fs = extract_features(backbone, shots, progress=progress, desc="shot features") if shots is not None else None
    y = ft.labels
    _, ref_preds = ref.layer_predictions(ft)
    full_preds = ref_preds[:, -1]
    rec = Recorder(backbone, y, full_preds, test.sample_split())
    timing = backbone.preprocess(test.images[:timing_n]) if speed else None
    ips = (lambda pol: measure_throughput(backbone, timing, pol)) if speed else (lambda pol: None)
    full_depth = torch.full((len(y),), L)

    rec.add("full", None, full_preds, full_depth, analytic_flops(backbone, full_depth, [], ref.profiles.head_flops()),
            ips(NeverExit()))

    # static truncation with the T-GEM `cls` profiles of each candidate layer (layer L: full CLIP)
    static_layers = ref.profiles.layers + [L]
    for j, k in enumerate(static_layers):
        depth = torch.full((len(y),), k)
        rec.add("static", None, ref_preds[:, j], depth, analytic_flops(backbone, depth, [k], ref.profiles.head_flops()),
                ips(ExitAtLayer(k)) if k in (L // 4, L // 2, 3 * L // 4) else None, layer=k)
    rec.static_correct = (static_layers, ref_preds.eq(y[:, None]).float())

    # plain truncated CLIP ("logit lens"): z_l against the raw class texts, no T-GEM, no training
    lens_preds = lens_predictions(ft.z, ref.text)
    for k in range(1, L + 1):
        depth = torch.full((len(y),), k)
        rec.add("lens", None, lens_preds[:, k - 1], depth,
                analytic_flops(backbone, depth, [k], 2.0 * ref.text.numel()), layer=k)

    # oracle: first layer from which the prediction equals the full model's and stays so
    od = oracle_depth(ref_preds, ref.profiles.layers + [L])
    rec.add("oracle", None, full_preds, od, analytic_flops(backbone, od, ref.profiles.layers, ref.profiles.head_flops()))

    methods: dict = {}
    if ftr is not None:
        w, b = fit_probes(ftr, ref.profiles.layers, len(labels), seed=seed)
        methods["probe"] = ProbeExits(w, b, ref.profiles.layers, ref.text, final_scale(backbone), L)
    if fs is not None:
        prof = sample_profiles(fs.space("cls"), fs.labels, len(labels), ref.text, ref.profiles.layers, L,
                               final_scale(backbone), "cls", k_shot, seed)
        sclf = EarlyExitClassifier(backbone, None, labels, ref.templates, profiles=prof)
        sclf.jumper = fit_jumper(prof, ftr if ftr is not None else fc)
        methods["sample"] = sclf
    methods.update(clfs)

    for name, m in methods.items():
        for budget in budgets:
            if name == "probe":
                m.calibrate_budget(fc, budget)
                scores, lp = m.layer_predictions(ft)
                preds, depth = simulate(scores, lp, m.layers + [L], m.tau)
                pol, head, tau = m, m.head_flops, m.tau
            else:
                m.calibrate(fc, budget=budget)
                preds, depth = m.simulate(ft)
                pol, head, tau = m.policy(), m.profiles.head_flops(), m.tau
            flops = analytic_flops(backbone, depth, pol.candidate_layers, head)
            rec.add(name, budget, preds, depth, flops, ips(pol), tau=round(float(tau), 5))
        log(f"  {name}: done")

    extras = {"exit_layers": {}, "difficulty": None}
    if 0.5 in budgets or budgets:
        b = 0.5 if 0.5 in budgets else budgets[len(budgets) // 2]
        ref.calibrate(fc, budget=b)
        _, depth = ref.simulate(ft)
        extras["exit_layers"] = {"budget": b, "layers": depth.tolist()}
        if ft.difficulty is not None:
            extras["difficulty"] = np.asarray(ft.difficulty).round(4).tolist()
    return {"results": rec.results, "extras": extras, "features": {"test": ft, "calib": fc}, "classifiers": clfs}


def guarantee_pool(backbone, n_calib: int = 2900, n_test: int = 20000, seed: int = 0,
                   progress: bool = True) -> LayerFeatures:
    """Features of n_calib + n_test scenes:testall images (its seen / held-out mix) for `guarantee_study`
    with calib_fraction = n_calib / (n_calib + n_test): test parts that large measure a disagreement
    near 1 % to about +-0.07 points, so the count of held draws checks the promise, not the test noise."""
    from tgems.data import load_dataset

    data = load_dataset(f"scenes:testall:{n_calib + n_test}", seed=seed)
    return extract_features(backbone, data, progress=progress, desc="guarantee pool")


def guarantee_study(clf: EarlyExitClassifier, pool: LayerFeatures, eps: float = 0.01, delta: float = 0.1,
                    n_splits: int = 20, seed: int = 0, calib_fraction: float = 0.5) -> dict:
    """Re-split a pool into calibration / test halves n_splits times; calibrate max_drop on one half and
    measure the disagreement with the full model on the other."""
    scores, preds = clf.layer_predictions(pool, goal="max_drop")
    layers = clf.profiles.layers + [clf.backbone.num_layers]
    rng = np.random.default_rng(seed)
    nc = int(round(len(pool) * calib_fraction))
    rows = []
    for i in range(n_splits):
        perm = torch.as_tensor(rng.permutation(len(pool)))
        c, t = perm[:nc], perm[nc:]
        tau, info = calibrate_max_drop(scores[c], preds[c], layers, eps, delta)
        p, d = simulate(scores[t], preds[t], layers, tau)
        dis = float((p != preds[t, -1]).float().mean())
        rows.append({"split": i, "tau": round(tau, 5), "test_disagreement": round(dis, 5),
                     "test_mean_layers": round(float(d.float().mean()), 3), "calib_ucb": round(info["ucb"], 5)})
    held = sum(r["test_disagreement"] <= eps for r in rows)
    return {"eps": eps, "delta": delta, "n_splits": n_splits, "n_calib": nc, "n_test": len(pool) - nc,
            "held": held, "rows": rows,
            "mean_test_layers": round(float(np.mean([r["test_mean_layers"] for r in rows])), 3)}


def lens_predictions(z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[N, L] class of every layer's readout z_l [N, L, d] against class text embeddings [C, d]."""
    return torch.einsum("nld,cd->nlc", torch.nn.functional.normalize(z, dim=-1), text).argmax(-1)


def zero_shot_layers(backbone, feats: LayerFeatures, text: torch.Tensor, splits: np.ndarray | None = None) -> list:
    """Top-1 of every layer's readout z_l against the class text embeddings ("logit lens"), per split."""
    masks = {"all": np.ones(len(feats), dtype=bool)}
    if splits is not None:
        masks.update({s: splits == s for s in ("seen", "heldout") if (splits == s).any()})
    preds = lens_predictions(feats.z, text)
    rows = []
    for l in range(feats.z.shape[1]):
        row = {"layer": l + 1}
        for s, m in masks.items():
            row[s] = round(float((preds[torch.as_tensor(m), l] == feats.labels[torch.as_tensor(m)]).float().mean()), 4)
        rows.append(row)
    return rows
