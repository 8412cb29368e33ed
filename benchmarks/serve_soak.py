"""The soak phase of serve_load.py alone: a `tgems serve` process (depth queues, classifier calibrated to
budget 0.5) under a closed loop of one-image requests, its resident memory sampled as it goes.

serve_load.py runs the same soak after its closed- and open-loop phases; this runs only the soak, for
checking the server's memory where the whole benchmark does not fit the time (issue 30: on the shared
2-core CPU with other jobs the ViT-B/32 shape answered about 4 requests/s, 80 minutes for 20,000 requests;
alone on it, 15 requests/s, 22 minutes).

    python benchmarks/serve_soak.py --requests 3000 --json results/serve_soak.json            # ViT-B/32 shape
    python benchmarks/serve_soak.py --model embedded --requests 2000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b32", choices=("vit_b32", "embedded"))
    p.add_argument("--requests", type=int, default=3000,
                   help="one-image requests in the soak (the first tenth warms up)")
    p.add_argument("--seconds", type=float, default=3600.0, help="the soak's limit in seconds")
    p.add_argument("--batch", type=int, default=16, help="the server's --max-batch-size")
    p.add_argument("--clients", type=int, default=None, help="requests in flight (default: batch x layers + 2 batches)")
    p.add_argument("--n-calib", type=int, default=120)
    p.add_argument("--work", default="results/serve_soak_work")
    p.add_argument("--json")
    a = p.parse_args(argv)
    args = serve_load.parse_args(["--models", a.model, "--batch", str(a.batch), "--images-per-request", "1"])
    args.soak, args.soak_seconds = a.requests, a.seconds
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clf_dir, L, size, _ = serve_load.build(a.model, a.n_calib, work, False)
    args.clients = a.clients or a.batch * L + 2 * a.batch
    bodies = serve_load.request_bodies(args.pool, 1, size, args.seed + 1)
    server = serve_load.ServerProcess(clf_dir, "depth", args, work / f"server_{a.model}.log")
    try:
        server.wait_ready(args.ready_timeout)
        ready = server.rss_mb()
        out = serve_load.soak(server, bodies, args)
    finally:
        code = server.stop()
    out.update(model=a.model, batch=a.batch, in_flight=args.clients, rss_mb_ready=round(ready, 1),
               server_threads=args.server_threads, server_exit_code=code,
               minutes=round((time.perf_counter() - t0) / 60, 2))
    print(json.dumps({k: v for k, v in out.items() if k != "rss_samples"}, indent=1))
    if a.json:
        from tgems.io import write_json

        write_json(a.json, out)


if __name__ == "__main__":
    main()
