"""Per-layer feature cache: one backbone pass per image, then training and sweeps touch only this."""
from __future__ import annotations

from dataclasses import dataclass

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
    `classes` (the dataset's class texts, so calibration can match them to a label set by text)."""

    z: torch.Tensor
    rates: torch.Tensor | None
    labels: torch.Tensor
    difficulty: np.ndarray | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return self.z.shape[0]

    def subset(self, idx) -> "LayerFeatures":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return LayerFeatures(self.z[idx], None if self.rates is None else self.rates[idx], self.labels[idx],
                             None if self.difficulty is None else self.difficulty[idx.numpy()], self.classes)

    def space(self, name: str) -> torch.Tensor:
        """The features of one profile space, float32 (N, L, F)."""
        if name == "cls":
            return self.z
        if self.rates is None:
            from tgems.errors import TGEMError

            raise TGEMError("these features were extracted without activation rates")
        return self.rates.float()


def extract_features(backbone, data: Dataset, rates: bool = False, batch_size: int = 256,
                     progress: bool = True, desc: str = "features") -> LayerFeatures:
    zs, rs = [], []
    for start in tqdm(range(0, len(data), batch_size), desc=desc, disable=not progress, leave=False):
        out = backbone.hidden_states(backbone.preprocess(data.images[start:start + batch_size]), rates=rates)
        zs.append(out["z"].float().cpu())
        if rates:
            rs.append(out["rates"].to(RATES_DTYPE).cpu())
    return LayerFeatures(z=torch.cat(zs), rates=torch.cat(rs) if rates else None,
                         labels=torch.as_tensor(data.labels, dtype=torch.long),
                         difficulty=data.difficulty, classes=list(data.classes))
