"""Handing the C heap's free pages back to the kernel (glibc `malloc_trim`), for a fit and for the server.

A training step allocates and frees tensors of a few MB (a minibatch of features in float16, then in
float32, the modules' activations); glibc serves them from its heaps once a freed block has raised its
mmap threshold, and free pages inside a heap stay resident until `malloc_trim` returns them. Without
it the resident set of a long fit crept up with the number of steps (docs/fit.md, memory). The server's
threads free batch-sized blocks the same way (docs/serve.md, memory over a long run).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim() -> bool:
    """Return the heaps' free pages to the kernel (glibc `malloc_trim(0)`); False where there is no glibc."""
    lib = _libc()
    return bool(lib is not None and lib.malloc_trim(0))
