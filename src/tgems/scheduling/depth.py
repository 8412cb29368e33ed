"""Depth queues: iteration-level batching for an early-exit image encoder.

Exit-and-drop batching (engine.run_early_exit) runs later blocks on a shrinking batch: what the exits save
in FLOPs a GPU loses in occupancy. Here every row waits in the queue of its depth (the number of blocks it
has run); a step runs ONE block on up to `max_batch_size` rows of ONE depth, answers the rows that exit at
once, and moves the survivors one queue down. New images enter at depth 0 whenever fewer than
`max_inflight` rows are in flight, so under load every block runs on a full batch while rows exit.

Which depth a step runs (`_pick`): the deepest queue that holds a full batch; otherwise, once the oldest
waiting row has waited `max_wait_s` (or at once in flush mode), the fullest queue, ties to the deepest.
With `max_inflight >= (L - 1) * (max_batch_size - 1) + 1` (the default, L * max_batch_size) a full
queue always exists while the in-flight cap holds new images back, so the scheduler never stalls.

Rows of one step may carry different exit policies (label sets, taus, goals): the block and readout are
shared, then each policy decides for its own rows. A policy is any engine exit policy (engine.py); its
per-row state is indexed by the row's slot (0 .. max_inflight - 1), so a JumperPolicy decides exactly as
it does under `EarlyExitClassifier.predict`, and the FLOPs are counted as the engine counts them.

Audit: a fraction of the rows that exit early (seeded) keep running to the last layer after they were
answered; there the policy's full-depth prediction is compared with the answer, for a live check of a
max-drop guarantee (see `tgems.audit.AuditStats`).
"""
from __future__ import annotations

import random
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from tgems.audit import AuditStats
from tgems.engine import _as_policy, _split_decision, exit_flops, full_flops
from tgems.errors import TGEMError
from tgems.options import BATCH_SIZE, DELTA
from tgems.scheduling.driver import Driver, QueueFull, RowResult, call, new_stats


class _Row:
    __slots__ = ("policy", "done", "tag", "t_submit", "t_enqueue", "slot", "audit", "answer", "auditable")

    def __init__(self, policy, done, tag, auditable, now):
        self.policy, self.done, self.tag, self.auditable = policy, done, tag, auditable
        self.t_submit = self.t_enqueue = now
        self.slot, self.audit, self.answer = -1, False, None


@dataclass
class _Piece:
    """Rows that entered a queue together: their states (pixels at depth 0, hidden states below)."""

    x: torch.Tensor
    rows: list
    t: float = field(default_factory=time.monotonic)


class _Policy:
    """What the scheduler keeps of a policy: its readout layers and the FLOPs of a row that exits at each layer
    (the engine's one count, `exit_flops`, per-layer exit heads included)."""

    def __init__(self, policy, backbone, capacity):
        self.policy, layers = _as_policy(policy, backbone.num_layers)
        self.readout = frozenset(layers)
        self.needs_rates = bool(getattr(self.policy, "needs_rates", False))
        self.needs_patch = bool(getattr(self.policy, "needs_patch", False))
        head = float(getattr(self.policy, "head_flops", 0.0) or 0.0)
        at = torch.arange(1, backbone.num_layers + 1, device="cpu")
        self.flops_at = [0.0] + exit_flops(backbone, at, layers, head,
                                           getattr(self.policy, "head_flops_by_layer", None)).tolist()
        self.flops_full = full_flops(backbone, getattr(self.policy, "num_classes", 0))
        if hasattr(self.policy, "start"):
            self.policy.start(capacity)  # per-row state indexed by slot


def _inputs(info: _Policy, sel: torch.Tensor, rates, patch=None) -> dict:
    """The keyword inputs a policy's `decide` takes for the rows `sel`: the rates and the mean-patch readout
    where it reads them."""
    out = {"rates": None if rates is None else rates[sel]} if info.needs_rates else {}
    if info.needs_patch and patch is not None:
        out["patch"] = patch[sel]
    return out


class DepthScheduler(Driver):
    """Depth-queue batching of one backbone's vision tower for many exit policies at once.

    `submit` is thread-safe; run the steps either in a background thread (`start` / `stop`) or in the
    caller's (`run_until_idle`). `done(result_or_exception)` is called once per row, from the stepping
    thread."""

    thread_name = "tgems-depth-scheduler"

    def __init__(self, backbone, max_batch_size: int = BATCH_SIZE, max_inflight: int | None = None,
                 max_wait_s: float = 0.005, queue_size: int = 1024, audit_rate: float = 0.0,
                 audit_max_drop: float | None = None, audit_delta: float = DELTA, seed: int = 0, log=None):
        if max_batch_size < 1:
            raise TGEMError(f"max_batch_size must be a positive integer, got {max_batch_size}")
        if not 0 <= audit_rate <= 1:
            raise TGEMError(f"audit rate must lie in [0, 1], got {audit_rate}")
        self.backbone, self.L = backbone, backbone.num_layers
        self.B = int(max_batch_size)
        self.capacity = int(max_inflight or self.B * self.L)
        if self.capacity < self.B:
            raise TGEMError(f"max_inflight ({self.capacity}) must be at least max_batch_size ({self.B})")
        self.max_wait_s, self.queue_size = float(max_wait_s), int(queue_size)
        self.queues = [deque() for _ in range(self.L)]  # depth d holds rows that ran d blocks
        self.sizes = [0] * self.L
        self.free_slots = list(range(self.capacity - 1, -1, -1))
        self._policies = weakref.WeakKeyDictionary()
        self.cond = threading.Condition()
        self._thread, self._stopping = None, False
        self._current = []  # the rows of the step being run (cancel marks them too)
        self.audit = AuditStats(audit_rate, audit_max_drop, audit_delta)
        self._rng = random.Random(seed)
        self._log = log or (lambda msg: None)
        self.stats = new_stats(self.L)

    # ------------------------------------------------------------------ admission

    @property
    def pending(self) -> int:
        """Rows waiting at depth 0 (not yet in flight)."""
        return self.sizes[0]

    @property
    def inflight(self) -> int:
        return self.capacity - len(self.free_slots)

    def submit(self, pixels: torch.Tensor, policy, done, tag=None, auditable: bool = False) -> None:
        """Queue preprocessed images (N, 3, S, S) with one exit policy; `done` is called once per row, with
        (index in `pixels`, RowResult or exception). Refuses (TGEMError) when the depth-0 queue would hold
        more than `queue_size` rows."""
        self.backbone.check_pixels(pixels)
        with self.cond:
            if self._stopping:
                raise TGEMError("the scheduler is shutting down")
            if self.sizes[0] + len(pixels) > self.queue_size:
                raise QueueFull(f"the queue is full ({self.sizes[0]} of {self.queue_size} images waiting)")
            if policy not in self._policies:
                self._policies[policy] = _Policy(policy, self.backbone, self.capacity)
            now = time.monotonic()
            rows = [_Row(policy, (lambda r, i=i: done(i, r)), tag, auditable, now) for i in range(len(pixels))]
            self.queues[0].append(_Piece(pixels, rows, now))
            self.sizes[0] += len(rows)
            self.cond.notify_all()

    def cancel(self, tag) -> int:
        """Drop every row of `tag` (a request whose client left): waiting rows now, in-flight rows at their
        next step; their slots come back. Returns the number of rows dropped now or marked."""
        n = 0
        with self.cond:
            for rows in [p.rows for q in self.queues for p in q] + [self._current]:
                for r in rows:
                    if r.tag == tag and r.done is not None:
                        r.done, n = None, n + 1
            self.stats["cancelled"] += n
            self.cond.notify_all()
        return n

    # ------------------------------------------------------------------ stepping

    def _admissible(self, d):
        return min(self.sizes[0], len(self.free_slots)) if d == 0 else self.sizes[d]

    def _pick(self, flush: bool):
        """(depth to run, seconds to wait instead): see the module docstring."""
        sizes = [self._admissible(d) for d in range(self.L)]
        full = [d for d in range(self.L) if sizes[d] >= self.B]
        if full:
            return full[-1], 0.0
        if not any(sizes):
            return None, None
        if not flush:
            oldest = min(q[0].t for d, q in enumerate(self.queues) if sizes[d])
            wait = oldest + self.max_wait_s - time.monotonic()
            if wait > 0:
                return None, wait
        best = max(range(self.L), key=lambda d: (sizes[d], d))
        return best, 0.0

    def _take(self, d, n):
        """Up to n live rows from the front of queue d: (states, rows); cancelled rows are dropped here."""
        q, xs, rows = self.queues[d], [], []
        while q and len(rows) < n:
            piece = q[0]
            k = n - len(rows)
            if len(piece.rows) <= k:
                q.popleft()
                take_x, take_rows = piece.x, piece.rows
            else:
                take_x, take_rows = piece.x[:k], piece.rows[:k]
                piece.x, piece.rows = piece.x[k:], piece.rows[k:]
            self.sizes[d] -= len(take_rows)
            live = [i for i, r in enumerate(take_rows) if r.done is not None or r.audit]
            for i, r in enumerate(take_rows):
                if not (r.done is not None or r.audit) and r.slot >= 0:
                    self.free_slots.append(r.slot)
            if len(live) < len(take_rows):
                take_x = take_x[torch.tensor(live, dtype=torch.long, device=take_x.device)]
                take_rows = [take_rows[i] for i in live]
            if take_rows:
                xs.append(take_x)
                rows += take_rows
        if not rows:
            return None, []
        return (xs[0] if len(xs) == 1 else torch.cat(xs)), rows

    def step(self, flush: bool = False) -> bool | float:
        """Run one block on one depth. True when a step ran; otherwise the seconds to wait (0: nothing to do)."""
        with self.cond:
            d, wait = self._pick(flush)
            if d is None:
                return wait or 0.0
            saturated = self.sizes[0] > 0  # images still waiting to enter: the batch could have been full
            x, rows = self._take(d, min(self.B, self._admissible(d)))
            if d == 0:
                now = time.monotonic()
                for r in rows:
                    r.slot = self.free_slots.pop()
                    r.t_enqueue = now
            self._current = rows
        if not rows:
            return True
        try:
            out = self._run(d, x, rows)
        except Exception as e:  # a fault in one step fails its rows, never the scheduler
            self._fail(rows, e)
            with self.cond:
                self._current = []
            return True
        with self.cond:
            self._current = []
            self.stats["steps"][d] += 1
            self.stats["rows"][d] += len(rows)
            if saturated:
                self.stats["steps_saturated"][d] += 1
                self.stats["rows_saturated"][d] += len(rows)
            if out is not None:
                h, keep = out
                self.queues[d + 1].append(_Piece(h, keep))
                self.sizes[d + 1] += len(keep)
            self.cond.notify_all()
        return True

    @torch.no_grad()
    def _run(self, d, x, rows):
        bb, l = self.backbone, d + 1
        h = bb.embed(x) if d == 0 else x
        info = [self._policies[r.policy] for r in rows]
        read = [i for i, p in enumerate(info) if l in p.readout or l == self.L]
        rates = None
        if any(info[i].needs_rates for i in read):
            h, rates = bb.block(l, h, return_rates=True)
        else:
            h = bb.block(l, h)
        exits = [False] * len(rows)
        if read:
            idx = torch.tensor(read, dtype=torch.long, device=h.device)
            hr = h if len(read) == len(rows) else h[idx]  # no copy of h when every row reads out
            z = bb.readout(hr, l)
            patch = bb.patch_readout(hr, l) if l < self.L and any(info[i].needs_patch for i in read) else None
            groups = {}
            for j, i in enumerate(read):
                groups.setdefault(id(rows[i].policy), []).append(j)
            for members in groups.values():
                rows_j = [rows[read[j]] for j in members]
                sel = torch.tensor(members, dtype=torch.long, device=z.device)
                exits_j = self._decide(l, z[sel], None if rates is None else rates[idx[sel]], rows_j,
                                       info[read[members[0]]], None if patch is None else patch[sel])
                for j, e in zip(members, exits_j):
                    exits[read[j]] = e
        keep = [i for i, e in enumerate(exits) if not e]
        if l == self.L or not keep:
            self._release(rows)
            return None
        if len(keep) == len(rows):
            return h, rows
        self._release([r for r, e in zip(rows, exits) if e])
        return h[torch.tensor(keep, dtype=torch.long, device=h.device)], [rows[i] for i in keep]

    def _decide(self, l, z, rates, rows, info, patch=None):
        """Exit decisions of one policy's rows at layer l; answers the rows that exit. Audited rows (already
        answered) only run on, and at the last layer compare the full model's answer with theirs."""
        pol = info.policy
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long, device=z.device)
        live = [k for k, r in enumerate(rows) if not r.audit]
        mask = torch.zeros(len(rows), dtype=torch.bool, device="cpu")  # decided in Python
        outputs = None
        if live and (l in info.readout or l == self.L):
            sel = torch.tensor(live, dtype=torch.long, device=z.device)
            decision = pol.decide(l, z[sel], slots[sel], **_inputs(info, sel, rates, patch))
            m, outputs = _split_decision(decision, len(live))
            m = m.cpu()
            if l == self.L:
                m = torch.ones_like(m)
            for j, k in enumerate(live):
                mask[k] = m[j]
        audited = [k for k, r in enumerate(rows) if r.audit]
        if audited and l == self.L:
            sel = torch.tensor(audited, dtype=torch.long, device=z.device)
            decision = pol.decide(l, z[sel], slots[sel], **_inputs(info, sel, rates))  # the last layer: no patch
            _, full = _split_decision(decision, len(audited))
            for j, k in enumerate(audited):
                self._audited(rows[k], None if full is None else int(full[j].argmax()))
        position = {k: j for j, k in enumerate(live)}
        out = []
        for k, r in enumerate(rows):
            if r.audit:
                out.append(l == self.L)
                continue
            if not mask[k]:
                out.append(False)
                continue
            probs = None if outputs is None else outputs[position[k]].float().cpu()
            flops = info.flops_at[l]
            res = RowResult(l, self.L, z[k].float().cpu(), probs, flops, flops / info.flops_full,
                            r.t_enqueue - r.t_submit)
            audit = (l < self.L and r.auditable and probs is not None and self.audit.rate > 0
                     and self._rng.random() < self.audit.rate)
            if audit:
                res.audited, r.audit, r.answer = True, True, int(probs.argmax())
            self._answer(r, res, info.flops_full)
            out.append(not audit)
        return out

    def _answer(self, r, res, flops_full):
        with self.cond:
            done, r.done = r.done, None
            s = self.stats
            s["answered"] += 1
            s["flops"] += res.flops
            s["flops_full"] += flops_full
            s["exit_layers"][res.exit_layer] += 1
        if done is not None:
            call(done, res)

    def _audited(self, r, full_pred):
        r.audit = False
        if full_pred is None:
            return
        with self.cond:
            crossed = self.audit.add(full_pred != r.answer)
        if crossed:
            a = self.audit
            self._log(f"tgems serve: audit: live disagreement with the full model {a.observed:.4f} "
                      f"({a.disagree} of {a.n} audited exits), its anytime {1 - a.delta:.0%} lower bound "
                      f"{a.lower:.4f} passes the calibrated max_drop {a.max_drop}: the traffic has drifted "
                      f"from calibration")

    def _release(self, rows):
        with self.cond:
            for r in rows:
                if r.slot >= 0 and not r.audit:
                    self.free_slots.append(r.slot)
                    r.slot = -1

    def _fail(self, rows, error):
        with self.cond:
            self.stats["errors"] += len(rows)
            for r in rows:
                r.audit = False
                done, r.done = r.done, None
                if r.slot >= 0:
                    self.free_slots.append(r.slot)
                    r.slot = -1
                if done is not None:
                    call(done, error)

    # ------------------------------------------------------------------ driving (tgems.scheduling.driver)

    def busy(self) -> bool:
        return any(self.sizes)

    def _idle_wait(self, flush: bool) -> float | None:
        d, wait = self._pick(flush)
        return 0.0 if d is not None else wait


def predict_rows(scheduler: DepthScheduler, jobs) -> list[list]:
    """Synchronous use: `jobs` = [(pixels, policy), ...]; steps in this thread; [[RowResult, ...], ...]."""
    out = [[None] * len(px) for px, _ in jobs]
    for k, (px, pol) in enumerate(jobs):
        scheduler.submit(px, pol, (lambda i, r, k=k: out[k].__setitem__(i, r)), tag=k)
    scheduler.run_until_idle()
    for res in out:
        for r in res:
            if isinstance(r, Exception):
                raise r
    return out
