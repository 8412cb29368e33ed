"""Serving load over HTTP: `tgems serve` in a subprocess on 127.0.0.1, driven from this process over loopback.

Three modes, in one run, per model:
  exit        the depth-queue server (`--scheduler depth`), classifier calibrated to budget 0.5 (label-free)
  never_exit  the same server, every request asking for tau 2 (no row exits: the plain encoder's compute)
  drop        a second server with `--scheduler drop`: exit-and-drop micro-batches of up to --batch images
              (engine.run_early_exit; later blocks run on the rows that stay), same classifier and tau
Each mode: a closed loop (--clients concurrent clients, each sending its next request when the last is
answered; default enough rows to keep every layer's queue full) for sustained requests/s and images/s,
latency p50 / p95 / p99, and the mean batch occupancy per layer (read from the server's /metrics, counted
over the measured window only); then open-loop Poisson arrivals (seeded) at --loads x the exit mode's
closed-loop rate, for latency at a given offered load (timed from each request's scheduled arrival). Last, a
soak of --soak requests through the exit server: its resident memory (VmRSS of the server process alone)
after the first tenth of the soak and at the end.

Models: a ViT-B/32-shaped CLIP with random weights (224 px, 12 x 768; sample profiles, calibrated to budget
0.5 as batch_throughput.py does) and the shipped embedded model. Every phase is bounded in requests and in
seconds; the run prints an upper bound of its duration first, and an estimate once the first rate is known.
`--quick` runs every phase small on the embedded model (with `--models vit_b32`, a 12 x 64 tower of the same
input size stands in for ViT-B/32: it checks the code path, its figures mean nothing).

    python benchmarks/serve_load.py --quick --json /tmp/serve_load_quick.json     # 1.5 min on 2 shared cores
    python benchmarks/serve_load.py --json results/serve_load.json                 # the full run
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers.make_tiny_clip (through batch_throughput.vit_b32)
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("exit", "never_exit", "drop")
NEVER_EXIT_TAU = 2.0  # past every Jumper score: no row exits before the last layer
TARGETS = {"speedup_vs_never_exit": 1.6, "min_layer_occupancy": 0.9, "rss_growth": 0.05}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the model

def build(model: str, n_calib: int, work: Path, quick: bool, device: str = "cpu", dtype: str = "float32"):
    """(classifier directory, num_layers, image size, tau): the classifier calibrated to budget 0.5, saved."""
    import tgems

    out = work / f"{model}{'_quick' if quick else ''}_classifier"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = tgems.load_dataset(f"scenes:calib:{n_calib}", seed=0)
        if model == "embedded":
            bb = tgems.load_backbone("embedded", device=device, dtype=dtype)
            clf = tgems.EarlyExitClassifier(bb, "embedded:cls", calib.classes)
            clf = clf.calibrate(calib, budget=0.5, use_labels=False)
        elif model == "vit_b32":
            from batch_throughput import vit_b32

            from tgems.features import extract_features
            from tgems.training.jumper_fit import from_samples

            path = vit_b32(work / ("vit_quick" if quick else "vit_b32"), quick=quick)
            bb = tgems.load_backbone(path, device=device, dtype=dtype)
            feats = extract_features(bb, calib, rates=False, progress=False)
            clf = from_samples(bb, calib, k=4, feats=feats)  # sample profiles: speed needs no T-GEM fit
            clf = clf.calibrate(feats, budget=0.5, use_labels=False)
        else:
            raise SystemExit(f"unknown model {model!r} (embedded or vit_b32)")
    clf.save(out)
    return out, bb.num_layers, bb.image_size, clf.tau


def request_bodies(n_bodies: int, per_request: int, image_size: int, seed: int, tau=None) -> list[bytes]:
    """Pre-encoded /v1/tgems/classify JSON bodies of `per_request` scenes images each (JPEG at the model's input
    size, as a client would send a photo; the server decodes and preprocesses them)."""
    from PIL import Image

    import tgems

    data = tgems.load_dataset(f"scenes:test:{n_bodies * per_request}", seed=seed)
    uris = []
    for i in range(len(data)):
        img = data.pil(i).resize((image_size, image_size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        uris.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    params = {"top_k": 1} if tau is None else {"top_k": 1, "tau": tau}
    return [json.dumps({"inputs": uris[i:i + per_request], "parameters": params}).encode()
            for i in range(0, len(uris), per_request)]


# ---------------------------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`tgems serve` in its own process on 127.0.0.1 and a free port (so its RSS is the server's alone)."""

    def __init__(self, classifier: Path, scheduler: str, args, log_path: Path):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if args.server_threads:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        argv = [sys.executable, "-m", "tgems.cli", "serve", "--classifier", f"m={classifier}", "--host", "127.0.0.1",
                "--port", str(self.port), "--scheduler", scheduler, "--max-batch-size", str(args.batch),
                "--max-wait-ms", str(args.wait_ms), "--queue-size", str(args.queue_size),
                "--max-client-batch", str(max(args.images_per_request, 1)), "--device", args.device,
                "--dtype", args.dtype]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float):
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.tail()}")
            try:
                status, _ = asyncio.run(_one("GET", "/health", self.port))
                if status == 200:
                    return time.monotonic() - t
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready in {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        self._log.flush()
        return " | ".join(self.log_path.read_text().strip().splitlines()[-3:])

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def parse_counters(body: bytes) -> dict:
    """{'steps': [...], 'rows': [...]} per layer, from a /metrics body."""
    out = {"steps": {}, "rows": {}}
    for m in re.finditer(r'^tgems_layer_(steps|rows)_total\{layer="(\d+)",model="m"\} ([0-9.e+]+)$',
                         body.decode(), re.M):
        out[m.group(1)][int(m.group(2))] = float(m.group(3))
    L = max(out["steps"], default=0)
    return {k: [v.get(l, 0.0) for l in range(1, L + 1)] for k, v in out.items()}


def occupancy(before: dict, after: dict, batch: int) -> list:
    return [round((r1 - r0) / ((s1 - s0) * batch), 4) if s1 > s0 else None
            for s0, s1, r0, r1 in zip(before["steps"], after["steps"], before["rows"], after["rows"])]


# ---------------------------------------------------------------------------------------------- the client

class Connection:
    """A keep-alive HTTP/1.1 connection on asyncio streams: the smallest client, so that on a small machine
    the load generator takes as little CPU from the server as it can."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            status = int((await self.reader.readline()).split()[1])
            length, close = None, False
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "connection" and v.strip().lower() == "close":
                    close = True
            data = await (self.reader.readexactly(length) if length is not None else self.reader.read())
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            self.close()
            raise ConnectionError("the connection broke") from None
        if close or length is None:
            self.close()
        return status, data

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _one(method, path, port, body=b""):
    c = Connection(port)
    try:
        return await c.request(method, path, body)
    finally:
        c.close()


class Tally:
    """Latencies and answers of the requests of one phase."""

    def __init__(self):
        self.lat, self.codes, self.exit_layers, self.flops = [], {}, [], []

    def add(self, status, data, seconds):
        self.codes[status] = self.codes.get(status, 0) + 1
        if status != 200:
            return
        self.lat.append(seconds)
        for r in json.loads(data):
            self.exit_layers.append(r["exit_layer"])
            self.flops.append(r["flops_ratio"])

    def error(self, kind):
        self.codes[kind] = self.codes.get(kind, 0) + 1

    def summary(self, wall: float, per_request: int) -> dict:
        ms = np.array(self.lat) * 1000
        n = len(ms)
        pct = {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) if n else None for q in (50, 95, 99)}
        return {"requests": n, "seconds": round(wall, 3), "rps": round(n / wall, 3) if wall else None,
                "images_per_s": round(n * per_request / wall, 3) if wall else None, **pct,
                "errors": {str(k): v for k, v in self.codes.items() if k != 200},
                "mean_exit_layer": round(float(np.mean(self.exit_layers)), 3) if self.exit_layers else None,
                "flops_ratio": round(float(np.mean(self.flops)), 4) if self.flops else None}


async def closed_loop(port, bodies, clients, warm_requests, warm_s, requests, seconds, snap=None, on_done=None):
    """`clients` clients, each sending its next request when the last is answered. A warm-up (until
    `warm_requests` are answered or `warm_s` pass), then the measured window (until `requests` more are
    answered or `seconds` pass); `snap()` (awaited) is taken at both ends of the window, while the load is
    still on, before the clients stop and the requests in flight drain. Only answers that arrive inside the
    window count. (Tally, window seconds, (snap at start, snap at end))."""
    tally, answered, stop = Tally(), [0], [False]
    window = {}

    def inside():
        return "t0" in window and "t1" not in window

    async def client(k):
        conn, i = Connection(port), k
        try:
            while not stop[0]:
                t = time.perf_counter()
                try:
                    status, data = await conn.request("POST", "/v1/tgems/classify", bodies[i % len(bodies)])
                except ConnectionError:
                    if inside():
                        tally.error("connection")
                    await asyncio.sleep(0.01)
                    continue
                i += clients
                answered[0] += 1
                if inside():
                    tally.add(status, data, time.perf_counter() - t)
                if on_done:
                    on_done(answered[0])
        finally:
            conn.close()

    async def monitor():
        t = time.perf_counter()
        while answered[0] < warm_requests and time.perf_counter() - t < warm_s:
            await asyncio.sleep(0.02)
        s0 = await snap() if snap else None
        window["t0"], n0 = time.perf_counter(), answered[0]
        while answered[0] - n0 < requests and time.perf_counter() - window["t0"] < seconds:
            await asyncio.sleep(0.02)
        window["t1"] = time.perf_counter()
        s1 = await snap() if snap else None
        stop[0] = True
        return s0, s1

    tasks = [asyncio.ensure_future(client(k)) for k in range(clients)]
    snaps = await monitor()
    await asyncio.gather(*tasks)
    return tally, window["t1"] - window["t0"], snaps


async def open_loop(port, bodies, rate, seconds, max_requests, drain_s, seed):
    """Seeded Poisson arrivals at `rate` per second for `seconds` (at most `max_requests`); each request on an
    idle connection (or a new one). Latency from the scheduled arrival; requests still unanswered `drain_s`
    after the last arrival count as 'unfinished'. (Tally, seconds over which arrivals were offered)."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while len(times) < max_requests:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        times.append(t)
    tally, idle, tasks = Tally(), [], []
    t0 = time.perf_counter()

    async def one(k, at):
        # an idle connection the server has closed (its keep-alive timeout) is this client's doing, not the
        # server's: such a request goes once more on a new connection (a broken one reconnects)
        attempts = 2 if idle else 1
        conn = idle.pop() if idle else Connection(port)
        for attempt in range(attempts):
            try:
                status, data = await conn.request("POST", "/v1/tgems/classify", bodies[k % len(bodies)])
                break
            except ConnectionError:
                if attempt == attempts - 1:
                    tally.error("connection")
                    return
        tally.add(status, data, time.perf_counter() - t0 - at)
        idle.append(conn)

    for k, at in enumerate(times):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(k, at)))
    offered = max(times[-1] if times else seconds, 1e-9)
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=drain_s)
        for p in pending:
            p.cancel()
        if pending:
            tally.codes["unfinished"] = len(pending)
            await asyncio.gather(*pending, return_exceptions=True)
    for c in idle:
        c.close()
    return tally, offered


# ---------------------------------------------------------------------------------------------- one model

def closed_phase(server, bodies, args, per_request):
    """The closed loop, with the /metrics counters read at both ends of the measured window."""
    async def counters():
        return parse_counters((await _one("GET", "/metrics", server.port))[1])

    tally, wall, (before, after) = asyncio.run(closed_loop(
        server.port, bodies, args.clients, args.warmup_requests or 2 * args.clients, args.warmup_seconds,
        args.requests, args.seconds, counters))
    out = tally.summary(wall, per_request)
    occ = occupancy(before, after, args.batch)
    out["occupancy"] = occ
    out["min_layer_occupancy"] = min((o for o in occ if o is not None), default=None)
    return out


def bench(model, args, work, clock):
    t = time.perf_counter()
    clf_dir, L, size, tau = build(model, args.n_calib, work, args.quick, args.device, args.dtype)
    log(f"{model}: classifier calibrated to budget 0.5, tau {tau:.4f}, {L} layers "
        f"({time.perf_counter() - t:.0f} s)")
    k = args.images_per_request
    bodies = {"exit": request_bodies(args.pool, k, size, args.seed),
              "never_exit": request_bodies(args.pool, k, size, args.seed, tau=NEVER_EXIT_TAU)}
    bodies["drop"] = bodies["exit"]
    soak_bodies = request_bodies(args.pool, 1, size, args.seed + 1)
    if not args.clients:
        # enough rows that depth 0 always waits while every row past it is in flight: every layer full
        args.clients = math.ceil((args.batch * L + 2 * args.batch) / k)
    out = {"model": model, "num_layers": L, "image_size": size, "tau": tau, "batch": args.batch,
           "images_per_request": k, "clients": args.clients, "device": args.device, "dtype": args.dtype,
           "modes": {m: {} for m in MODES}}
    servers = {"depth": ServerProcess(clf_dir, "depth", args, work / f"server_{model}_depth.log"),
               "drop": ServerProcess(clf_dir, "drop", args, work / f"server_{model}_drop.log")}
    try:
        for s in servers.values():  # loading in parallel, measured one at a time
            s.wait_ready(args.ready_timeout)
        for s in servers.values():
            s.rss_ready = s.rss_mb()
        for mode in MODES:
            server = servers["drop" if mode == "drop" else "depth"]
            t = time.perf_counter()
            res = closed_phase(server, bodies[mode], args, k)
            out["modes"][mode]["closed"] = res
            log(f"  {mode:>10} closed loop ({args.clients} clients x {k} images): {res['rps']:.2f} req/s = "
                f"{res['images_per_s']:.1f} img/s, p50/p95/p99 {res['p50_ms']}/{res['p95_ms']}/{res['p99_ms']} ms, "
                f"FLOPs {res['flops_ratio']}, min layer occupancy {res['min_layer_occupancy']}, errors "
                f"{res['errors'] or 'none'} ({time.perf_counter() - t:.0f} s)")
            if mode == "exit":
                clock.estimate(res["rps"])
        base = out["modes"]["exit"]["closed"]["rps"]
        for mode in MODES:
            server = servers["drop" if mode == "drop" else "depth"]
            rows = []
            for frac in args.loads:
                rate = frac * base
                tally, offered = asyncio.run(open_loop(server.port, bodies[mode], rate, args.open_seconds,
                                                       args.open_requests, args.drain_seconds, args.seed))
                row = {"load": frac, "rate": round(rate, 3), **tally.summary(offered, k)}
                rows.append(row)
                log(f"  {mode:>10} open loop at {rate:.2f} req/s: p50/p95/p99 {row['p50_ms']}/{row['p95_ms']}/"
                    f"{row['p99_ms']} ms, {row['requests']} answered, errors {row['errors'] or 'none'}")
            out["modes"][mode]["open"] = rows
        out["soak"] = soak(servers["depth"], soak_bodies, args)
        log(f"  soak of {out['soak']['requests']} requests: server RSS {out['soak']['rss_mb_warm']:.0f} MB after "
            f"the first tenth -> {out['soak']['rss_mb_end']:.0f} MB ({out['soak']['rss_growth']:+.2%})")
        for name, s in servers.items():
            out[f"server_{name}_rss_mb_ready"] = round(s.rss_ready, 1)
    finally:
        for name, s in servers.items():
            out[f"server_{name}_exit_code"] = s.stop()
    c = {m: out["modes"][m]["closed"] for m in MODES}
    top = [r for r in out["modes"]["exit"]["open"] if r["p95_ms"] is not None]
    out["summary"] = {
        "rps_exit": c["exit"]["rps"], "rps_never_exit": c["never_exit"]["rps"], "rps_drop_batching": c["drop"]["rps"],
        "images_per_s_exit": c["exit"]["images_per_s"], "images_per_s_never_exit": c["never_exit"]["images_per_s"],
        "images_per_s_drop_batching": c["drop"]["images_per_s"],
        "speedup_vs_never_exit": _ratio(c["exit"]["rps"], c["never_exit"]["rps"]),
        "speedup_vs_drop": _ratio(c["exit"]["rps"], c["drop"]["rps"]),
        "p95_ms_exit": top[-1]["p95_ms"] if top else None, "p95_ms_exit_load": top[-1]["load"] if top else None,
        "p95_ms_exit_closed": c["exit"]["p95_ms"],
        "min_layer_occupancy": c["exit"]["min_layer_occupancy"],
        "min_layer_occupancy_drop": c["drop"]["min_layer_occupancy"],
        "flops_ratio_exit": c["exit"]["flops_ratio"], "rss_growth": out["soak"]["rss_growth"],
        "soak_requests": out["soak"]["requests"]}
    s = out["summary"]
    s["targets"] = {"speedup_vs_never_exit >= 1.6": _meets(s["speedup_vs_never_exit"], 1.6),
                    "min_layer_occupancy >= 0.9": _meets(s["min_layer_occupancy"], 0.9),
                    "rss_growth <= 0.05": None if s["rss_growth"] is None else s["rss_growth"] <= 0.05}
    return out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _meets(x, lo):
    return None if x is None else x >= lo


def soak(server, bodies, args) -> dict:
    """--soak one-image requests through the exit server (closed loop, as many rows in flight as the closed
    loop had): the server's RSS once the first tenth is answered (warm) and after the rest."""
    samples, every, warm_n = [], max(1, args.soak // 50), max(1, args.soak // 10)

    def on_done(answered):
        if answered % every == 0:
            samples.append((answered, round(server.rss_mb(), 1)))

    async def rss():
        return server.rss_mb()

    tally, wall, (warm, end) = asyncio.run(closed_loop(
        server.port, bodies, args.clients * args.images_per_request, warm_n, args.soak_seconds,
        args.soak - warm_n, args.soak_seconds, rss, on_done))
    res = tally.summary(wall, 1)
    return {"requests": res["requests"] + warm_n, "seconds": res["seconds"], "rps": res["rps"],
            "errors": res["errors"], "rss_mb_warm": round(warm, 1), "rss_mb_end": round(end, 1),
            "rss_mb_max": max([end, warm] + [m for _, m in samples]),
            "rss_growth": round((end - warm) / warm, 4), "rss_samples": samples}


# ---------------------------------------------------------------------------------------------- the run

class Clock:
    """The run's duration: an upper bound from the phase limits, an estimate from the first measured rate."""

    def __init__(self, args, n_models):
        self.args, self.n_models, self.t0 = args, n_models, time.perf_counter()
        a = args
        per_model = (a.ready_timeout + len(MODES) * (a.warmup_seconds + a.seconds + 60)
                     + len(MODES) * len(a.loads) * (a.open_seconds + a.drain_seconds) + a.soak_seconds + 120)
        log(f"serve_load: at most {n_models * per_model / 60:.0f} min by the phase limits ({n_models} model(s))")

    def estimate(self, rps_exit):
        a, k = self.args, self.args.images_per_request
        warm = a.warmup_requests or 2 * a.clients
        closed = sum(min(a.seconds, a.requests / max(rps_exit * f, 1e-9)) + min(a.warmup_seconds, warm
                     / max(rps_exit * f, 1e-9)) + a.clients / max(rps_exit * f, 1e-9)  # + the drain
                     for f in (1.0, 0.6, 0.8))  # never-exit and drop run slower
        open_ = len(MODES) * len(a.loads) * (min(a.open_seconds, a.open_requests / max(rps_exit * min(a.loads), 1e-9))
                                             + a.drain_seconds / 2)
        soak = min(a.soak_seconds, a.soak / max(rps_exit * k, 1e-9))
        log(f"serve_load: this model's phases take about {(closed + open_ + soak) / 60:.1f} min "
            f"(soak {soak / 60:.1f} min); {(time.perf_counter() - self.t0) / 60:.1f} min so far")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every phase small, the embedded model only unless "
                   "--models says otherwise (vit_b32 then is a 12 x 64 stand-in); about 1.5 minutes on 2 shared cores")
    p.add_argument("--models", default="vit_b32,embedded", help="comma-separated: vit_b32, embedded")
    p.add_argument("--batch", type=int, default=None, help="the servers' --max-batch-size (default: 64 on cuda, "
                   "16 on cpu)")
    p.add_argument("--wait-ms", type=float, default=5.0, help="the servers' --max-wait-ms")
    p.add_argument("--queue-size", type=int, default=4096, help="the servers' --queue-size")
    p.add_argument("--images-per-request", type=int, default=4)
    p.add_argument("--clients", type=int, default=None, help="closed-loop clients (default: enough to keep every "
                   "layer's queue full: (batch x layers + 2 batch) / images per request)")
    p.add_argument("--requests", type=int, default=20000, help="closed loop: requests measured, at most")
    p.add_argument("--seconds", type=float, default=120.0, help="closed loop: seconds measured, at most")
    p.add_argument("--warmup-requests", type=int, default=None, help="closed loop: answers before the window "
                   "opens (default: twice the clients, so the pipeline is full)")
    p.add_argument("--warmup-seconds", type=float, default=120.0, help="closed loop: the warm-up's limit")
    p.add_argument("--loads", default="0.3,0.6,0.9", help="open-loop rates, fractions of the exit mode's "
                   "closed-loop requests/s (the same offered load for every mode)")
    p.add_argument("--open-seconds", type=float, default=30.0, help="open loop: seconds of arrivals per rate")
    p.add_argument("--open-requests", type=int, default=20000, help="open loop: arrivals per rate, at most")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="open loop: wait for answers after the last "
                   "arrival, at most")
    p.add_argument("--soak", type=int, default=20000, help="one-image requests through the exit server for RSS")
    p.add_argument("--soak-seconds", type=float, default=3600.0, help="the soak's limit in seconds")
    p.add_argument("--pool", type=int, default=64, help="distinct request bodies per mode")
    p.add_argument("--n-calib", type=int, default=300, help="images for the sample profiles and calibration")
    p.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the servers (default on "
                   "cpu: every core but one, which the load generator keeps; two threads on a shared 2-core "
                   "machine ran the encoder up to 10x slower than one)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="the servers' --device (cpu or cuda)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--work", default="results/serve_load_work", help="scratch folder (gitignored)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.models = "embedded" if args.models == p.get_default("models") else args.models
        args.requests, args.seconds, args.warmup_seconds = 2000, 3.0, 3.0
        args.loads, args.open_seconds, args.open_requests, args.drain_seconds = "0.5", 2.0, 200, 10.0
        args.soak, args.soak_seconds, args.n_calib, args.pool = 400, 20.0, 60, 16
        args.batch = args.batch or 8
    args.batch = args.batch or (64 if args.device.startswith("cuda") else 16)
    if args.server_threads is None and not args.device.startswith("cuda"):
        args.server_threads = max(1, (os.cpu_count() or 2) - 1)
    args.loads = [float(x) for x in str(args.loads).split(",") if x]
    return args


def run(args) -> dict:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    clock = Clock(args, len(models))
    clients = args.clients
    results = []
    for m in models:
        args.clients = clients
        results.append(bench(m, args, work, clock))
    main = next((r for r in results if r["model"] == "vit_b32"), results[0])
    settings = {k: v for k, v in vars(args).items()}
    settings["clients"] = clients
    return {"bench": "serve_load", "quick": args.quick, "transport": "HTTP/1.1 on 127.0.0.1 (tgems serve subprocess)",
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "settings": settings,
            "model": main["model"], **main["summary"], "targets_asked": TARGETS,
            "minutes": round((time.perf_counter() - clock.t0) / 60, 2), "results": results}


def main():
    args = parse_args()
    report = run(args)
    keys = ("rps_exit", "rps_never_exit", "rps_drop_batching", "speedup_vs_never_exit", "p95_ms_exit",
            "min_layer_occupancy", "rss_growth")
    print(json.dumps({k: report[k] for k in ("model", *keys, "targets", "minutes")}, indent=1))
    if args.json:
        from tgems.io import write_json

        write_json(args.json, report)


if __name__ == "__main__":
    main()
