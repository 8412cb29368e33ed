"""What the depth queues and the exit-and-drop micro-batches share: the answered row, the refusal of a full
queue, the stats, and the driving (steps in a background thread until `stop`, or in the caller's thread
until idle). A scheduler subclass provides `step`, `busy` and `_idle_wait`."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from tgems.errors import TGEMError


@dataclass
class RowResult:
    """One answered row: the readout and policy outputs of its exit layer, its FLOPs and queue time."""

    exit_layer: int
    num_layers: int
    embedding: torch.Tensor  # (D,) the readout z at the exit layer, float32 on the CPU
    probs: torch.Tensor | None  # (C,) the policy's outputs at the exit layer (class probabilities)
    flops: float
    flops_ratio: float
    queue_s: float  # from submit to the first block
    audited: bool = False


class QueueFull(TGEMError):
    """The depth-0 queue cannot take the rows now (the server answers 429)."""


def new_stats(num_layers: int) -> dict:
    """Per layer: steps and rows (all, and those taken while images waited to enter); answered, cancelled and
    failed rows; FLOPs run and the full encoder's; exit layers."""
    L = num_layers
    return {"steps": [0] * L, "rows": [0] * L, "steps_saturated": [0] * L, "rows_saturated": [0] * L,
            "answered": 0, "cancelled": 0, "flops": 0.0, "flops_full": 0.0, "exit_layers": [0] * (L + 1),
            "errors": 0}


def call(done, result) -> None:
    """A caller's callback must not stop the scheduler."""
    try:
        done(result)
    except Exception:
        pass


class Driver:
    """The stepping loop of a scheduler: `cond` (a Condition), `_stopping`, `stats` and `B` (the batch size)
    are the subclass's; `step(flush)` returns True when it ran one, `_idle_wait(flush)` the seconds to wait
    for more rows (0.0: work is ready; None: until a submit)."""

    thread_name = "tgems-scheduler"

    def busy(self) -> bool:
        raise NotImplementedError

    def step(self, flush: bool = False) -> bool | float:
        raise NotImplementedError

    def _idle_wait(self, flush: bool) -> float | None:
        raise NotImplementedError

    def run_until_idle(self) -> None:
        """Step in this thread until nothing is queued or in flight, never waiting for more rows."""
        while self.busy():
            self.step(flush=True)

    def start(self):
        """Step in a background thread until `stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while True:
            with self.cond:
                if self._stopping and not self.busy():
                    return
            if self.step(flush=self._stopping) is True:
                continue
            with self.cond:  # decided again under the lock, so a submit in between is never missed
                wait = self._idle_wait(self._stopping)
                if wait != 0.0 and not self._stopping:
                    self.cond.wait(timeout=wait)

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new rows, finish the ones queued and in flight, end the thread."""
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def occupancy(self, saturated: bool = False) -> list[float | None]:
        """Mean rows per step at each depth, as a fraction of max_batch_size (None where no step ran);
        `saturated`: only the steps taken while images were waiting to enter (not the final drain)."""
        s = "_saturated" if saturated else ""
        return [r / (n * self.B) if n else None for n, r in zip(self.stats["steps" + s], self.stats["rows" + s])]
