"""The Jumper's memory stays flat in jumper_max (issue 30.10): the signals of a cached fit are spilled to a
temporary file and written and read a block at a time, with their pages handed back after each block, and
the fit is the same as from memory."""
from pathlib import Path

import numpy as np
import torch

from tgems.features import LayerFeatures
from tgems.training.jumper_fit import training_signals
from tgems.training.logistic import fit_logistic
from tgems.training.spill import by_blocks, release, spilled_empty


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def _in_fresh_process(body: str) -> list:
    """Run `body` in a new interpreter and return what it prints (JSON): a process's resident memory is only
    its own to measure when no thread of an earlier test (a server, a scheduler, Ray) allocates beside it."""
    import json
    import subprocess
    import sys
    import textwrap

    head = "import json, numpy as np, torch\n" + _resident_src
    out = subprocess.run([sys.executable, "-c", head + textwrap.dedent(body)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_resident_src = """
def _resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20
"""


def test_spilled_rows_are_written_and_read_without_staying_resident():
    written, read, equal = _in_fresh_process("""
        from tgems.training.spill import by_blocks, release, spilled_empty
        rows, shape = 3000, (11, 1024)  # 135 MB of float32
        t = spilled_empty((rows, *shape))
        before = _resident_mb()
        block = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
        for a in range(0, rows, 500):
            t[a:a + 500] = block + a
            release(t[a:a + 500])
        written = _resident_mb() - before
        sums = by_blocks(lambda b: b.sum((1, 2), dtype=torch.float64), t, 500)
        read = _resident_mb() - before
        want = torch.tensor([block.double().sum() + a * np.prod(shape) for a in range(0, rows, 500)
                             for _ in range(500)][:rows])
        release(torch.zeros(3))  # anything not spilled: nothing to do
        print(json.dumps([written, read, bool(torch.equal(sums, want))]))
    """)
    assert written < 40 and read < 40, (written, read)  # a block or two, not 135 MB
    assert equal


class _Spilled:
    """Cached-fit rows as `training.fit._Rows` hands them to the Jumper (spill = True)."""

    spill = True

    def __init__(self, feats):
        self.feats = feats

    def __len__(self):
        return len(self.feats)

    def subset(self, idx):
        return self.feats.subset(idx)


def _profiles_and_feats(N, L=5, D=48, C=7):
    from tgems.profiles import ClassProfiles

    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, L, D, generator=g)
    feats = LayerFeatures(z, None, torch.randint(0, C, (N,), generator=g))
    text = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    protos = torch.nn.functional.normalize(torch.randn(L - 1, C, D, generator=g), dim=-1)
    prof = ClassProfiles("cls", list(range(1, L)), protos, None, torch.full((L - 1,), 10.0), text,
                         num_layers=L, final_scale=10.0)
    return prof, feats


def test_spilled_signals_and_their_fit_equal_the_in_memory_ones():
    prof, feats = _profiles_and_feats(1500)
    mem, p_mem = training_signals([prof, prof], feats)
    disk, p_disk = training_signals([prof, prof], _Spilled(feats))
    assert torch.equal(p_mem, p_disk) and torch.equal(mem, disk)
    y = (p_mem[:, :-1] == p_mem[:, -1:]).float()
    a, b = fit_logistic(mem, y, standardize=True), fit_logistic(disk, y, standardize=True)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_spilled_signals_resident_memory_does_not_follow_the_rows():
    """Four times the Jumper's rows: the spilled signals' resident growth stays about a block's worth
    (block-sized temporaries and the returned predictions aside), not four times the file."""
    grown = {}
    for n in (10000, 40000):
        grown[n] = _in_fresh_process("""
            import sys
            sys.path.insert(0, %r)
            from test_fit_memory import _Spilled, _profiles_and_feats
            from tgems.training.jumper_fit import training_signals
            prof, feats = _profiles_and_feats(%d)
            before = _resident_mb()
            disk, _ = training_signals([prof, prof], _Spilled(feats))
            print(json.dumps([_resident_mb() - before, disk.numel() * 4 / 2 ** 20]))
        """ % (str(Path(__file__).parent), n))
    extra_file = grown[40000][1] - grown[10000][1]  # 55 MB more signals on disk
    assert grown[40000][0] - grown[10000][0] < extra_file / 4, grown


def test_heap_trim_returns_freed_pages():
    """What a training step leaves behind (freed blocks inside the heap) goes back to the kernel."""
    trimmed, freed, kept = _in_fresh_process("""
        from tgems.heap import trim
        blocks = [bytearray(b"x" * 100_000) for _ in range(1000)]  # 100 MB from the heap, every page touched
        del blocks[::2]  # 50 MB of holes between the kept blocks
        before = _resident_mb()
        trimmed = trim()
        print(json.dumps([trimmed, before - _resident_mb(), len(blocks)]))
    """)
    assert trimmed is True
    assert freed > 30
    assert kept == 500
