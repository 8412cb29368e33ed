"""Readers: decode AND preprocess images in worker processes, hand them to the encoder in order.

A reader thread walks the source's records and sends chunks of them to `workers` processes; each
worker reads the file (folder inputs), decodes it and, given the backbone's `ImageGeometry`, resizes
and crops it, so what comes back is a model-size uint8 array (a 1080p photo crosses the process
boundary as 224x224x3, not as 6 MB). The main process only normalises and batches.

The workers are plain child processes fed over their stdin and answering on their stdout (no
multiprocessing pool, so no semaphores for a resource tracker to report when the job is killed).
They exit quietly when their parent dies: at once on Linux (PR_SET_PDEATHSIG), else at the end of
their current chunk (end of file on stdin, or a broken pipe on stdout).
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from tgems.jobs.sources import Chunk, Item, StreamSource, _one_line, decode_image
from tgems.errors import TGEMError
from tgems.options import BATCH_SIZE

STAGES = ("read_s", "decode_s", "preprocess_s", "reader_wait_s", "wait_s")
_HEADER = struct.Struct("!Q")


def prepare_records(records: list, geometry=None) -> tuple[list, dict]:
    """Worker task: Records -> Items (never raises for a bad item) and the seconds spent per stage.

    With a geometry, each image is resized and cropped here to the encoder's input (a uint8 array);
    without one, it stays a decoded RGB PIL image."""
    out, spent = [], {"read_s": 0.0, "decode_s": 0.0, "preprocess_s": 0.0}
    clock = time.perf_counter
    for r in records:
        if r.error is not None:
            out.append(Item(r.id, None, r.source_label, r.error))
            continue
        data = r.data
        try:
            if r.path is not None:
                t = clock()
                try:
                    data = Path(r.path).read_bytes()
                except OSError as exc:
                    raise ValueError(f"cannot read file: {exc.strerror or _one_line(exc)}") from None
                finally:
                    spent["read_s"] += clock() - t
            t = clock()
            try:
                image = decode_image(data)
            finally:
                spent["decode_s"] += clock() - t
            if geometry is not None:
                t = clock()
                try:
                    image = geometry.apply(image)
                except TGEMError as exc:
                    raise ValueError(f"cannot encode image: {exc}") from None
                finally:
                    spent["preprocess_s"] += clock() - t
            out.append(Item(r.id, image, r.source_label))
        except ValueError as exc:
            out.append(Item(r.id, None, r.source_label, str(exc)))
    return out, spent


def decode_records(records: list) -> list:
    """Records -> decoded Items (PIL images); the reader without preprocessing."""
    return prepare_records(records)[0]


# ------------------------------------------------------------------------------------- worker processes


def _send(f, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_HEADER.pack(len(data)))
    f.write(data)
    f.flush()


def _recv(f):
    """One message from our own child or parent over a pipe (never from disk)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def _die_with_parent(parent: int):
    """Be killed when the parent process dies (Linux), and leave now if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)


def worker_main(parent: int):
    """A decoding worker: (records, geometry) in on stdin, (items, seconds) out on stdout, until end of file."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the answers
    code = 0
    try:
        while True:
            records, geometry = _recv(inp)
            _send(out, prepare_records(records, geometry))
    except (EOFError, OSError, KeyboardInterrupt):  # parent gone or done with us (BrokenPipe is an OSError)
        pass
    except BaseException as exc:  # a bug, not a bad image: say it in one line; the parent reports the exit
        print(f"tgems decoding worker: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)  # no interpreter teardown: nothing left to flush into a dead pipe


class WorkerPool:
    """`n` decoding processes; task k goes to worker k % n, and each answers in the order it was asked."""

    def __init__(self, n: int):
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # the workers import this very tgems
        env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [env.get("PYTHONPATH")] if p])
        code = f"from tgems.jobs.readers import worker_main; worker_main({os.getpid()})"
        self.procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=env, close_fds=True) for _ in range(n)]

    def send(self, k: int, task):
        proc = self.procs[k % len(self.procs)]
        try:
            _send(proc.stdin, task)
        except (BrokenPipeError, ValueError):  # ValueError: closed by close() while the job stops
            raise self._stopped(proc) from None

    def recv(self, k: int):
        proc = self.procs[k % len(self.procs)]
        try:
            return _recv(proc.stdout)
        except EOFError:
            raise self._stopped(proc) from None

    @staticmethod
    def _stopped(proc) -> TGEMError:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = "none yet"
        return TGEMError(f"a decoding worker stopped (exit code {code}); rerun the job to resume it")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # first: a thread blocked writing to it is released by the broken pipe
        for p in self.procs:
            p.wait()
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass


# ------------------------------------------------------------------------------------- the reader


_END = object()


def _tasks(source: StreamSource, shards, chunk_size: int):
    for shard in shards:
        buf = []
        for rec in source.records(shard):
            buf.append(rec)
            if len(buf) == chunk_size:
                yield shard, buf, False
                buf = []
        yield shard, buf, True  # possibly empty: it closes the shard


def stream_chunks(source: StreamSource, shards=None, *, chunk_size: int = BATCH_SIZE, workers: int = 2,
                  prefetch: int | None = None, geometry=None, stats: dict | None = None) -> Iterator[Chunk]:
    """Decoded (and, with `geometry`, preprocessed) chunks of the given shards, in order.

    A reader thread reads the raw items and hands chunks to `workers` processes (or decodes them itself
    when workers is 0); at most `prefetch` chunks are in flight, so memory stays bounded whatever the size
    of the input. `stats`, when given, accumulates seconds per stage (STAGES; worker stages are summed
    over the workers, so they can exceed the wall time).
    """
    shards = list(source.shards if shards is None else shards)
    workers = max(0, int(workers))
    prefetch = max(1, int(prefetch or 2 * max(1, workers)))
    stats = {} if stats is None else stats
    for k in STAGES:
        stats.setdefault(k, 0.0)
    mine = dict.fromkeys(("read_s", "reader_wait_s"), 0.0)  # the reader thread's, merged at the end
    pool = WorkerPool(workers) if workers > 0 and shards else None
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    clock = time.perf_counter

    def put(x):
        t = clock()
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                break
            except queue.Full:
                continue
        mine["reader_wait_s"] += clock() - t

    def reader():
        try:
            tasks = _tasks(source, shards, chunk_size)
            seq = 0
            while not stop.is_set():
                t = clock()
                task = next(tasks, None)
                mine["read_s"] += clock() - t
                if task is None:
                    break
                shard, recs, last = task
                if pool is not None:
                    t = clock()
                    pool.send(seq, (recs, geometry))
                    mine["reader_wait_s"] += clock() - t  # blocked only while the worker's pipe is full
                    put((shard, seq, last))
                else:
                    put((shard, prepare_records(recs, geometry), last))
                seq += 1
        except BaseException as exc:  # surfaces in the consumer
            put(exc)
            return
        put(_END)

    t = threading.Thread(target=reader, name="tgems-reader", daemon=True)
    t.start()
    try:
        while True:
            t0 = clock()
            got = q.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            shard, res, last = got
            items, spent = pool.recv(res) if pool is not None else res
            stats["wait_s"] += clock() - t0
            for k, v in spent.items():
                stats[k] += v
            yield Chunk(shard, items, last)
    finally:
        stop.set()
        if pool is not None:
            pool.close()
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        for k, v in mine.items():
            stats[k] += v


def iter_items(source: StreamSource, **kw) -> Iterator[Item]:
    """Every decoded item of a source in order (convenience for small sources and tests)."""
    for chunk in stream_chunks(source, **kw):
        yield from chunk.items


__all__ = ["stream_chunks", "iter_items", "prepare_records", "decode_records", "WorkerPool", "STAGES"]
