"""Candidate budget Jumpers on cached features (issue 12): which exit scorer transfers to label sets it was
never fit on?

Every variant is a budget-goal exit scorer used with the SHIPPED `embedded:cls` T-GEM modules on the
`scenes:testall` label set (all 64 classes; 12 of them held out, text-only), one tau calibrated on
`scenes:calib` by `calibrate_budget` (labels, best accuracy under the budget), simulated on the test images;
reported per split and budget 0.3 .. 0.7 with the paired difference (and its standard error) against static
truncation at the policy's own mean depth and against the shipped Jumper, plus the per-layer AUC of the score
for "exiting here costs nothing" on both splits.

What varies (each variant = training data x signals x target x scorer):

- training data: `ship` = the shipped fit's Jumper images (the 20 % of `scenes:train` held out of G_l
  training, fit_tgem's split), scored by the shipped modules on the 52 seen classes (the shipped recipe);
  `xfit` = cross-fitted: two T-GEMs fit (same recipe) on the training images of one half of the seen classes
  each; the Jumper images are scored by each half-model on all 52 seen classes, so half of them belong to
  classes that model only knows by text (as held-out classes do at test); `ship+xfit`: both;
  `--folds K` (K > 2): K models instead, each trained on all seen classes but one fold of them;
  `ship+xfit+xother`: and each half-model's scores of the G_l-training images of the other half's classes
  (images and classes it never saw: 8,000 more text-only examples per half-model);
  `epi` suffix: episodic label sets, each Jumper image scored against random class subsets (sizes 8 .. 52,
  containing its class), several draws per image.
- signals: `conf` the 6 confidence signals, `z` the unit readout z_l, `desc` label-set-describing signals:
  cosine of the top-2 classes' texts, the top-1 class's nearest other class text in the label set, top-5
  overlap with the previous candidate layer, log(C)/log(100).
- target: `nl` exiting costs no accuracy (the shipped budget target) or `ag` agreement with the full model.
- scorer: per-layer logistic (`lr`, L2 given) or one small MLP over all layers (`mlp`, layer one-hot input).

    python benchmarks/jumper_variants.py --json results/jumper_variants.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import tgems  # noqa: E402
from jumper_study import BUDGETS, SPLITS, auc, cached_features, paired, static_at, static_mix  # noqa: E402
from tgems.calibration import calibrate_budget, simulate  # noqa: E402
from tgems.io import write_json  # noqa: E402
from tgems.jumper import Jumper  # noqa: E402
from tgems.training.jumper_fit import fit_logistic  # noqa: E402
from tgems.profiles import check_readable_labels  # noqa: E402
from tgems.tgem import TGEM, load_tgem  # noqa: E402
from tgems.training.fit import FitSettings, fit_tgem  # noqa: E402

CACHE = Path("results/jumper_variants")


# ----------------------------------------------------------------------------- signals

def all_logits(profiles, feats) -> torch.Tensor:
    return profiles.layer_logits(feats.space(profiles.space), feats.z[:, -1])


def signal_table(logits: torch.Tensor, z: torch.Tensor, layers: list[int], text: torch.Tensor,
                 mask: torch.Tensor | None = None) -> dict:
    """Per candidate layer, every signal a variant may read: {'conf': (N, n, 6), 'desc': (N, n, 4),
    'z': (N, n, D)}; also probs-based predictions (N, n + 1). `mask` (N, C) bool restricts each row's label
    set (episodic); softmax over the row's label set."""
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
    probs = logits.softmax(-1)
    N, n1, C = probs.shape
    csize = mask.sum(1).float() if mask is not None else torch.full((N,), float(C))
    tcos = text @ text.T
    tcos.fill_diagonal_(-2.0)
    conf, desc, zs = [], [], []
    prev_p = prev_z = None
    for j, l in enumerate(layers[:-1]):
        p = probs[:, j]
        top = p.topk(min(5, C), dim=1)
        top1, pred = top.values[:, 0], top.indices[:, 0]
        margin = top1 - top.values[:, 1]
        ent = -(p * p.clamp_min(1e-12).log()).sum(1) / csize.clamp_min(2).log()
        zl = z[:, l - 1].float()
        if prev_p is None:
            agree = prev_top = cos = ov = torch.zeros_like(top1)
        else:
            agree = (pred == prev_p.argmax(1)).float()
            prev_top = prev_p.gather(1, pred[:, None])[:, 0]
            cos = F.cosine_similarity(zl, prev_z, dim=1)
            pk = prev_p.topk(min(5, C), dim=1).indices
            ov = (top.indices[:, :, None] == pk[:, None, :]).any(2).float().mean(1)
        conf.append(torch.stack([top1, margin, ent, agree, prev_top, cos], 1))
        t2 = tcos[pred, top.indices[:, 1]]
        tc = tcos[pred]
        if mask is not None:
            tc = tc.masked_fill(~mask, -2.0)
        nn = tc.max(1).values
        desc.append(torch.stack([t2, nn, ov, csize.log() / math.log(100)], 1))
        zs.append(F.normalize(zl, dim=-1))
        prev_p, prev_z = p, zl
    return {"conf": torch.stack(conf, 1), "desc": torch.stack(desc, 1), "z": torch.stack(zs, 1),
            "preds": probs.argmax(-1)}


def pick(table: dict, sig: str) -> torch.Tensor:
    return torch.cat([table[k] for k in sig.split("+")], -1)


def targets(preds: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "ag":
        return (preds[:, :-1] == preds[:, -1:]).float()
    return ((preds[:, :-1] == labels[:, None]) | (preds[:, -1:] != labels[:, None])).float()


# ----------------------------------------------------------------------------- scorers

class LR:
    def __init__(self, l2):
        self.l2 = l2

    def fit(self, x, y):
        self.mu, self.sd = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-3)
        self.j = fit_logistic((x - self.mu) / self.sd, y, l2=self.l2)
        return self

    def __call__(self, x):
        return self.j.scores((x - self.mu) / self.sd)


class LRRaw:
    """The shipped fit: unstandardised signals, L2 1e-3."""

    def __init__(self, l2=1e-3):
        self.l2 = l2

    def fit(self, x, y):
        self.j = fit_logistic(x, y, l2=self.l2)
        return self

    def __call__(self, x):
        return self.j.scores(x)


class MLP:
    def __init__(self, hidden=32, wd=1e-3, steps=400, seed=0):
        self.hidden, self.wd, self.steps, self.seed = hidden, wd, steps, seed

    def _in(self, x):
        N, n, S = x.shape
        eye = torch.eye(n)[None].expand(N, n, n)
        return torch.cat([(x - self.mu) / self.sd, eye], -1).reshape(N * n, S + n)

    def fit(self, x, y):
        torch.manual_seed(self.seed)
        self.mu, self.sd = x.mean((0, 1)), x.std((0, 1)).clamp_min(1e-3)
        xi, yi = self._in(x), y.reshape(-1)
        self.net = torch.nn.Sequential(torch.nn.Linear(xi.shape[1], self.hidden), torch.nn.GELU(),
                                       torch.nn.Linear(self.hidden, 1))
        opt = torch.optim.AdamW(self.net.parameters(), lr=3e-3, weight_decay=self.wd)
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            b = torch.randint(len(yi), (4096,), generator=g)
            loss = F.binary_cross_entropy_with_logits(self.net(xi[b])[:, 0], yi[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self

    def __call__(self, x):
        with torch.no_grad():
            return torch.sigmoid(self.net(self._in(x))[:, 0]).view(x.shape[0], x.shape[1])


# ----------------------------------------------------------------------------- training data

def episodic_masks(labels: torch.Tensor, C: int, draws: int, seed: int, lo: int = 8) -> torch.Tensor:
    """(draws * N, C) label-set masks, each containing the row's class; sizes uniform in lo .. C."""
    g = torch.Generator().manual_seed(seed)
    N = len(labels)
    out = []
    for _ in range(draws):
        k = torch.randint(lo, C + 1, (N,), generator=g)
        r = torch.rand(N, C, generator=g)
        r[torch.arange(N), labels] = -1.0  # always in
        rank = r.argsort(1).argsort(1)
        out.append(rank < k[:, None])
    return torch.cat(out)


def build_sets(logits, z, layers, text, labels, episodic: int, seed: int):
    """Signal tables and labels for one (model, images) pair, with `episodic` extra draws of label sets."""
    sets = [(signal_table(logits, z, layers, text), labels)]
    if episodic:
        m = episodic_masks(labels, text.shape[0], episodic, seed)
        rep = m.shape[0] // len(labels)
        sets.append((signal_table(logits.repeat(rep, 1, 1), z.repeat(rep, 1, 1), layers, text, m), labels.repeat(rep)))
    return sets


def concat_tables(sets):
    keys = ("conf", "desc", "z", "preds")
    return {k: torch.cat([s[0][k] for s in sets]) for k in keys}, torch.cat([s[1] for s in sets])


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="draw of the test and calibration images")
    ap.add_argument("--xfit-epochs", type=int, default=30)
    ap.add_argument("--folds", type=int, default=2,
                    help="cross-fitting folds of the seen classes: 2 = two half-class models (the library's); K > 2 = "
                         "K models, each trained on all classes but one fold")
    ap.add_argument("--variants", default="all", help="comma-separated variant names (default all)")
    ap.add_argument("--baseline", default="embedded:cls",
                    help="checkpoint whose budget Jumper is the `shipped` baseline (the modules are always "
                         "embedded:cls's); e.g. the pre-issue-12 one: mkdir old && git show dcb9e24^:src/tgems/"
                         "assets/embedded_tgem/cls/tgem.json > old/tgem.json (and tgem.safetensors)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    bb = tgems.load_backbone("embedded")
    ft, split_t = cached_features(bb, "scenes:testall", args.seed, "embedded")
    fc, _ = cached_features(bb, "scenes:calib", args.seed, "embedded")
    ftr, _ = cached_features(bb, "scenes:train", 0, "embedded")
    tgem, shipped, cfg = load_tgem("embedded:cls", bb)
    templates = cfg.get("templates") or ["{}"]
    L = bb.num_layers
    classes = ft.classes
    text_all = check_readable_labels(bb, classes, templates).cpu().float()
    prof = tgem.profiles(text_all, bb).to("cpu")
    layers = prof.exit_layers
    masks = {s: torch.as_tensor(split_t == s) for s in SPLITS}
    y = ft.labels
    print(f"features ready ({time.time() - t0:.0f} s)", flush=True)

    # test / calib tables (label set: all 64 classes, shipped modules)
    tab_t = signal_table(all_logits(prof, ft), ft.z, layers, text_all)
    tab_c = signal_table(all_logits(prof, fc), fc.z, layers, text_all)
    lp, clp = tab_t["preds"], tab_c["preds"]
    full = lp[:, -1]
    correct = lp.eq(y[:, None]).float()
    cal_labels = fc.labels

    # the shipped fit's Jumper images (fit_tgem's split of scenes:train, seed 0) on the 52 seen classes
    present = np.unique(ftr.labels.numpy())
    seen_text = text_all[torch.as_tensor(present)]
    remap = torch.full((len(classes),), -1, dtype=torch.long)
    remap[torch.as_tensor(present)] = torch.arange(len(present))
    perm = np.random.default_rng(0).permutation(len(ftr))
    n_j = int(round(len(perm) * 0.2))
    jump_idx, train_idx = np.sort(perm[:n_j]), np.sort(perm[n_j:])
    fj = ftr.subset(jump_idx)
    yj = remap[fj.labels]
    prof_seen = tgem.profiles(seen_text, bb).to("cpu")
    lg_ship = all_logits(prof_seen, fj)

    # cross-fitted half-models: T-GEMs on the training images of one half of the seen classes each
    xfit_logits, xother = [], []
    need_x = args.variants == "all" or "xfit" in args.variants
    if need_x:
        CACHE.mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng(1).permutation(present)
        if args.folds == 2:  # model h trains on half h
            halves = [np.sort(order[:len(order) // 2]), np.sort(order[len(order) // 2:])]
            names = [f"xfit_h{h}_e{args.xfit_epochs}" for h in range(2)]
        else:  # model f trains on every class but those of fold f
            folds = np.array_split(order, args.folds)
            halves = [np.sort(np.setdiff1d(order, f)) for f in folds]
            names = [f"xfit_k{args.folds}_f{f}_e{args.xfit_epochs}" for f in range(args.folds)]
        data = None
        for h, cls in enumerate(halves):
            path = CACHE / f"{names[h]}.safetensors"
            if path.is_file():
                mod = TGEM(layers[:-1], L, bb.embed_dim, bb.embed_dim, "cls")
                mod.load_state_dict(load_file(str(path)))
                mod.eval()
            else:
                if data is None:
                    data = tgems.load_dataset("scenes:train", seed=0)
                idx = train_idx[np.isin(ftr.labels.numpy()[train_idx], cls)]
                s = FitSettings(space="cls", epochs=args.xfit_epochs, jumper_fraction=0.02, cross_fit=False, seed=0)
                tt = time.time()
                mod, _, _ = fit_tgem(bb, data.subset(idx), s, templates=templates, feats=ftr.subset(idx), progress=False)
                save_file({k: v.contiguous() for k, v in mod.state_dict().items()}, str(path))
                print(f"cross-fit model {h}: {len(idx)} images, {time.time() - tt:.0f} s", flush=True)
            xfit_logits.append(all_logits(mod.profiles(seen_text, bb).to("cpu"), fj))
            other = train_idx[~np.isin(ftr.labels.numpy()[train_idx], cls)]  # never seen by this model
            fo = ftr.subset(other)
            xother.append((all_logits(mod.profiles(seen_text, bb).to("cpu"), fo), fo.z, remap[fo.labels]))

    def training(data: str, episodic: int):
        sets = []
        if data in ("ship", "ship+xfit"):
            sets += build_sets(lg_ship, fj.z, layers, seen_text, yj, episodic, 11)
        if data in ("xfit", "ship+xfit", "ship+xfit+xother"):
            for h, lg in enumerate(xfit_logits):
                sets += build_sets(lg, fj.z, layers, seen_text, yj, episodic, 12 + h)
        if data == "ship+xfit+xother":
            sets += build_sets(lg_ship, fj.z, layers, seen_text, yj, episodic, 11)
            for h, (lg, z, yo) in enumerate(xother):
                sets += build_sets(lg, z, layers, seen_text, yo, episodic, 12 + len(xother) + h)
        return concat_tables(sets)

    V = {  # name: (data, episodic draws, signals, target, scorer)
        "ship+xfit+xother_conf+desc+z_nl": ("ship+xfit+xother", 0, "conf+desc+z", "nl", lambda: LR(1e-3)),
        "ship+xfit+xother_conf+desc_nl_mlp": ("ship+xfit+xother", 0, "conf+desc", "nl", lambda: MLP()),
        "ship+xfit+xother_conf+desc+z_nl_mlp": ("ship+xfit+xother", 0, "conf+desc+z", "nl", lambda: MLP(hidden=64)),
        "ship_refit": ("ship", 0, "conf+z", "nl", lambda: LRRaw()),
        "conf_nl": ("ship", 0, "conf", "nl", lambda: LR(1e-3)),
        "conf+desc_nl": ("ship", 0, "conf+desc", "nl", lambda: LR(1e-3)),
        "conf+desc_ag": ("ship", 0, "conf+desc", "ag", lambda: LR(1e-3)),
        "conf+desc+z_nl": ("ship", 0, "conf+desc+z", "nl", lambda: LR(1e-3)),
        "epi_conf+z_nl": ("ship", 3, "conf+z", "nl", lambda: LRRaw()),
        "epi_conf+desc_nl": ("ship", 3, "conf+desc", "nl", lambda: LR(1e-3)),
        "epi_conf+desc+z_nl": ("ship", 3, "conf+desc+z", "nl", lambda: LR(1e-3)),
        "xfit_conf+z_nl": ("xfit", 0, "conf+z", "nl", lambda: LRRaw()),
        "xfit_conf_nl": ("xfit", 0, "conf", "nl", lambda: LR(1e-3)),
        "xfit_conf+desc_nl": ("xfit", 0, "conf+desc", "nl", lambda: LR(1e-3)),
        "xfit_conf+desc+z_nl": ("xfit", 0, "conf+desc+z", "nl", lambda: LR(1e-3)),
        "xfit_conf+desc_ag": ("xfit", 0, "conf+desc", "ag", lambda: LR(1e-3)),
        "ship+xfit_conf+z_nl": ("ship+xfit", 0, "conf+z", "nl", lambda: LRRaw()),
        "ship+xfit_conf+desc+z_nl": ("ship+xfit", 0, "conf+desc+z", "nl", lambda: LR(1e-3)),
        "ship+xfit_conf+desc_nl": ("ship+xfit", 0, "conf+desc", "nl", lambda: LR(1e-3)),
        "ship+xfit_epi_conf+desc_nl": ("ship+xfit", 2, "conf+desc", "nl", lambda: LR(1e-3)),
        "xfit_conf+desc+z_nl_l2": ("xfit", 0, "conf+desc+z", "nl", lambda: LR(1e-2)),
        "xfit_conf+desc_nl_mlp": ("xfit", 0, "conf+desc", "nl", lambda: MLP()),
        "ship+xfit_conf+desc_nl_mlp": ("ship+xfit", 0, "conf+desc", "nl", lambda: MLP()),
        "ship+xfit_epi_conf+desc_nl_mlp": ("ship+xfit", 2, "conf+desc", "nl", lambda: MLP()),
    }
    names = list(V) if args.variants == "all" else args.variants.split(",")
    if not need_x:
        names = [n for n in names if "xfit" not in V[n][0]]

    # baseline: a checkpoint's budget model on the library's signal layout (conf, z_l, the 3 label-set signals)
    jb = load_tgem(args.baseline, bb)[1].for_goal("budget")
    lib = lambda tab: torch.cat([tab["conf"], tab["z"], tab["desc"][..., :3]], -1)
    s_ship_t, s_ship_c = jb.scores(lib(tab_t)), jb.scores(lib(tab_c))
    no_loss = (lp[:, :-1] == y[:, None]) | (full != y)[:, None]

    results, aucs = [], []
    ship_pred = {}

    def evaluate(name, st, sc, extra=None):
        row_auc = {"variant": name}
        for s, m in masks.items():
            row_auc[s] = [round(auc(st[m, j].numpy(), no_loss[m, j].numpy()) or float("nan"), 3)
                          for j in range(len(layers) - 1)]
        aucs.append(row_auc)
        for b in BUDGETS:
            tau = calibrate_budget(sc, clp, layers, L, b, cal_labels)
            p, d = simulate(st, lp, layers, tau)
            if name == "shipped":
                ship_pred[b] = p
            for s, m in masks.items():
                dm = float(d[m].float().mean())
                ok = (p[m] == y[m]).float()
                vs, se = paired(ok, static_mix(correct[m], layers, dm))
                r = {"variant": name, "budget": b, "split": s, "accuracy": round(float(ok.mean()), 5),
                     "agreement": round(float((p[m] == full[m]).float().mean()), 5), "mean_layers": round(dm, 4),
                     "static_same_depth": round(static_at(correct[m], layers, dm), 5), "vs_static": vs,
                     "vs_static_se": se, "tau": round(tau, 5)}
                if name != "shipped":
                    r["vs_shipped"], r["vs_shipped_se"] = paired(ok, (ship_pred[b][m] == y[m]).float())
                results.append({**r, **(extra or {})})

    evaluate("shipped", s_ship_t, s_ship_c)
    for name in names:
        data, epi, sig, tgt, mk = V[name]
        tt = time.time()
        tab, ylab = training(data, epi)
        model = mk().fit(pick(tab, sig), targets(tab["preds"], ylab, tgt))
        evaluate(name, model(pick(tab_t, sig)), model(pick(tab_c, sig)),
                 {"data": data, "episodic": epi, "signals": sig, "target": tgt})
        print(f"{name}: {time.time() - tt:.0f} s", flush=True)

    print(f"\n{'variant':<32}{'split':<8}" + "".join(f"{b:>22}" for b in BUDGETS))
    print(f"{'':<40}" + "".join(f"{'acc  vs static  vs ship':>22}" for _ in BUDGETS))
    for name in ["shipped"] + names:
        for s in SPLITS:
            line = f"{name:<32}{s:<8}"
            for b in BUDGETS:
                r = next(r for r in results if r["variant"] == name and r["split"] == s and r["budget"] == b)
                vsh = f"{100 * r['vs_shipped']:+.1f}±{100 * r['vs_shipped_se']:.1f}" if "vs_shipped" in r else ""
                line += f"{100 * r['accuracy']:.1f} {100 * r['vs_static']:+.1f}±{100 * r['vs_static_se']:.1f} {vsh}".rjust(22)
            print(line)
    print("\nper-layer no-loss AUC (layers 1..11)")
    for r in aucs:
        for s in SPLITS:
            print(f"{r['variant']:<32}{s:<8}" + " ".join(f"{v:.2f}" for v in r[s]))
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.json:
        write_json(args.json, {"test": "scenes:testall", "calib": "scenes:calib", "seed": args.seed,
                               "tgem": "embedded:cls", "baseline": args.baseline, "budgets": list(BUDGETS), "layers": layers,
                               "xfit_epochs": args.xfit_epochs, "folds": args.folds, "results": results, "auc": aucs,
                               "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
