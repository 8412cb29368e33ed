"""Exit policies for the engine: fixed layer, per-row replay, never exit, and the Jumper's.

Every tensor a policy creates takes its device from its inputs, so the same policy runs on a GPU.
"""
from __future__ import annotations

import torch

from tgems.errors import TGEMError
from tgems.features import RATES_DTYPE
from tgems.jumper import (Jumper, exit_head_flops, exit_head_flops_by_layer, exit_signals, next_patience,
                          text_neighbours, trajectory_signals)
from tgems.profiles import ClassProfiles
from tgems.readouts import readout_pair


class ExitAtLayer:
    """Every row exits at layer k (a static truncated encoder)."""

    needs_rates = False
    head_flops = 0.0

    def __init__(self, k):
        self.k = k
        self.candidate_layers = [k]

    def decide(self, layer, z, rows):
        return torch.ones(len(rows), dtype=torch.bool, device=z.device)


class ExitPerRow:
    """Row i exits at layers[i] (oracle or replayed decisions).

    Readouts happen only at the layers that occur in `layers` unless `candidate_layers` is given.
    """

    needs_rates = False
    head_flops = 0.0

    def __init__(self, layers, candidate_layers=None):
        self.layers = torch.as_tensor(layers, dtype=torch.long).reshape(-1)
        self.candidate_layers = sorted(set(self.layers.tolist()) if candidate_layers is None
                                       else candidate_layers)

    def start(self, n):
        if n != len(self.layers):
            raise TGEMError(f"ExitPerRow has {len(self.layers)} exit layers for {n} images")

    def decide(self, layer, z, rows):
        return self.layers.to(rows.device)[rows] == layer


class NeverExit:
    """No early exit: the engine's equivalent of the full encoder."""

    needs_rates = False
    head_flops = 0.0
    candidate_layers = []

    def decide(self, layer, z, rows):
        return torch.zeros(len(rows), dtype=torch.bool, device=z.device)


class JumperPolicy:
    """Class profiles + Jumper at each candidate layer, the backbone's zero-shot head at L.

    Outputs are the class probabilities of the layer where each row exits."""

    def __init__(self, profiles: ClassProfiles, jumper: Jumper, tau: float):
        self.p, self.jumper, self.tau = profiles, jumper, tau
        self.candidate_layers = list(profiles.layers)
        self.num_classes = profiles.num_classes
        self.needs_rates = profiles.space == "rates"
        self.needs_patch = profiles.reads_patch
        self.head_flops = exit_head_flops(profiles)
        if profiles.shortlist is not None:  # per-layer cost: full scorings and shortlist scorings differ
            self.head_flops_by_layer = exit_head_flops_by_layer(profiles)
        self._index = {l: j for j, l in enumerate(profiles.layers)}
        self.neighbours = text_neighbours(profiles.text)  # once per label set, as jumper_signals does
        self.prev_p = self.prev_z = self.keep = self.patience = None

    def start(self, n: int):
        self.n, self.prev_p, self.prev_z, self.keep, self.patience = n, None, None, None, None

    def decide(self, layer, z, rows, rates=None, patch=None):
        if layer not in self._index:  # the last layer: the backbone's own zero-shot head
            return torch.ones(len(rows), dtype=torch.bool, device=z.device), self.p.probs(len(self.p.layers), z)
        j = self._index[layer]
        x = rates.to(RATES_DTYPE).float() if self.p.space == "rates" else z  # as in the feature cache
        probs, keep, t, d = self.p.contention_parts(j, x, None if self.keep is None else self.keep[rows], patch)
        if self.prev_p is None:
            self.prev_p = torch.zeros(self.n, self.p.num_classes, device=z.device)
            self.prev_z = torch.zeros(self.n, z.shape[1], device=z.device)
            self.patience = torch.zeros(self.n, device=z.device)
        if keep is not None:
            if self.keep is None:
                self.keep = torch.zeros(self.n, keep.shape[1], dtype=torch.long, device=z.device)
            self.keep[rows] = keep
        text = self.p.text
        prev_p = None if j == 0 else self.prev_p[rows]
        patience = next_patience(None if j == 0 else self.patience[rows], probs, prev_p)
        traj = trajectory_signals(patience, readout_pair(t, d))
        sig = exit_signals(probs, prev_p, z, None if j == 0 else self.prev_z[rows], text, self.neighbours, traj)
        self.patience[rows] = patience
        self.prev_p[rows] = probs
        self.prev_z[rows] = z.float()
        exit_now = self.jumper.score(j, sig) >= self.tau
        return exit_now, probs
