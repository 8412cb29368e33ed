"""The encode stage of a batch job through depth queues (`--scheduler depth`, tgems.scheduling.depth).

Exit-and-drop (`predict_items`, one micro-batch at a time) runs the later blocks of a micro-batch on the
rows that have not exited yet, and starts the next micro-batch only when its slowest row is done. Here
the rows of a shard go through one `DepthScheduler`: a step runs one block on up to `batch_size` rows of
one depth, rows that exit leave at once, and the next chunk of the stream enters at layer 0 as soon as
fewer than `batch_size` images wait there, so every block runs on a full batch while rows exit.

What stays as it was: the rows are those of `EarlyExitClassifier.predict` (each row's exit is decided by
the same policy on its own readout; probabilities within float tolerance), results come out chunk by
chunk in input order (the same `PartWriter.add` calls as the drop path), and batches never span shards:
the scheduler is refilled from one shard only and drained at its end. The refill is decided by the
stream's content alone (never by timing), so a shard's rows do not depend on where an earlier run
stopped, and a killed job, rerun, ends with exactly the rows of an uninterrupted one.
"""
from __future__ import annotations

import time
from collections import deque

from tgems.errors import TGEMError


def check_depth_predictor(predictor) -> None:
    """`--scheduler depth` runs the predictor's backbone and exit policy itself: it needs both."""
    from tgems.spec import EarlyExitPredictor

    if not isinstance(predictor, EarlyExitPredictor):
        raise TGEMError(f"--scheduler depth needs an early-exit classifier (a backbone, labels and an exit policy), "
                        f"got {type(predictor).__name__}; use --scheduler drop")


class _Pending:
    """One chunk on its way through the scheduler: its good items, encode errors, and rows as they are answered."""

    __slots__ = ("chunk", "good", "errors", "rows", "left")

    def __init__(self, chunk, good, errors):
        self.chunk, self.good, self.errors = chunk, good, errors
        self.rows, self.left = [None] * len(good), len(good)

    def done(self, i, result):
        self.rows[i] = result
        self.left -= 1


def _pixels(predictor, items, stats):
    """Normalised pixels of the items on the backbone's device, and the items they are: one image the encoder
    refuses (say, smaller than the crop) is an error record, as in `predict_items`."""
    import torch

    from tgems.jobs.stages import encoder_input

    bb = predictor.backbone
    t = time.perf_counter()
    try:
        inputs = encoder_input(predictor, [it.image for it in items])
        try:
            px = inputs if isinstance(inputs, torch.Tensor) else bb.preprocess(inputs)
            bb.check_pixels(px)
            return px, items, []
        except TGEMError as e:
            if len(items) == 1:
                return None, [], [(items[0].id, f"cannot encode image: {e}")]
        good, pieces, errors = [], [], []
        for i, it in enumerate(items):
            try:
                one = inputs[i:i + 1] if isinstance(inputs, torch.Tensor) else bb.preprocess([inputs[i]])
                bb.check_pixels(one)
            except TGEMError as e:
                errors.append((it.id, f"cannot encode image: {e}"))
                continue
            good.append(it)
            pieces.append(one)
        return (torch.cat(pieces) if pieces else None), good, errors
    finally:
        stats["normalize_s"] = stats.get("normalize_s", 0.0) + time.perf_counter() - t


def _table(predictor, pending, task):
    """The chunk's part columns, from its answered rows (the columns `predict_table` writes)."""
    import numpy as np

    from tgems.classifier import Prediction
    from tgems.jobs.stages import prediction_table

    if not pending.good:
        return None
    for r in pending.rows:
        if isinstance(r, BaseException):
            raise r
    rows = pending.rows
    probs = np.stack([r.probs.numpy() for r in rows])
    idx = probs.argmax(1)
    pred = Prediction([predictor.labels[i] for i in idx], idx, probs, np.array([r.exit_layer for r in rows]),
                      np.array([r.flops for r in rows]), np.array([r.flops_ratio for r in rows]),
                      np.stack([r.embedding.numpy() for r in rows]))
    return prediction_table(predictor, pred, [it.id for it in pending.good],
                            [it.source_label for it in pending.good], task)


def depth_results(predictor, chunks, task: str, batch_size: int, stats: dict | None = None):
    """Chunks of a stream (any number of shards, in order) -> (chunk, table or None, encode errors) per chunk,
    in the same order, with the rows computed through a DepthScheduler of `batch_size` rows a step."""
    from tgems.scheduling.depth import DepthScheduler

    check_depth_predictor(predictor)
    stats = {} if stats is None else stats
    stats.setdefault("encode_s", 0.0)
    # the refill bounds what waits at layer 0 (under a batch, plus one chunk): the queue never refuses
    sched = DepthScheduler(predictor.backbone, max_batch_size=batch_size, queue_size=2 ** 62)
    policy = predictor.policy()
    chunks = iter(chunks)
    pending: deque = deque()
    more, shard_open = True, True
    clock = time.perf_counter
    while True:
        # refill from the current shard while fewer than a batch wait at layer 0 (the stream decides, not the clock)
        while more and shard_open and sched.pending < batch_size:
            chunk = next(chunks, None)
            if chunk is None:
                more = False
                break
            good = [it for it in chunk.items if it.error is None]
            px, good, errors = _pixels(predictor, good, stats) if good else (None, [], [])
            entry = _Pending(chunk, good, errors)
            if good:
                sched.submit(px, policy, entry.done)
            pending.append(entry)
            shard_open = not chunk.last
        if sched.busy():
            t = clock()
            sched.step(flush=True)
            stats["encode_s"] += clock() - t
        elif not shard_open:
            shard_open = True  # the shard is drained: the next one may enter
        while pending and pending[0].left == 0:
            entry = pending.popleft()
            t = clock()
            table = _table(predictor, entry, task)
            stats["encode_s"] += clock() - t
            yield entry.chunk, table, entry.errors
        if not more and not pending and not sched.busy():
            return


__all__ = ["depth_results", "check_depth_predictor"]
