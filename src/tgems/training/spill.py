"""Arrays too large to hold for a fit's whole length, kept in a temporary file instead: the Jumper's
signals (K sets x jumper_max images x layers x (D + 9) float32, 275 MB at ViT-B/16's D with 4,000 images
and 3 sets). The file is mapped; whoever writes or reads it a block of rows at a time hands the block's
pages back to the kernel after it (`release`), so what stays resident is a block, whatever jumper_max
is (docs/fit.md, memory). The pages stay in the page cache, so reading them again is a memory copy.
"""
from __future__ import annotations

import mmap
import tempfile
import weakref

import numpy as np
import torch

ROWS = 1024  # rows per block of `by_blocks`

_SPILLED: "weakref.WeakValueDictionary[int, _Spill]" = weakref.WeakValueDictionary()


class _Spill:
    def __init__(self, shape, dtype):
        nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        with tempfile.TemporaryFile(prefix="tgems-spill-") as f:  # unlinked at once; the mapping keeps it
            f.truncate(nbytes)
            self.map = mmap.mmap(f.fileno(), nbytes)
        self.array = np.frombuffer(self.map, dtype=dtype).reshape(shape)

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of bytes [start, stop) from the process (the file keeps them)."""
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        stop = min(stop, len(self.map))
        if stop > lo:
            self.map.madvise(mmap.MADV_DONTNEED, lo, stop - lo)


def spilled_empty(shape, dtype=np.float32) -> torch.Tensor:
    """An uninitialised tensor backed by a temporary file in the system's temporary folder (TMPDIR)."""
    spill = _Spill(tuple(shape), dtype)
    t = torch.from_numpy(spill.array)
    _SPILLED[t.data_ptr()] = spill
    t._tgems_spill = spill  # the registry entry lives as long as the tensor
    return t


def release(t: torch.Tensor) -> None:
    """Hand back the pages under `t`, a view of a spilled tensor (of anything else: nothing to do)."""
    spill = _SPILLED.get(t.untyped_storage().data_ptr())
    if spill is None or t.numel() == 0:
        return
    start = t.data_ptr() - t.untyped_storage().data_ptr()
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    spill.release(start, start + span * t.element_size())


def by_blocks(fn, t: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """fn over blocks of rows of `t`, concatenated; each block's pages released after it."""
    out = []
    for a in range(0, len(t), rows):
        out.append(fn(t[a:a + rows]))
        release(t[a:a + rows])
    return torch.cat(out)
