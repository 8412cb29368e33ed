"""Batched layer-by-layer early-exit inference with per-sample compute accounting.

Rows that exit at a candidate layer are dropped from the batch (indexing by the rows that stay),
so later blocks run on fewer rows: the wall-clock saving follows the FLOPs saving.

An exit policy is any object with `candidate_layers` (sorted ints in 1..L; L is
always final), optional `needs_rates` and `needs_patch` (bool), `head_flops` (per row per candidate
layer visited; optional `head_flops_by_layer`, {layer: FLOPs}, where they differ by layer),
`num_classes` (the labels it scores, 0 or absent for none: the plain baseline scores them too, see
`full_flops`), `start(n)` (called once per call of `run_early_exit` with the number
of input rows) and `decide(layer, z, rows[, rates=][, patch=])` (the mean-patch readouts, at candidate
layers) returning a bool mask
"these rows exit now", or `(mask, outputs)` with outputs (n_active, K) kept for the
exiting rows. `rows` are the rows' indices in the input, so a policy can keep
per-row state; any tensor a policy creates takes its device from `z` or `rows`. A plain callable
`policy(layer, z, rows) -> mask` also works. Ready-made policies live in policies.py.
"""
import operator
from dataclasses import dataclass

import torch

from tgems.errors import TGEMError


@dataclass
class EngineResult:
    """Per-row results, in input order."""

    features: torch.Tensor
    exit_layers: torch.Tensor
    flops: torch.Tensor
    outputs: torch.Tensor | None
    full_flops: float
    num_layers: int

    @property
    def mean_layers(self):
        return float(self.exit_layers.double().mean())

    @property
    def flops_ratio(self):
        return float(self.flops.mean()) / self.full_flops


class _CallablePolicy:
    needs_rates = False
    head_flops = 0.0

    def __init__(self, fn, num_layers):
        self.fn = fn
        self.candidate_layers = list(range(1, num_layers + 1))

    def decide(self, layer, z, rows):
        return self.fn(layer, z, rows)


def _as_policy(policy, num_layers):
    if not hasattr(policy, "decide"):
        if not callable(policy):
            raise TGEMError(f"an exit policy needs decide() or must be callable, got {type(policy).__name__}")
        policy = _CallablePolicy(policy, num_layers)
    layers = []
    for l in getattr(policy, "candidate_layers", None) or []:
        try:
            l = operator.index(l)
        except TypeError:
            raise TGEMError(f"candidate layers must be integers, got {l!r}") from None
        if not 1 <= l <= num_layers:
            raise TGEMError(f"candidate layer {l} is outside 1..{num_layers}")
        layers.append(l)
    return policy, sorted(set(layers) | {num_layers})


def _split_decision(decision, n):
    mask, outputs = decision if isinstance(decision, tuple) else (decision, None)
    mask = torch.as_tensor(mask).reshape(-1).to(torch.bool)
    outputs = None if outputs is None else torch.as_tensor(outputs)
    if len(mask) != n:
        raise TGEMError(f"exit policy returned a mask of {len(mask)} rows for {n} active rows")
    if outputs is not None and (outputs.ndim != 2 or len(outputs) != n):
        raise TGEMError(f"exit policy outputs must be (n_active, K), got {tuple(outputs.shape)}")
    return mask, outputs


class _Store:
    """Results for the whole input, filled as rows exit."""

    def __init__(self, n, dim, device, dtype):
        self.features = torch.zeros(n, dim, device=device, dtype=dtype)
        self.exit_layers = torch.zeros(n, dtype=torch.long)
        self.outputs = None

    def put(self, rows, layer, z, outputs):
        self.features[rows] = z
        self.exit_layers[rows.cpu()] = layer
        if outputs is not None:
            if self.outputs is None:
                self.outputs = torch.full((len(self.features), outputs.shape[1]), float("nan"),
                                          dtype=outputs.dtype, device=outputs.device)
            self.outputs[rows.to(outputs.device)] = outputs


def _run_chunk(backbone, pixels, offset, policy, readout_layers, store):
    L = backbone.num_layers
    wants_rates = bool(getattr(policy, "needs_rates", False))
    wants_patch = bool(getattr(policy, "needs_patch", False))
    readout_set = set(readout_layers)
    h = backbone.embed(pixels)
    rows = torch.arange(offset, offset + len(pixels), device=h.device)
    for l in range(1, L + 1):
        rates = None
        if wants_rates and l in readout_set:
            h, rates = backbone.block(l, h, return_rates=True)
        else:
            h = backbone.block(l, h)
        if l not in readout_set:
            continue
        z = backbone.readout(h, l)
        extra = {"rates": rates} if wants_rates else {}
        if wants_patch and l < L:
            extra["patch"] = backbone.patch_readout(h, l)
        decision = policy.decide(l, z, rows, **extra)
        mask, outputs = _split_decision(decision, len(rows))
        mask = mask.to(h.device)
        if l == L:
            mask = torch.ones_like(mask)
        if not mask.any():
            continue
        exiting = mask.nonzero().squeeze(1)
        store.put(rows[exiting], l, z[exiting], None if outputs is None else outputs[exiting.to(outputs.device)])
        keep = (~mask).nonzero().squeeze(1)
        if len(keep) == 0:
            return
        h, rows = h[keep], rows[keep]


@torch.no_grad()
def run_early_exit(backbone, pixels, policy, batch_size=None):
    """Run the vision tower with per-row early exit; rows come back in input order.

    `batch_size` only bounds memory: the policy sees the whole input as one batch.
    """
    backbone.check_pixels(pixels)
    n = len(pixels)
    if n == 0:
        raise TGEMError("no images given")
    policy, readout_layers = _as_policy(policy, backbone.num_layers)
    if hasattr(policy, "start"):
        policy.start(n)
    store = _Store(n, backbone.embed_dim, backbone.device, backbone.dtype)
    step = batch_size or n
    for offset in range(0, n, step):
        _run_chunk(backbone, pixels[offset:offset + step], offset, policy, readout_layers, store)
    flops = exit_flops(backbone, store.exit_layers, readout_layers, float(getattr(policy, "head_flops", 0.0) or 0.0),
                       getattr(policy, "head_flops_by_layer", None))
    return EngineResult(store.features, store.exit_layers, flops, store.outputs,
                        full_flops(backbone, getattr(policy, "num_classes", 0)), backbone.num_layers)


def full_flops(backbone, num_classes: int = 0) -> float:
    """The plain-CLIP baseline per image, the denominator of every FLOPs ratio: the whole encoder
    (`flops_full`) and, for zero-shot classification over `num_classes` labels, its final scoring (2 C D),
    which an early-exit classifier pays at its last layer too. 0 labels: an embedding (retrieval, indexing)."""
    from tgems.backbones.flops import flops_zero_shot

    return float(backbone.flops_full()) + float(flops_zero_shot(int(num_classes or 0), backbone.embed_dim))


def exit_flops(backbone, exit_layers: torch.Tensor, readout_layers, head_flops: float = 0.0,
               head_flops_by_layer: dict | None = None) -> torch.Tensor:
    """The one FLOPs count, per row (float64): embedding, the blocks up to the exit layer, and at every readout
    layer visited the readout plus the exit head (`head_flops`, or `head_flops_by_layer[l]` where given)."""
    readout_layers = sorted(readout_layers)
    visits = torch.searchsorted(torch.tensor(readout_layers, device=exit_layers.device), exit_layers, right=True)
    base = backbone.flops_embed() + exit_layers.double() * backbone.flops_block()
    if head_flops_by_layer is None:
        return base + visits.double() * (backbone.flops_readout() + head_flops)
    per_visit = torch.tensor([backbone.flops_readout() + head_flops_by_layer.get(l, head_flops)
                              for l in readout_layers], dtype=torch.float64, device=exit_layers.device)
    return base + per_visit.cumsum(0)[(visits - 1).clamp_min(0)]
