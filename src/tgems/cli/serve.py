"""`tgems serve`: the HTTP service (its options are `ServeSettings`')."""
from __future__ import annotations

import sys

from tgems.cli.common import positive_float, positive_int, seed_value, unit_interval, placement
from tgems.errors import TGEMError
from tgems.options import ENGINES, SCHEDULERS


def cmd_serve(args):
    from dataclasses import replace

    from tgems.serve.models import ServeSettings
    from tgems.serve.server import parse_sources, run_server

    ray_only = {k: getattr(args, k) for k in ("replicas", "replica_cpus") if getattr(args, k) is not None}
    if ray_only and args.engine != "ray":
        flags = " and ".join("--" + k.replace("_", "-") for k in ray_only)
        raise TGEMError(f"{flags} {'needs' if len(ray_only) == 1 else 'need'} --engine ray")
    settings = replace(ServeSettings(), **ray_only, **{k: getattr(args, k) for k in (
        "host", "port", "max_batch_size", "max_wait_ms", "queue_size", "max_client_batch", "max_inflight",
        "audit_rate", "seed", "device", "dtype", "tgem", "engine", "max_body_mb", "scheduler", "threads")}).check()
    sources, log = parse_sources(args.classifier), lambda msg: print(msg, file=sys.stderr, flush=True)
    if settings.engine == "ray":
        from tgems.integrations.ray_serve import run_ray_server

        return run_ray_server(sources, settings, log)
    return run_server(sources, settings, log)


def add_parsers(sub):
    from tgems.serve.models import ServeSettings

    sd = ServeSettings()
    sv = sub.add_parser("serve", help="HTTP service: classify and embed images with early exit (tgems[serve])")
    sv.add_argument("--classifier", action="append", metavar="[NAME=]DIR",
                    help="a saved classifier (tgems calibrate); repeat with NAME=DIR to serve several")
    sv.add_argument("--tgem", default=sd.tgem, help="T-GEM checkpoint that gives other label sets their profiles "
                    "(default: the shipped one on the embedded model, else only the saved labels)")
    sv.add_argument("--host", default=sd.host, help=f"default {sd.host} (loopback only)")
    sv.add_argument("--port", type=int, default=sd.port)
    sv.add_argument("--max-batch-size", type=positive_int, default=sd.max_batch_size,
                    help="rows per block step (default %(default)s)")
    sv.add_argument("--max-wait-ms", type=float, default=sd.max_wait_ms,
                    help="longest a partial batch waits for more rows (default %(default)s)")
    sv.add_argument("--max-inflight", type=positive_int, default=sd.max_inflight,
                    help="rows past layer 0 at once (default: max batch size x layers)")
    sv.add_argument("--queue-size", type=positive_int, default=sd.queue_size,
                    help="images waiting to enter; more are refused with 429 (default %(default)s)")
    sv.add_argument("--max-client-batch", type=positive_int, default=sd.max_client_batch,
                    help="images in one request; more are refused with 413 (default %(default)s)")
    sv.add_argument("--max-body-mb", type=positive_float("max-body-mb"), default=sd.max_body_mb,
                    help="largest request body in MB; a larger one is refused with 413 (default %(default)s)")
    sv.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=sd.scheduler,
                    help="depth: depth queues, every block on a full batch (default); drop: exit-and-drop "
                    "micro-batches, for comparison")
    sv.add_argument("--audit-rate", type=unit_interval("audit-rate"), default=sd.audit_rate,
                    help="fraction of early exits also run to full depth to check the guarantee live (seeded)")
    sv.add_argument("--engine", default=sd.engine, choices=ENGINES,
                    help="local (default) or ray: replicas on Ray Serve (the cluster at RAY_ADDRESS, else a local Ray)")
    sv.add_argument("--replicas", type=positive_int, help=f"--engine ray: replicas (default {sd.replicas})")
    sv.add_argument("--replica-cpus", type=float, help="--engine ray: CPUs per replica (default: an equal share)")
    sv.add_argument("--threads", type=positive_int, default=sd.threads,
                    help="torch threads (default: the CPUs less one, at most 8; said at startup)")
    sv.add_argument("--quiet", action="store_true")
    sv.add_argument("--seed", type=seed_value, default=sd.seed)
    placement(sv)
    sv.set_defaults(func=cmd_serve)
