"""The Jumper's memory stays flat in jumper_max (issue 30.10): the signals of a cached fit are spilled to a
temporary file and written and read a block at a time, with their pages handed back after each block, and
the fit is the same as from memory."""
import numpy as np
import torch

from tgems.features import LayerFeatures
from tgems.training.jumper_fit import training_signals
from tgems.training.logistic import fit_logistic
from tgems.training.spill import by_blocks, release, spilled_empty


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def test_spilled_rows_are_written_and_read_without_staying_resident():
    rows, shape = 3000, (11, 1024)  # 135 MB of float32
    t = spilled_empty((rows, *shape))
    before = _resident_mb()
    block = torch.arange(np.prod(shape), dtype=torch.float32).reshape(shape)
    for a in range(0, rows, 500):
        t[a:a + 500] = block + a
        release(t[a:a + 500])
    written = _resident_mb() - before
    sums = by_blocks(lambda b: b.double().sum((1, 2)), t, 500)
    read = _resident_mb() - before
    assert written < 40 and read < 40, (written, read)  # a block or two, not 135 MB
    assert torch.equal(sums, torch.tensor([block.double().sum() + a * np.prod(shape)
                                           for a in range(0, rows, 500) for _ in range(500)][:rows]))
    release(torch.zeros(3))  # anything not spilled: nothing to do


class _Spilled:
    """Cached-fit rows as `training.fit._Rows` hands them to the Jumper (spill = True)."""

    spill = True

    def __init__(self, feats):
        self.feats = feats

    def __len__(self):
        return len(self.feats)

    def subset(self, idx):
        return self.feats.subset(idx)


def test_spilled_signals_and_their_fit_equal_the_in_memory_ones():
    from tgems.profiles import ClassProfiles

    g = torch.Generator().manual_seed(0)
    N, L, D, C = 1500, 5, 48, 7
    z = torch.randn(N, L, D, generator=g)
    feats = LayerFeatures(z, None, torch.randint(0, C, (N,), generator=g))
    text = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    protos = torch.nn.functional.normalize(torch.randn(L - 1, C, D, generator=g), dim=-1)
    prof = ClassProfiles("cls", list(range(1, L)), protos, None, torch.full((L - 1,), 10.0), text,
                         num_layers=L, final_scale=10.0)
    mem, p_mem = training_signals([prof, prof], feats)
    before = _resident_mb()
    disk, p_disk = training_signals([prof, prof], _Spilled(feats))
    assert _resident_mb() - before < mem.numel() * 4 / 2 ** 20 / 4  # most of it is not resident
    assert torch.equal(p_mem, p_disk) and torch.equal(mem, disk)
    y = (p_mem[:, :-1] == p_mem[:, -1:]).float()
    a, b = fit_logistic(mem, y, standardize=True), fit_logistic(disk, y, standardize=True)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_heap_trim_returns_freed_pages():
    """What a training step leaves behind (freed blocks inside the heap) goes back to the kernel."""
    from tgems.training.heap import trim

    blocks = [bytearray(b"x" * 100_000) for _ in range(1000)]  # 100 MB from the heap, every page touched
    del blocks[::2]  # 50 MB of holes between the kept blocks
    before = _resident_mb()
    assert trim() is True
    assert before - _resident_mb() > 30
    assert len(blocks) == 500
