"""Cross-modal retrieval with early exits: an image index built with fewer encoder layers.

No label set exists when a collection is indexed, so the exit rule is label-free (reading (b) of
issue 14): at each candidate layer l a small map M_l turns the readout z_l (and the mean-patch
readout m_l beside it, in maps fit since issue 27) into an estimate zhat_l of the image's *final*
CLIP embedding z_L, and a per-layer scorer (a `Jumper`: one logistic model per layer) estimates
cos(zhat_l, z_L) from cheap signals. An image leaves at the first layer
whose estimate reaches tau and the index stores zhat_l there (z_L itself for images that run to the
end), so the whole index lives in CLIP's own joint space and is searched with CLIP's own text
embeddings. tau is calibrated for a budget (mean executed layers / L) or, with Learn-then-Test and
Clopper-Pearson bounds (`tgems.jumper.calibrate_max_drop`), for a guarantee: the share of images
whose full-CLIP best text (among reference texts) falls out of the index's top `rank` texts is
<= eps with probability >= 1 - delta. tau = 2 never exits, so that index equals full CLIP exactly.

The index runs on the engine (`tgems.engine.run_early_exit`), so the compute saving is real. This
module is inference only; the maps and the scorer are trained by `tgems.training.index_fit`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tgems.artifacts as artifacts
from tgems.engine import run_early_exit
from tgems.errors import TGEMError
from tgems.jumper import Jumper
from tgems.readouts import map_input, reads_patch

from tgems.calibration import NEVER_EXIT as NEVER
from tgems.calibration import calibrate_max_drop, first_exit, simulate, tau_grid
from tgems.options import DELTA

INDEX_FILES = (artifacts.INDEX.config, artifacts.INDEX.tensors)
MODEL_FORMAT = 2  # 2: the maps may read the mean-patch readouts (header "patch"); format 1 loads as maps of z_l
INDEX_FORMAT = 1
NUM_INDEX_SIGNALS = 3  # scalar signals before the unit estimate zhat_l


def embedded_index_model_dir() -> Path:
    """The retrieval maps shipped for the embedded backbone (`tgems.training.index_fit`, seed 0)."""
    from tgems.pretrained import EMBEDDED_RETRIEVAL

    return EMBEDDED_RETRIEVAL


# ------------------------------------------------------------------ maps z_l -> estimate of z_L


class IndexMaps(nn.Module):
    """M_l for each candidate layer: unit z_l (and, with `patch`, the unit mean-patch readout m_l beside it, as
    the distilled readouts of `tgems.readouts` read it) -> unit estimate of the unit final embedding z_L.

    A linear map (initialised to the identity on z_l: the plain readout) plus a residual MLP (initialised
    to zero), stacked over layers so training runs every layer in one einsum."""

    def __init__(self, layers, num_layers: int, dim: int, hidden: int = 256, patch: bool = False):
        super().__init__()
        self.layers, self.num_layers, self.dim, self.hidden = list(layers), num_layers, dim, hidden
        n, d_in = len(self.layers), 2 * dim if patch else dim
        self.lin = nn.Parameter(torch.eye(d_in, dim).repeat(n, 1, 1))
        self.w1 = nn.Parameter(torch.randn(n, d_in, hidden) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.zeros(n, hidden))
        self.w2 = nn.Parameter(torch.zeros(n, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(n, dim))

    @property
    def patch(self) -> bool:
        """Whether the maps read the mean-patch readout beside z_l (their input is then 2 D wide)."""
        return reads_patch(self.lin)

    @property
    def dim_in(self) -> int:
        return self.lin.shape[-2]

    def inputs(self, z: torch.Tensor, patch: torch.Tensor | None) -> torch.Tensor:
        """What the maps read: as the distilled readouts (`tgems.readouts.map_input`)."""
        return map_input(z, patch, self.lin, "retrieval maps")

    def one(self, j: int, z: torch.Tensor, patch: torch.Tensor | None = None) -> torch.Tensor:
        """Estimate at candidate index j; z (and patch): (B, D) raw readouts."""
        u = self.inputs(z, patch)
        y = u @ self.lin[j] + F.gelu(u @ self.w1[j] + self.b1[j]) @ self.w2[j] + self.b2[j]
        return F.normalize(y, dim=-1)

    def estimates(self, z: torch.Tensor, patch: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L, D) cached readouts (and mean-patch readouts, for maps that read them) -> (N, n, D) unit estimates
        at the candidate layers, without gradients."""
        cand = [l - 1 for l in self.layers]
        with torch.no_grad():
            return self.all(z[:, cand], None if patch is None else patch[:, cand])

    def all(self, z: torch.Tensor, patch: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, D) readouts (and mean-patch readouts) of the candidate layers -> (B, n, D) unit estimates."""
        u = self.inputs(z, patch)
        h = F.gelu(torch.einsum("bnd,ndh->bnh", u, self.w1) + self.b1)
        y = torch.einsum("bnd,nde->bne", u, self.lin) + torch.einsum("bnh,nhd->bnd", h, self.w2) + self.b2
        return F.normalize(y, dim=-1)

    def flops(self) -> float:
        """Per row and candidate layer: the linear map, the MLP and the normalisations (the mean-patch readout
        itself is the backbone's, counted by `IndexModel.head_flops`)."""
        return float(2 * self.dim_in * self.dim + 2 * self.dim_in * self.hidden + 2 * self.hidden * self.dim
                     + 3 * self.dim_in + 3 * self.dim)


def index_signals(zhat: torch.Tensor, prev_zhat: torch.Tensor | None, z: torch.Tensor,
                  prev_z: torch.Tensor | None) -> torch.Tensor:
    """(B, NUM_INDEX_SIGNALS + D): cos of the estimate with the previous candidate's estimate (does it
    still move?), cos of the estimate with the plain readout, cos of the readout with the previous one;
    then the unit estimate itself (which kinds of image are settled early). No label, no text."""
    u = F.normalize(z.float(), dim=-1)
    if prev_zhat is None:
        moved = torch.zeros(len(z), device=z.device)
        moved_z = torch.zeros(len(z), device=z.device)
    else:
        moved = (zhat * prev_zhat).sum(-1)
        moved_z = (u * F.normalize(prev_z.float(), dim=-1)).sum(-1)
    return torch.cat([torch.stack([moved, (zhat * u).sum(-1), moved_z], 1), zhat], 1)


def layer_signals(layers: list[int], z: torch.Tensor, est: torch.Tensor):
    """(j, (N, S) `index_signals`) at each candidate layer j, from (N, L, D) cached readouts and the (N, n, D)
    estimates: what the scorer reads, on cached data as the engine reads it row by row."""
    prev, prev_z = None, None
    for j, l in enumerate(layers):
        zl = z[:, l - 1]
        yield j, index_signals(est[:, j], prev, zl, prev_z)
        prev, prev_z = est[:, j], zl


@dataclass
class IndexModel:
    """The trained parts of the label-free exit rule: maps, scorer and the backbone they belong to."""

    maps: IndexMaps
    scorer: Jumper
    fingerprint: str
    config: dict

    @property
    def layers(self) -> list[int]:
        return self.maps.layers

    @property
    def reads_patch(self) -> bool:
        return self.maps.patch

    def head_flops(self) -> float:
        """Per row and candidate layer: the map, the scorer and, where the maps read it, the backbone's
        mean-patch readout (config["patch_flops"], set at fit time from the backbone)."""
        return (self.maps.flops() + 2.0 * (NUM_INDEX_SIGNALS + self.maps.dim) + 4.0 * self.maps.dim
                + (float(self.config.get("patch_flops", 0.0)) if self.maps.patch else 0.0))

    def to(self, device) -> "IndexModel":
        self.maps.to(device)
        self.scorer = Jumper(self.scorer.weight.to(device=device, dtype=torch.float32),
                             self.scorer.bias.to(device=device, dtype=torch.float32), self.scorer.tau)
        return self

    def state(self) -> dict:
        out = {f"maps.{k}": v.detach().contiguous().cpu() for k, v in self.maps.state_dict().items()}
        out.update({"scorer.weight": self.scorer.weight.contiguous().cpu(),
                    "scorer.bias": self.scorer.bias.contiguous().cpu()})
        return out

    def header(self) -> dict:
        return {"layers": self.layers, "num_layers": self.maps.num_layers, "dim": self.maps.dim,
                "hidden": self.maps.hidden, "patch": self.maps.patch, "fingerprint": self.fingerprint, **self.config}

    @classmethod
    def from_state(cls, header: dict, tensors: dict, where: str) -> "IndexModel":
        try:
            maps = IndexMaps(header["layers"], header["num_layers"], header["dim"], header["hidden"],
                             bool(header.get("patch", False)))
            maps.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("maps.")})
            scorer = Jumper(tensors["scorer.weight"].float(), tensors["scorer.bias"].float())
            if scorer.weight.shape != (len(maps.layers), NUM_INDEX_SIGNALS + maps.dim):
                raise ValueError(f"scorer weights of shape {tuple(scorer.weight.shape)}")
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise TGEMError(f"{where} is corrupted: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        maps.eval()
        config = {k: v for k, v in header.items()
                  if k not in ("layers", "num_layers", "dim", "hidden", "patch", "fingerprint")}
        return cls(maps, scorer, header.get("fingerprint", ""), config)

    # ---- on cached features (what calibration and the benchmark use; the engine decides identically)

    def layer_estimates(self, z: torch.Tensor, patch: torch.Tensor | None = None) -> torch.Tensor:
        """z (and patch, for maps that read it): (N, L, D) cached readouts -> (N, n + 1, D) unit estimates at each
        candidate layer, then z_L."""
        est = self.maps.estimates(z, patch)
        return torch.cat([est, F.normalize(z[:, -1].float(), dim=-1)[:, None]], 1)

    def layer_scores(self, z: torch.Tensor, est: torch.Tensor | None = None,
                     patch: torch.Tensor | None = None) -> torch.Tensor:
        """(N, n) scorer outputs (estimated cos(zhat_l, z_L)) at each candidate layer."""
        est = self.layer_estimates(z, patch) if est is None else est
        return torch.stack([self.scorer.score(j, sig) for j, sig in layer_signals(self.layers, z, est)], 1)

    def simulate(self, z: torch.Tensor, tau: float, patch: torch.Tensor | None = None):
        """(embeddings (N, D), exit layers (N,)) that the engine would produce for these cached readouts."""
        est = self.layer_estimates(z, patch)
        scores = self.layer_scores(z, est)
        e = first_exit(scores, tau)
        depth = torch.as_tensor(self.layers + [self.maps.num_layers], dtype=torch.long)[e]
        return est[torch.arange(len(z)), e], depth


def _read(path, kind) -> tuple[dict, dict]:
    """(header, tensors) of a retrieval model or an index (`tgems.artifacts`: one line naming a damaged file)."""
    header = artifacts.read_config(path, kind, required=("sha256",))
    tensors = artifacts.read_tensors(path, kind, header)
    header.pop("sha256", None)
    return header, tensors


def _check_fingerprint(header: dict, backbone, path, what: str) -> None:
    if header.get("fingerprint") != backbone.fingerprint():
        hint = (f"; fit maps for it with `tgems index-fit --model {backbone.name} --data SPEC --out DIR` and "
                f"pass --tgem DIR" if what == "retrieval model" else "")
        raise TGEMError(f"{what} {path} was made for another backbone ('{header.get('backbone')}', fingerprint "
                        f"{str(header.get('fingerprint'))[:12]}), not for '{backbone.name}' "
                        f"(fingerprint {backbone.fingerprint()[:12]}){hint}")


SHIPPED_NAMES = ("embedded", "embedded:retrieval")


def resolve_index_model(path) -> Path:
    """'embedded' or 'embedded:retrieval' names the shipped maps of the embedded backbone; else a directory."""
    return embedded_index_model_dir() if str(path) in SHIPPED_NAMES else Path(path).expanduser()


def load_index_model(path, backbone) -> IndexModel:
    """Load maps + scorer written by `tgems.training.index_fit.save_index_model`, refusing another backbone's."""
    path = resolve_index_model(path)
    header, tensors = _read(path, artifacts.RETRIEVAL)
    _check_fingerprint(header, backbone, path, "retrieval model")
    return IndexModel.from_state(header, tensors, str(path / artifacts.RETRIEVAL.tensors)).to(backbone.device)


def write_index_model(path, model: IndexModel, backbone, info: dict | None = None) -> Path:
    """Atomic write of a retrieval model (maps + scorer) directory."""
    header = {"format": MODEL_FORMAT, "backbone": backbone.name, **model.header(), **(info or {})}
    header["fingerprint"] = backbone.fingerprint()
    return artifacts.write(path, artifacts.RETRIEVAL, header, model.state())


# ------------------------------------------------------------------ engine policy


class IndexPolicy:
    """Engine exit policy: estimate z_L with M_l, exit where the scorer's estimate of cos(zhat_l, z_L)
    reaches tau; the outputs kept for exiting rows are the stored unit embeddings."""

    needs_rates = False

    def __init__(self, model: IndexModel, tau: float):
        self.model, self.tau = model, float(tau)
        self.needs_patch = model.reads_patch
        self.candidate_layers = list(model.layers)
        self.head_flops = model.head_flops()
        self._index = {l: j for j, l in enumerate(model.layers)}

    def start(self, n: int):
        self.n, self.prev_est, self.prev_z = n, None, None

    def decide(self, layer, z, rows, patch=None):
        if layer not in self._index:  # the last layer: CLIP's own embedding
            return torch.ones(len(rows), dtype=torch.bool, device=z.device), F.normalize(z.float(), dim=-1)
        j = self._index[layer]
        est = self.model.maps.one(j, z, patch)
        if self.prev_est is None:  # state lives where the inputs live
            self.prev_est = torch.zeros(self.n, est.shape[1], device=z.device)
            self.prev_z = torch.zeros(self.n, z.shape[1], device=z.device)
        first = j == 0
        sig = index_signals(est, None if first else self.prev_est[rows], z, None if first else self.prev_z[rows])
        self.prev_est[rows] = est
        self.prev_z[rows] = z.float()
        return self.model.scorer.score(j, sig) >= self.tau, est


# ------------------------------------------------------------------ calibration


def reference_texts(data) -> list[str]:
    """Texts the guarantee is stated over: the data's class texts and distinct captions."""
    texts = list(getattr(data, "classes", None) or [])
    if getattr(data, "captions", None):
        texts += sorted(set(data.captions) - set(texts))
    if not texts:
        raise TGEMError("calibrating a max_drop index needs reference texts (class names or captions)")
    return texts


def rank_failures(est: torch.Tensor, text: torch.Tensor, rank: int = 1) -> torch.Tensor:
    """(N, n + 1) 0/1: the full model's best text (est[:, -1]) is not among the top `rank` texts of the
    estimate at that candidate; the last column is 0 by construction."""
    full_best = (est[:, -1] @ text.t()).argmax(-1)
    out = []
    for j in range(est.shape[1]):
        s = est[:, j] @ text.t()
        best_score = s.gather(1, full_best[:, None])
        out.append(((s > best_score).sum(1) >= rank).long())
    return torch.stack(out, 1)


def calibrate_index(model: IndexModel, z: torch.Tensor, budget: float | None = None, max_drop: float | None = None,
                    delta: float = DELTA, text: torch.Tensor | None = None, rank: int = 1,
                    patch: torch.Tensor | None = None) -> tuple[float, dict]:
    """tau for a budget (mean executed layers / L <= budget, best mean cos(stored, z_L) under it: label-free)
    or for max_drop = eps: the share of images whose full-CLIP best reference text (rows of `text`, unit) is
    not in the index's top `rank` stays <= eps with probability >= 1 - delta (Learn-then-Test, as
    `tgems.jumper.calibrate_max_drop`). z (and patch, for maps that read it): (N, L, D) cached readouts of
    calibration images."""
    if (budget is None) == (max_drop is None):
        raise TGEMError("calibrate needs exactly one of budget= or max_drop=")
    L = model.maps.num_layers
    layers = model.layers + [L]
    est = model.layer_estimates(z, patch)
    scores = model.layer_scores(z, est)
    if budget is not None:
        if not 0 < budget <= 1:
            raise TGEMError(f"budget must lie in (0, 1], got {budget}")
        cos = (est * est[:, -1:]).sum(-1)  # (N, n + 1), 1 at the last layer
        tau, best = NEVER, -1.0
        if budget < 1:  # budget 1: never exit, exactly full CLIP
            for t in tau_grid(scores):
                c, depth = simulate(scores, cos, layers, float(t))
                if depth.double().mean().item() / L <= budget + 1e-9 and c.mean().item() > best + 1e-12:
                    best, tau = c.mean().item(), float(t)
            if best < 0:
                tau = 0.0
        info = {"goal": "budget", "budget": budget}
    else:
        if not (0 < max_drop < 1 and 0 < delta < 1):
            raise TGEMError("max_drop and delta must lie in (0, 1)")
        if text is None:
            raise TGEMError("a max_drop calibration needs reference text embeddings")
        if rank < 1:
            raise TGEMError(f"rank must be >= 1, got {rank}")
        fails = rank_failures(est, F.normalize(text.float(), dim=-1), rank)
        tau, info = calibrate_max_drop(scores, fails, layers, max_drop, delta)
        info = {"goal": "max_drop", "max_drop": max_drop, "delta": delta, "rank": rank,
                "reference_texts": len(text), **info}
    emb, depth = _simulate_scores(est, scores, layers, tau)
    info.update(tau=tau, calib_images=len(z), calib_mean_layers=float(depth.double().mean()),
                calib_mean_cos=float((emb * est[:, -1]).sum(-1).mean()))
    return tau, info


def _simulate_scores(est, scores, layers, tau):
    e = first_exit(scores, tau)
    return est[torch.arange(len(est)), e], torch.as_tensor(layers, dtype=torch.long)[e]


# ------------------------------------------------------------------ the index


@dataclass
class Hit:
    id: str
    index: int
    score: float
    exit_layer: int


def _model_and_tau(backbone, model, tau):
    if not isinstance(model, IndexModel):
        model = load_index_model(model, backbone)
    elif model.fingerprint != backbone.fingerprint():
        raise TGEMError("this retrieval model was made for another backbone")
    model.to(backbone.device)
    return model, float(model.config.get("tau", NEVER) if tau is None else tau)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise TGEMError(f"k must be a positive integer, got {k!r}")
    return int(k)


class EarlyExitIndex:
    """An image index in CLIP's joint space whose images were encoded with early exit.

    Stores each image's unit embedding, exit layer and encoder FLOPs; searched by text (CLIP's text
    tower) or by image (the query image runs the full encoder: one image, exact)."""

    def __init__(self, backbone, model: IndexModel, tau: float, embeddings, exit_layers, flops, ids,
                 calibration: dict | None = None, meta: dict | None = None):
        self.backbone, self.model, self.tau = backbone, model, float(tau)
        self.embeddings = embeddings.float()
        self.exit_layers = torch.as_tensor(exit_layers, dtype=torch.long).cpu()
        self.flops = torch.as_tensor(flops, dtype=torch.float64).cpu()
        self.ids = [str(i) for i in ids]
        self.calibration = dict(calibration or {})
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def mean_layers(self) -> float:
        return float(self.exit_layers.double().mean())

    @property
    def flops_ratio(self) -> float:
        from tgems.engine import full_flops

        return float(self.flops.mean()) / full_flops(self.backbone)  # an embedding: no labels scored

    @classmethod
    def build(cls, backbone, images, model: IndexModel | str = "embedded", tau: float | None = None,
              ids=None, calibration: dict | None = None, batch_size: int = 256, progress: bool = False,
              meta: dict | None = None) -> "EarlyExitIndex":
        """Encode `images` (a Dataset, PIL images, a uint8 array or pixels) with early exit on the engine.
        tau None: the threshold in the model file (its default budget); `calibrate_index` gives others."""
        from tqdm.auto import tqdm

        model, tau = _model_and_tau(backbone, model, tau)
        data = images
        if hasattr(images, "labels") and hasattr(images, "images"):  # a Dataset
            ids = ids if ids is not None else [f"{data.name}:{i}" for i in range(len(data))]
            images = data.images
        n = len(images)
        if n == 0:
            raise TGEMError("no images given")
        ids = [str(i) for i in (ids if ids is not None else range(n))]
        if len(ids) != n or len(set(ids)) != n:
            raise TGEMError(f"ids must be {n} distinct values, got {len(ids)} ({len(set(ids))} distinct)")
        embs, layers, flops = [], [], []
        for s in tqdm(range(0, n, batch_size), desc="index", disable=not progress, leave=False):
            chunk = images[s:s + batch_size]
            pixels = chunk if isinstance(chunk, torch.Tensor) else backbone.preprocess(chunk)
            res = run_early_exit(backbone, pixels, IndexPolicy(model, tau))
            embs.append(res.outputs.float())
            layers.append(res.exit_layers)
            flops.append(res.flops)
        return cls(backbone, model, tau, torch.cat(embs), torch.cat(layers), torch.cat(flops), ids,
                   calibration, meta)

    @classmethod
    def build_stream(cls, backbone, source, model: IndexModel | str = "embedded", tau: float | None = None,
                     n: int | None = None, calibration: dict | None = None, meta: dict | None = None,
                     workers: int | None = None, chunk_size: int = 256, progress: bool = False) -> "EarlyExitIndex":
        """Index a streaming source (`tgems.jobs.sources.open_source`: a folder of any layout, webdataset
        shards, parquet) chunk by chunk, so the images are never all in memory. Ids are the source's (a
        folder's relative paths, sample keys, the id column). An image that cannot be read or prepared
        is listed in meta["skipped"] ({id, reason}) and left out; the first `n` items when `n` is given.
        `workers`: decoding processes (None: `stream_chunks`' default)."""
        from tqdm.auto import tqdm

        from tgems.jobs.readers import stream_chunks

        model, tau = _model_and_tau(backbone, model, tau)
        embs, layers, flops, ids, skipped, seen = [], [], [], [], [], 0
        bar = tqdm(total=source.num_items if n is None else n, desc="index", disable=not progress, leave=False)
        decoding = {} if workers is None else {"workers": workers}
        for chunk in stream_chunks(source, chunk_size=chunk_size, **decoding):
            items = chunk.items if n is None else chunk.items[:max(0, n - seen)]
            seen += len(items)
            good, pixels = [], []
            for it in items:
                try:
                    if it.error is not None:
                        raise TGEMError(it.error)
                    pixels.append(backbone.preprocess([it.image]))
                    good.append(it.id)
                except TGEMError as e:
                    skipped.append({"id": it.id, "reason": str(e)})
            if pixels:
                res = run_early_exit(backbone, torch.cat(pixels), IndexPolicy(model, tau))
                embs.append(res.outputs.float())
                layers.append(res.exit_layers)
                flops.append(res.flops)
                ids += good
            bar.update(len(items))
            if n is not None and seen >= n:
                break
        bar.close()
        if not ids:
            raise TGEMError(f"{source.spec}: no readable image to index ({len(skipped)} unreadable"
                            + (f", e.g. {skipped[0]['id']}: {skipped[0]['reason']})" if skipped else ")"))
        dup = len(ids) - len(set(ids))
        if dup:
            raise TGEMError(f"{source.spec}: {dup} image ids occur more than once (ids must be distinct)")
        meta = {**(meta or {}), "source": {"kind": source.kind, "root": source.root}, "skipped": skipped}
        return cls(backbone, model, tau, torch.cat(embs), torch.cat(layers), torch.cat(flops), ids,
                   calibration, meta)

    def path_of(self, id: str) -> str | None:
        """The file behind an id of an index built from a folder (None for other sources)."""
        src = self.meta.get("source") or {}
        return os.path.join(src["root"], id) if src.get("kind") == "folder" else None

    # ---- search

    def _top(self, q: torch.Tensor, k: int) -> list[list[Hit]]:
        scores = F.normalize(q.float(), dim=-1).to(self.embeddings.device) @ self.embeddings.t()
        k = min(k, len(self))
        # a stable sort: equal scores come back in index order, whatever the platform's topk does
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].cpu()
        s = scores.cpu()
        return [[Hit(self.ids[i], int(i), float(s[r, i]), int(self.exit_layers[i])) for i in row.tolist()]
                for r, row in enumerate(order)]

    def search_text(self, query, k: int = 10):
        """Top-k images for a text (a list of hits) or for each of a list of texts (a list of lists)."""
        k = _check_k(k)
        single = isinstance(query, str)
        texts = [query] if single else list(query) if isinstance(query, (list, tuple)) else None
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise TGEMError("the query is empty: give a non-empty text")
        from tgems.profiles import check_readable_query

        for t in texts:
            check_readable_query(self.backbone, t)
        hits = self._top(self.backbone.encode_text(texts), k)
        return hits[0] if single else hits

    def search_image(self, image, k: int = 10):
        """Top-k images for one query image (PIL, uint8 array or path), encoded by the full encoder."""
        k = _check_k(k)
        if isinstance(image, (str, os.PathLike)):
            image = _open_image(image)
        if image is None:
            raise TGEMError("the query is empty: give an image")
        pixels = image if isinstance(image, torch.Tensor) else self.backbone.preprocess([image])
        return self._top(self.backbone.encode_image(pixels), k)[0]

    # ---- persistence

    def save(self, path) -> Path:
        header = {"format": INDEX_FORMAT, "backbone": self.backbone.name, "fingerprint": self.backbone.fingerprint(),
                  "tau": self.tau, "size": len(self), "dim": int(self.embeddings.shape[1]), "ids": self.ids,
                  "mean_layers": self.mean_layers, "flops_ratio": self.flops_ratio,
                  "calibration": self.calibration, "meta": self.meta, "model": self.model.header()}
        tensors = {"embeddings": self.embeddings, "exit_layers": self.exit_layers, "flops": self.flops,
                   **{f"model.{k}": v for k, v in self.model.state().items()}}
        return artifacts.write(path, artifacts.INDEX, header, tensors)

    @classmethod
    def load(cls, path, backbone) -> "EarlyExitIndex":
        """Load an index, refusing another backbone's and any file that is corrupted."""
        header, tensors = _read(path, artifacts.INDEX)
        _check_fingerprint(header, backbone, path, "index")
        where = str(Path(path) / artifacts.INDEX.tensors)
        try:
            emb, layers, flops = tensors["embeddings"], tensors["exit_layers"], tensors["flops"]
            ids, n = header["ids"], header["size"]
            if not (emb.ndim == 2 and len(emb) == len(layers) == len(flops) == len(ids) == n
                    and emb.shape[1] == backbone.embed_dim):
                raise ValueError("inconsistent sizes")
            model = IndexModel.from_state(header["model"], {k[6:]: v for k, v in tensors.items()
                                                           if k.startswith("model.")}, where)
        except (KeyError, ValueError, TypeError) as e:
            raise TGEMError(f"{where} is damaged: {str(e).splitlines()[0]}") from None
        return cls(backbone, model.to(backbone.device), header.get("tau", NEVER), emb.to(backbone.device),
                   layers, flops, ids, header.get("calibration"), header.get("meta"))


def _open_image(path):
    from tgems.data.folder import read_image

    return read_image(path)
