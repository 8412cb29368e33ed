"""Accuracy / compute of every method at one budget or a sweep, on the same images and machine.

Exit decisions are made on cached per-layer features (identical to what the engine decides; the
test suite checks this), and throughput is measured by running the engine itself on a fixed batch.
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from tgems.calibration import simulate
from tgems.classifier import EarlyExitClassifier
from tgems.engine import run_early_exit
from tgems.errors import TGEMError
from tgems.evaluation.baselines import ProbeExits, fit_probes, oracle_depth
from tgems.features import LayerFeatures, extract_features
from tgems.jumper import exit_head_flops
from tgems.policies import ExitAtLayer, NeverExit
from tgems.tgem import read_tgem_config
from tgems.options import DELTA

DEFAULT_BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7)
METHODS = ("full", "lens", "static", "probe", "sample", "tgem_cls", "tgem_rates", "oracle")


def analytic_flops(backbone, depth: torch.Tensor, candidates: list[int], head_flops: float,
                   head_flops_by_layer: dict | None = None) -> torch.Tensor:
    """Per-sample FLOPs as the engine counts them (`tgems.engine.exit_flops`): embedding, `depth` blocks, and
    a readout plus exit head at every candidate layer visited (the last layer is always one)."""
    from tgems.engine import exit_flops

    return exit_flops(backbone, torch.as_tensor(depth, dtype=torch.long),
                      sorted(set(candidates) | {backbone.num_layers}), head_flops, head_flops_by_layer)


SPREAD_LIMIT = 1.3  # max/min images per second above this: the timing is not to be trusted
LOAD_LIMIT = 0.5  # 1-minute load average, less the timed runs' own threads, above this many per core: busy
CPU_SHARE_LIMIT = 0.75  # timed runs that got less of their threads' CPU than this were sharing the machine


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def measure_throughputs(backbone, pixels: torch.Tensor, policies: list, repeats: int = 5, batch_size: int = 256,
                        progress: bool = False) -> list[dict]:
    """Images/second of the engine for each policy on the same batch, timed round-robin (repeat r runs
    every policy once, starting one further along each round) so a busy spell hits all methods alike
    rather than whichever happened to run then. Per policy: images_per_second (median), ips_min, ips_max,
    and the machine's 1-minute load before / after and its core count, to judge the numbers by."""
    from tqdm.auto import tqdm

    if not policies:
        return []
    for pol in policies:  # warm-up
        run_early_exit(backbone, pixels[: min(len(pixels), 32)], pol, batch_size=batch_size)
    before = _load()
    threads = torch.get_num_threads()
    times, shares = [[] for _ in policies], [[] for _ in policies]
    n = len(policies)
    with tqdm(total=repeats * n, desc="timing", disable=not progress, leave=False) as bar:
        for r in range(repeats):
            for i in [(r + k) % n for k in range(n)]:
                t, c = time.perf_counter(), time.process_time()
                run_early_exit(backbone, pixels, policies[i], batch_size=batch_size)
                wall = time.perf_counter() - t
                times[i].append(wall)
                shares[i].append((time.process_time() - c) / (wall * threads))
                bar.update(1)
    load = [before, _load()]
    out = []
    for ts, sh in zip(times, shares):
        ips = len(pixels) / np.asarray(ts)
        out.append({"images_per_second": round(float(np.median(ips)), 1), "ips_min": round(float(ips.min()), 1),
                    "ips_max": round(float(ips.max()), 1), "load": load, "cores": _cores(), "threads": threads,
                    "cpu_share": round(float(np.median(sh)), 3), "repeats": repeats})
    return out


def measure_throughput(backbone, pixels: torch.Tensor, policy, repeats: int = 5, batch_size: int = 256) -> float:
    """Median images/second of the engine with one policy on a fixed batch."""
    return measure_throughputs(backbone, pixels, [policy], repeats, batch_size)[0]["images_per_second"]


def timing_doubts(record: dict) -> list[str]:
    """Why a timed record's images/second cannot be trusted: a wide spread between repeats, or a busy machine."""
    out = []
    lo, hi = record.get("ips_min"), record.get("ips_max")
    if lo and hi and hi / lo > SPREAD_LIMIT:
        out.append(f"repeats spread {hi / lo:.2f}x")
    cores, load = record.get("cores"), [x for x in (record.get("load") or []) if x is not None]
    own = record.get("threads") or 0  # the timed runs' own threads count in the load average too
    if cores and load and max(load) - own > LOAD_LIMIT * cores:
        out.append(f"load {max(load):.1f} on {cores} cores")
    share = record.get("cpu_share")
    if share is not None and share < CPU_SHARE_LIMIT:
        out.append(f"the timed runs got {100 * share:.0f}% of their {own} threads' CPU")
    return out


MIN_EVAL_IMAGES = 8  # per split (test, calibration): fewer make every percentage a coin toss
DEGENERATE_SHARE = 0.9  # the full model giving one class to this share of the test images: degenerate data


def check_eval_data(test, calib) -> None:
    """Refuse evaluation data that cannot say anything, before any work: test images of fewer than two
    classes (100 % on one class is no result), or fewer than MIN_EVAL_IMAGES test or calibration images."""
    present = np.unique(np.asarray(test.labels))
    if len(present) < 2:
        which = f" ('{test.classes[int(present[0])]}')" if len(present) else ""
        raise TGEMError(f"the test images of {test.name} are all of one class{which}: accuracy on one class says "
                        f"nothing about early exit; evaluate on images of at least two classes")
    for what, d in (("test", test), ("calibration", calib)):
        if len(d) < MIN_EVAL_IMAGES:
            raise TGEMError(f"{len(d)} {what} image(s) are too few to evaluate on (at least {MIN_EVAL_IMAGES} "
                            f"each for test and calibration; give more images or --calib SPEC)")


DEGENERATE_KINDS = ("degenerate", "near_chance")  # warnings after which a report has no result to give


def data_warnings(full_preds: torch.Tensor, classes: list[str], n_calib: int,
                  labels: torch.Tensor | None = None) -> list[dict]:
    """Report warnings about the data: the full model predicting one class for almost every test image
    (degenerate data or labels: accuracy and speed-up then measure nothing), its accuracy on the test
    labels at or near chance (`tgems.chance`), and few images."""
    from tgems.chance import chance_check, chance_message

    out = []
    counts = torch.bincount(full_preds.cpu(), minlength=len(classes))
    top = int(counts.argmax())
    share = float(counts[top]) / max(1, len(full_preds))
    if share >= DEGENERATE_SHARE:
        out.append({"kind": "degenerate", "share": round(share, 4), "class": classes[top],
                    "message": f"the full model predicts '{classes[top]}' for {100 * share:.1f}% of the "
                               f"{len(full_preds)} test images: the data or the labels are degenerate"})
    if labels is not None:
        check = chance_check(int((full_preds.cpu() == labels.cpu()).sum()), len(labels), len(classes))
        if check["degenerate"]:
            out.append({"kind": "near_chance", **check, "message": chance_message(check)})
    n = len(full_preds)
    if n < 100 or n_calib < 100:
        out.append({"kind": "few_images", "message": f"{n} test and {n_calib} calibration images: accuracies "
                                                     f"carry about +-{100 / np.sqrt(n):.0f} points of sampling error"})
    return out


def is_degenerate(warnings) -> bool:
    """Whether a report's warnings leave it without a result (one class for almost everything, or chance)."""
    return any(w.get("kind") in DEGENERATE_KINDS for w in warnings or [])


class Recorder:
    """Turns per-sample predictions and depths into result records, one per class split."""

    def __init__(self, backbone, labels: torch.Tensor, full_preds: torch.Tensor, splits: np.ndarray,
                 num_classes: int):
        from tgems.engine import full_flops

        self.backbone, self.labels, self.full, self.results = backbone, labels, full_preds, []
        self.full_flops = full_flops(backbone, num_classes)  # plain CLIP scoring the label set
        self.static_correct = None  # (fixed layers, (N, n) correctness at each), for paired comparisons
        self.masks = {"all": np.ones(len(labels), dtype=bool)}
        for name in ("seen", "heldout"):
            m = splits == name
            if m.any() and not m.all():
                self.masks[name] = m

    def add(self, method: str, budget, preds, depth, flops, ips=None, **extra):
        full_flops = self.full_flops
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
        return self.results[-len(self.masks):]

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


def run_eval(backbone, tgem_dirs: list, test, calib, train=None, shots=None, budgets=DEFAULT_BUDGETS,
             k_shot: int = 16, seed: int = 0, progress: bool = True, speed: bool = True, timing_n: int = 1024,
             templates=None, max_drop: float | None = None, delta: float = DELTA, log=print) -> dict:
    """Every method, every budget; returns {"results": [...], "extras": {...}} (the schema: docs/design.md).

    Calibration matches the calibration images to the test label set by class text; test classes without
    calibration images (text-only classes) are allowed: that is what the held-out split measures."""
    L = backbone.num_layers
    check_eval_data(test, calib)
    labels = list(test.classes)
    dirs = {f"tgem_{read_tgem_config(d)['space']}": d for d in tgem_dirs}
    if "tgem_cls" not in dirs:
        raise TGEMError("tgems eval needs a `cls` T-GEM checkpoint (the reference for static truncation and oracle)")
    clfs = {name: EarlyExitClassifier(backbone, d, labels, templates) for name, d in dirs.items()}
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
    rec = Recorder(backbone, y, full_preds, test.sample_split(), len(labels))
    warns = data_warnings(full_preds, labels, len(calib), y)
    for w in warns:
        log(f"warning: {w['message']}")
    timed = []  # (records, policy): timed together at the end, round-robin (measure_throughputs)

    def time_later(records, policy):
        if speed:
            timed.append((records, policy))

    full_depth = torch.full((len(y),), L)

    time_later(rec.add("full", None, full_preds, full_depth,
                       torch.full((len(y),), rec.full_flops, dtype=torch.float64)), NeverExit())

    # static truncation with the T-GEM `cls` profiles of each candidate layer (layer L: full CLIP)
    static_layers = ref.profiles.exit_layers
    for j, k in enumerate(static_layers):
        depth = torch.full((len(y),), k)
        r = rec.add("static", None, ref_preds[:, j], depth,
                    analytic_flops(backbone, depth, [k], exit_head_flops(ref.profiles)), layer=k)
        if k in (L // 4, L // 2, 3 * L // 4):
            time_later(r, ExitAtLayer(k))
    rec.static_correct = (static_layers, ref_preds.eq(y[:, None]).float())

    # plain truncated CLIP ("logit lens"): z_l against the raw class texts, no T-GEM, no training
    lens_preds = lens_predictions(ft.z, ref.text)
    for k in range(1, L + 1):
        depth = torch.full((len(y),), k)
        rec.add("lens", None, lens_preds[:, k - 1], depth,
                analytic_flops(backbone, depth, [k], 2.0 * ref.text.numel()), layer=k)

    # oracle: first layer from which the prediction equals the full model's and stays so
    od = oracle_depth(ref_preds, ref.profiles.exit_layers)
    rec.add("oracle", None, full_preds, od, analytic_flops(backbone, od, ref.profiles.layers, exit_head_flops(ref.profiles)))

    methods: dict = {}
    if ftr is not None:
        w, b = fit_probes(ftr, ref.profiles.layers, len(labels), seed=seed)
        methods["probe"] = ProbeExits(w, b, ref.profiles)
    if fs is not None:
        from tgems.training.jumper_fit import from_samples  # the k-shot baseline fits its Jumper

        methods["sample"] = from_samples(
            backbone, shots, labels, k=k_shot, templates=ref.templates, layers=ref.profiles.layers, seed=seed,
            feats=fs, jumper_feats=ftr if ftr is not None else fc)
    methods.update(clfs)

    bar = tqdm(total=len(methods) * len(budgets) + (len(clfs) if max_drop is not None else 0),
               desc="calibrate", disable=not progress, leave=False)
    for name, m in methods.items():
        for budget in budgets:
            if name == "probe":
                m.calibrate_budget(fc, budget)
                scores, lp = m.layer_predictions(ft)
                preds, depth = simulate(scores, lp, m.exit_layers, m.tau)
                pol, head, tau = copy.copy(m), m.head_flops, m.tau  # a copy: m's tau moves with the budget
            else:
                c = m.calibrate(fc, budget=budget, allow_uncovered=True)
                preds, depth = c.simulate(ft)
                pol, head, tau = c.policy(), exit_head_flops(c.profiles), c.tau
            flops = analytic_flops(backbone, depth, pol.candidate_layers, head, getattr(pol, "head_flops_by_layer", None))
            time_later(rec.add(name, budget, preds, depth, flops, tau=round(float(tau), 5)), pol)
            bar.update(1)
        log(f"  {name}: done")

    if max_drop is not None:
        for name, m in clfs.items():
            c = m.calibrate(fc, max_drop=max_drop, delta=delta, allow_uncovered=True)
            preds, depth = c.simulate(ft)
            pol = c.policy()
            flops = analytic_flops(backbone, depth, c.profiles.layers, pol.head_flops,
                                   getattr(pol, "head_flops_by_layer", None))
            time_later(rec.add(name, None, preds, depth, flops, tau=round(c.tau, 5), max_drop=max_drop,
                               delta=delta, calib_ucb=round(c.calibration["ucb"], 5)), c.policy())
            bar.update(1)
    bar.close()

    if timed:
        log(f"timing {len(timed)} methods round-robin on {min(len(test), timing_n)} images")
        pixels = backbone.preprocess(test.images[:timing_n])
        for (records, _), t in zip(timed, measure_throughputs(backbone, pixels, [p for _, p in timed],
                                                              progress=progress)):
            for r in records:
                r.update(t)

    extras = {"exit_layers": {}, "difficulty": None}
    if budgets:
        b = 0.5 if 0.5 in budgets else budgets[len(budgets) // 2]
        _, depth = ref.calibrate(fc, budget=b, allow_uncovered=True).simulate(ft)
        extras["exit_layers"] = {"budget": b, "layers": depth.tolist()}
        if ft.difficulty is not None:
            extras["difficulty"] = np.asarray(ft.difficulty).round(4).tolist()
    return {"results": rec.results, "extras": extras, "features": {"test": ft, "calib": fc}, "classifiers": clfs,
            "warnings": warns}


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


def default_aux(spec: str, n_train: int, seed: int):
    """Calibration / training / shot sets that go with a test spec (scenes has its own splits)."""
    from tgems.data import load_dataset

    if spec.startswith("scenes"):
        return (load_dataset("scenes:calib", seed=seed), load_dataset("scenes:train", n=n_train, seed=seed),
                load_dataset("scenes:shots", seed=seed))
    return None, None, None


def split_dataset(data, seed: int, frac: float = 0.5):
    perm = np.random.default_rng(seed).permutation(len(data))
    n = int(len(data) * frac)
    return data.subset(np.sort(perm[:n])), data.subset(np.sort(perm[n:]))


def make_report(backbone, model_name: str, tgem_dirs: list, test, calib, train=None, shots=None,
                budgets=DEFAULT_BUDGETS, seed: int = 0, progress: bool = True, speed: bool = True,
                max_drop: float | None = None, delta: float = DELTA, log=print) -> tuple[dict, dict]:
    """(report, raw): the JSON report (schema in docs/design.md) and run_eval's raw output."""
    out = run_eval(backbone, tgem_dirs, test, calib, train, shots, budgets, seed=seed, progress=progress,
                   speed=speed, max_drop=max_drop, delta=delta, log=log)
    report = {"model": model_name, "data": test.name, "num_layers": backbone.num_layers, "seed": seed,
              "budgets": list(budgets), "results": out["results"], "extras": out["extras"],
              "warnings": out["warnings"], "degenerate": is_degenerate(out["warnings"])}
    if max_drop is not None:
        report["max_drop"] = {"eps": max_drop, "delta": delta, "n_calib": len(calib)}
    return report, out


def evaluate(model: str, tgem_dirs: list, data: str, n=None, calib=None, train=None, shots=None,
             n_train: int = 4000, budgets=DEFAULT_BUDGETS, seed: int = 0, speed: bool = True,
             progress: bool = True, device="cpu", dtype="float32", max_drop: float | None = None,
             delta: float = DELTA, log=print) -> dict:
    """`tgems eval`: load the model and data by name, run every method, return the report."""
    from tgems.backbones import load_backbone
    from tgems.data import load_dataset

    for d in tgem_dirs:
        read_tgem_config(d)
    bb = load_backbone(model, device=device, dtype=dtype)
    test = load_dataset(data, n=n, seed=seed)
    calib_ds, train_ds, shots_ds = default_aux(data, n_train, seed)
    if calib:
        calib_ds = load_dataset(calib, seed=seed)
    if train:
        train_ds = load_dataset(train, n=n_train, seed=seed)
    if shots:
        shots_ds = load_dataset(shots, seed=seed)
    if calib_ds is None:
        if len(test) < 2:
            raise TGEMError(f"{data} has {len(test)} image(s): too few to split into calibration and "
                            f"test halves (give --calib SPEC)")
        calib_ds, test = split_dataset(test, seed)
        log("no --calib given: half of the data calibrates, the other half is tested")
    report, _ = make_report(bb, model, tgem_dirs, test, calib_ds, train_ds, shots_ds, budgets, seed, progress,
                            speed, max_drop, delta, log)
    return report
