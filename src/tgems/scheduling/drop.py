"""Exit-and-drop micro-batching behind the DepthScheduler interface (`tgems serve --scheduler drop`).

The baseline the depth queues are measured against (benchmarks/serve_load.py): waiting images are taken in
micro-batches of up to `max_batch_size` (a partial one once its oldest image has waited `max_wait_s`), and
each micro-batch runs through `engine.run_early_exit`, so rows that exit leave the batch and later blocks
run on fewer rows. The answers are those of `EarlyExitClassifier.predict` on the same micro-batch."""
from __future__ import annotations

import threading
import time
from collections import deque

import torch

from tgems.engine import run_early_exit
from tgems.errors import TGEMError
from tgems.audit import AuditStats
from tgems.options import BATCH_SIZE
from tgems.scheduling.driver import Driver, QueueFull, RowResult, call, new_stats


class _Waiting:
    __slots__ = ("x", "policy", "done", "tag", "t_submit")

    def __init__(self, x, policy, done, tag, now):
        self.x, self.policy, self.done, self.tag, self.t_submit = x, policy, done, tag, now


class DropScheduler(Driver):
    """Micro-batches of waiting images through the exit-and-drop engine, one policy per engine call.

    Same driving interface and `stats` as DepthScheduler (submit, cancel, start / stop, run_until_idle,
    occupancy); a layer's occupancy is the rows that reached it in a step over max_batch_size. No live audit."""

    thread_name = "tgems-drop-scheduler"

    def __init__(self, backbone, max_batch_size: int = BATCH_SIZE, max_wait_s: float = 0.005,
                 queue_size: int = 1024):
        if max_batch_size < 1:
            raise TGEMError(f"max_batch_size must be a positive integer, got {max_batch_size}")
        self.backbone, self.L, self.B = backbone, backbone.num_layers, int(max_batch_size)
        self.capacity = self.B
        self.max_wait_s, self.queue_size = float(max_wait_s), int(queue_size)
        self.waiting = deque()
        self.cond = threading.Condition()
        self._thread, self._stopping = None, False
        self._current = []
        self.audit = AuditStats()
        self.stats = new_stats(self.L)

    @property
    def pending(self) -> int:
        return len(self.waiting)

    @property
    def inflight(self) -> int:
        return len(self._current)

    def submit(self, pixels: torch.Tensor, policy, done, tag=None, auditable: bool = False) -> None:
        self.backbone.check_pixels(pixels)
        with self.cond:
            if self._stopping:
                raise TGEMError("the scheduler is shutting down")
            if len(self.waiting) + len(pixels) > self.queue_size:
                raise QueueFull(f"the queue is full ({len(self.waiting)} of {self.queue_size} images waiting)")
            now = time.monotonic()
            self.waiting.extend(_Waiting(pixels[i], policy, (lambda r, i=i: done(i, r)), tag, now)
                                for i in range(len(pixels)))
            self.cond.notify_all()

    def cancel(self, tag) -> int:
        n = 0
        with self.cond:
            kept = deque()
            for r in self.waiting:
                if r.tag == tag and r.done is not None:
                    n += 1
                else:
                    kept.append(r)
            self.waiting = kept
            for r in self._current:
                if r.tag == tag and r.done is not None:
                    r.done, n = None, n + 1
            self.stats["cancelled"] += n
            self.cond.notify_all()
        return n

    def _wait(self, flush: bool):
        """Seconds to wait before the next micro-batch (0: take one now; None: nothing waits)."""
        if not self.waiting:
            return None
        if flush or len(self.waiting) >= self.B:
            return 0.0
        return max(0.0, self.waiting[0].t_submit + self.max_wait_s - time.monotonic())

    def step(self, flush: bool = False) -> bool | float:
        with self.cond:
            wait = self._wait(flush)
            if wait is None or wait > 0:
                return wait or 0.0
            rows = [self.waiting.popleft() for _ in range(min(self.B, len(self.waiting)))]
            saturated = bool(self.waiting)
            self._current = rows
        start = time.monotonic()
        groups = {}
        for r in rows:
            groups.setdefault(id(r.policy), []).append(r)
        for members in groups.values():
            try:
                res = run_early_exit(self.backbone, torch.stack([r.x for r in members]), members[0].policy)
            except Exception as e:  # a fault in one micro-batch fails its rows, never the scheduler
                self._fail(members, e)
                continue
            self._answer(members, res, start, saturated)
        with self.cond:
            self._current = []
            self.cond.notify_all()
        return True

    def _answer(self, rows, res, start, saturated):
        layers = res.exit_layers.tolist()
        flops = res.flops.tolist()
        with self.cond:
            s = self.stats
            for l in range(1, self.L + 1):
                k = sum(e >= l for e in layers)
                if k:
                    s["steps"][l - 1] += 1
                    s["rows"][l - 1] += k
                    if saturated:
                        s["steps_saturated"][l - 1] += 1
                        s["rows_saturated"][l - 1] += k
            s["answered"] += len(rows)
            s["flops"] += sum(flops)
            s["flops_full"] += res.full_flops * len(rows)
            for e in layers:
                s["exit_layers"][e] += 1
            dones = []
            for r in rows:
                dones.append(r.done)
                r.done = None
        for i, (r, done) in enumerate(zip(rows, dones)):
            if done is None:
                continue
            probs = None if res.outputs is None else res.outputs[i].float().cpu()
            result = RowResult(layers[i], self.L, res.features[i].float().cpu(), probs, flops[i],
                               flops[i] / res.full_flops, start - r.t_submit)
            call(done, result)

    def _fail(self, rows, error):
        with self.cond:
            self.stats["errors"] += len(rows)
            dones = [r.done for r in rows]
            for r in rows:
                r.done = None
        for done in dones:
            if done is not None:
                call(done, error)

    def busy(self) -> bool:
        return bool(self.waiting)

    def _idle_wait(self, flush: bool) -> float | None:
        return self._wait(flush)
