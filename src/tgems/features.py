"""Per-layer feature cache: one backbone pass per image, then training and sweeps touch only this.

In memory (`LayerFeatures`, from `extract_features`) or on disk (`FeatureCache`: float16 shards read
through memory maps, written by `tgems.training.feature_cache`). Both give row batches by index
(`take`, `final_z`), so training reads either the same way.
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tgems.data.dataset import Dataset

# Activation rates are cached at this precision (memory); exit policies that score rates round them the
# same way, so the engine decides exactly as the simulation on cached features.
RATES_DTYPE = torch.float16


@dataclass
class LayerFeatures:
    """z: (N, L, D) readouts z_l for l = 1..L; rates: (N, L, M) MLP activation rates or None; labels index
    `classes` (the dataset's class texts, so calibration can match them to a label set by text); patch:
    (N, L, D) mean-patch readouts m_l (what distilled readouts read beside z_l) or None."""

    z: torch.Tensor
    rates: torch.Tensor | None
    labels: torch.Tensor
    difficulty: np.ndarray | None = None
    classes: list[str] | None = None
    patch: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.z.shape[0]

    def subset(self, idx) -> "LayerFeatures":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return LayerFeatures(self.z[idx], None if self.rates is None else self.rates[idx], self.labels[idx],
                             None if self.difficulty is None else self.difficulty[idx.numpy()], self.classes,
                             None if self.patch is None else self.patch[idx])

    def take(self, idx, space: str, layers) -> torch.Tensor:
        """(B, n, F) float32 features of rows `idx` at `layers` (1-based) in one profile space."""
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        cols = [l - 1 for l in layers]
        if space == "cls":
            return self.z[idx][:, cols].float()
        if space == "patch":
            return self._patch()[idx][:, cols].float()
        return self._rates()[idx][:, cols].float()

    def final_z(self, idx) -> torch.Tensor:
        """(B, D) float32 readouts of the last layer."""
        return self.z[torch.as_tensor(np.asarray(idx), dtype=torch.long), -1].float()

    def _patch(self) -> torch.Tensor:
        if self.patch is None:
            from tgems.errors import TGEMError

            raise TGEMError("these features were extracted without mean-patch readouts")
        return self.patch

    def _rates(self) -> torch.Tensor:
        if self.rates is None:
            from tgems.errors import TGEMError

            raise TGEMError("these features were extracted without activation rates")
        return self.rates

    def space(self, name: str) -> torch.Tensor:
        """The features of one profile space, float32 (N, L, F)."""
        if name == "cls":
            return self.z
        if name == "patch":
            return self._patch()
        if self.rates is None:
            from tgems.errors import TGEMError

            raise TGEMError("these features were extracted without activation rates")
        return self.rates.float()


def extract_features(backbone, data: Dataset, rates: bool = False, batch_size: int = 256,
                     progress: bool = True, desc: str = "features") -> LayerFeatures:
    """Every layer's readouts of `data`, with the mean-patch readouts (cheap beside the blocks) and, when
    asked, the activation rates."""
    zs, rs, ms = [], [], []
    for start in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress, leave=False):
        out = backbone.hidden_states(backbone.preprocess(data.images[start:start + batch_size]), rates=rates,
                                     patch=True)
        zs.append(out["z"].float().cpu())
        ms.append(out["patch"].float().cpu())
        if rates:
            rs.append(out["rates"].to(RATES_DTYPE).cpu())
    return LayerFeatures(z=torch.cat(zs), rates=torch.cat(rs) if rates else None,
                         labels=torch.as_tensor(data.labels, dtype=torch.long),
                         difficulty=data.difficulty, classes=list(data.classes), patch=torch.cat(ms))


# ------------------------------------------------------------------------------- on disk

CACHE_FORMAT = 1
CACHE_KIND = "tgems-feature-cache"
MANIFEST = "manifest.json"


def shard_file(root, index: int, what: str) -> Path:
    """The file of one cache shard: what is z, rates, text, label, key (.npy) or json."""
    return Path(root) / (f"{index:06d}.json" if what == "json" else f"{index:06d}.{what}.npy")


def read_manifest(root) -> dict | None:
    """A cache's manifest, None when there is none; a damaged one is an error."""
    from tgems.errors import TGEMError

    f = Path(root) / MANIFEST
    if not f.is_file():
        return None
    try:
        out = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise TGEMError(f"cannot read {f}: {e}") from None
    if not isinstance(out, dict):
        raise TGEMError(f"{f} is damaged (not a JSON object)")
    return out


class FeatureCache:
    """A feature cache on disk, read in row batches from memory maps (see tgems.training.feature_cache).

    Rows are numbered through the shards in order. `labels` (N,) index `classes` (the sorted label names;
    -1: no label); `has_caption` (N,) says which rows have a caption embedding. The pages of a shard are
    handed back to the kernel as soon as its rows are read (they stay in the page cache), so the process's
    memory does not grow with the size of the cache."""

    def __init__(self, root: Path, manifest: dict, metas: list, maps: dict):
        self.root, self.manifest, self.metas, self.maps = root, manifest, metas, maps
        sizes = np.array([m["n"] for m in metas], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.n = int(sizes.sum())
        self.classes = sorted({c for m in metas for c in m["label_names"]})
        pos = {c: i for i, c in enumerate(self.classes)}
        labels = np.full(self.n, -1, dtype=np.int64)
        for k, m in enumerate(metas):
            if m["n"]:
                local = np.asarray(maps["label"][k], dtype=np.int64)
                table = np.array([pos[c] for c in m["label_names"]] + [-1], dtype=np.int64)
                labels[self.starts[k]:self.starts[k] + m["n"]] = table[local]
        self.labels = labels
        self.has_caption = self._gather("key", np.arange(self.n)) != 0 if self.n else np.zeros(0, bool)
        self.num_layers = int(maps["z"][next(k for k, m in enumerate(metas) if m["n"])].shape[1]) if self.n else 0

    def __len__(self) -> int:
        return self.n

    @property
    def has_rates(self) -> bool:
        return bool(self.manifest["settings"]["rates"])

    @classmethod
    def open(cls, root, backbone=None, need_rates: bool = False) -> "FeatureCache":
        """Open a complete cache; refuse one made for another backbone, or without rates when they are needed."""
        from tgems.errors import TGEMError

        root = Path(root).expanduser()
        man = read_manifest(root)
        if man is None or man.get("kind") != CACHE_KIND:
            raise TGEMError(f"{root} is not a tgems feature cache (no {MANIFEST})")
        if man.get("format") != CACHE_FORMAT:
            raise TGEMError(f"feature cache {root} has format {man.get('format')}; this tgems reads {CACHE_FORMAT}")
        if backbone is not None and man.get("fingerprint") != backbone.fingerprint():
            raise TGEMError(f"feature cache {root} was made for another backbone ('{man.get('backbone')}', "
                            f"fingerprint {str(man.get('fingerprint'))[:12]}), not for '{backbone.name}' "
                            f"(fingerprint {backbone.fingerprint()[:12]})")
        if not man.get("complete"):
            raise TGEMError(f"feature cache {root} is incomplete (an extraction was stopped): rerun the fit "
                            f"with the same --data to finish it")
        if need_rates and not man["settings"]["rates"]:
            raise TGEMError(f"feature cache {root} holds no activation rates (made for a cls fit)")
        whats = (["z", "text", "label", "key"] + (["rates"] if man["settings"]["rates"] else [])
                 + (["patch"] if man["settings"].get("patch") else []))
        metas, maps = [], {w: [] for w in whats}
        for i in man.get("shards_used", []):
            f = shard_file(root, i, "json")
            try:
                meta = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise TGEMError(f"feature cache {root}: cannot read {f.name}: {e}") from None
            metas.append({k: meta[k] for k in ("index", "input", "n", "label_names", "complete")}
                         | {"skipped": meta["skipped"]})
            for w in whats:
                if not meta["n"]:
                    maps[w].append(None)
                    continue
                try:
                    mm = np.load(shard_file(root, i, w), mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise TGEMError(f"feature cache {root}: cannot read {shard_file(root, i, w).name}: {e}") from None
                if len(mm) != meta["n"]:
                    raise TGEMError(f"feature cache {root}: {shard_file(root, i, w).name} has {len(mm)} rows, "
                                    f"its shard {meta['n']}")
                maps[w].append(mm)
        return cls(root, man, metas, maps)

    def _gather(self, what: str, idx, cols=None) -> np.ndarray:
        """Rows `idx` (at `cols`) of one array, copied out shard by shard. Each shard's pages are handed back to
        the kernel as soon as its rows are copied: a fault on a mapped file maps its neighbours too (fault-around,
        read-ahead), so a few rows read from every shard kept most of the cache resident until the batch ended,
        and the fit's peak resident set grew with the cache's size (docs/fit.md, memory)."""
        idx = np.asarray(idx, dtype=np.int64)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        ref = next(m for m in self.maps[what] if m is not None)
        tail = ref.shape[1:] if cols is None else (len(cols),) + ref.shape[2:]
        out = np.empty((len(idx), *tail), dtype=ref.dtype)
        for k in np.unique(shard):
            sel = shard == k
            rows = idx[sel] - self.starts[k]
            mm = self.maps[what][k]
            out[sel] = mm[rows] if cols is None else mm[rows[:, None], np.asarray(cols)[None, :]]
            if getattr(mm, "_mmap", None) is not None:
                mm._mmap.madvise(mmap.MADV_DONTNEED)
        return out

    def take(self, idx, space: str, layers) -> torch.Tensor:
        """(B, n, F) float32 features of rows `idx` at `layers` (1-based) in one profile space."""
        what = {"cls": "z", "patch": "patch"}.get(space, "rates")
        if what not in self.maps:
            from tgems.errors import TGEMError

            raise TGEMError(f"feature cache {self.root} holds no activation rates" if what == "rates" else
                            f"feature cache {self.root} holds no mean-patch readouts (made by an older tgems): "
                            f"give another --cache, or fit with --no-readout-patch or --recipe tgem")
        return torch.from_numpy(self._gather(what, idx, [l - 1 for l in layers])).float()

    def final_z(self, idx) -> torch.Tensor:
        """(B, D) float32 readouts of the last layer."""
        return torch.from_numpy(self._gather("z", idx, [self.num_layers - 1])[:, 0]).float()

    def text(self, idx) -> torch.Tensor:
        """(B, D) float32 unit caption embeddings (zeros where a row has no caption)."""
        return torch.from_numpy(self._gather("text", idx)).float()

    def caption_keys(self, idx) -> torch.Tensor:
        """(B,) int64 caption ids: equal for equal captions, 0 for none."""
        return torch.from_numpy(self._gather("key", idx))

    def subset(self, idx) -> LayerFeatures:
        """Rows `idx` in memory, as extract_features gives them (readouts float32, rates float16)."""
        idx = np.asarray(idx, dtype=np.int64)
        z = torch.from_numpy(self._gather("z", idx)).float()
        rates = torch.from_numpy(self._gather("rates", idx)) if self.has_rates else None
        patch = torch.from_numpy(self._gather("patch", idx)).float() if "patch" in self.maps else None
        return LayerFeatures(z, rates, torch.as_tensor(self.labels[idx]), classes=list(self.classes), patch=patch)

    def skipped(self) -> list:
        """Items left out at extraction, with their reasons, in input order."""
        return [s for m in self.metas for s in m["skipped"]]
