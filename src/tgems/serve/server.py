"""Running the app on uvicorn for `tgems serve`: SIGTERM / Ctrl-C stop admitting, finish the requests in
flight (uvicorn's graceful shutdown), drain the scheduler queues (the app's lifespan) and exit 0."""
from __future__ import annotations

import signal
from pathlib import Path

from tgems.errors import TGEMError


def parse_sources(values) -> dict:
    """--classifier [NAME=]DIR, repeatable -> {name: dir}; the name defaults to the directory's name."""
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or "/" in name or not name:
            name, path = Path(v.rstrip("/")).name or v, v
        if name in out:
            raise TGEMError(f"two classifiers named '{name}' (give them names: --classifier NAME=DIR)")
        if not Path(path).expanduser().is_dir():
            raise TGEMError(f"--classifier {v}: {path} is not a directory")
        out[name] = path
    if not out:
        raise TGEMError("give at least one --classifier DIR (a classifier saved by `tgems calibrate`)")
    return out


def _check_port(host: str, port: int) -> None:
    """Refuse an address in use in one line, before minutes of loading (uvicorn would exit with its own log)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise TGEMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def default_threads(cpus: int) -> int:
    """Torch threads of a server on `cpus` CPUs: one CPU left to the HTTP loop and image decoding, at most 8.
    Why: on a busy 2-core machine two OpenMP threads ran the encoder up to 10x slower than one (each parallel
    operation waits for its descheduled thread), as batch jobs found for their workers."""
    return max(1, min(8, cpus - 1))


def set_threads(settings, log) -> int:
    """Set torch's thread count from `settings.threads` (else the default) and say so."""
    import os

    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = settings.threads or default_threads(cpus)
    torch.set_num_threads(n)
    why = "--threads" if settings.threads else "the default: one CPU left over, at most 8; --threads N to change"
    log(f"tgems serve: {n} torch thread{'s' if n > 1 else ''} on {cpus} CPUs ({why})")
    return n


def run_server(sources: dict, settings, log) -> int:
    try:
        import uvicorn

        from tgems.serve.app import create_app
    except ImportError as e:
        raise TGEMError(f"tgems serve needs the serve extra: pip install 'tgems[serve]' ({e.name} is missing)") from None
    settings = settings.check()
    _check_port(settings.host, settings.port)
    set_threads(settings, log)
    failed = []
    server = None

    def on_load_error(message):
        failed.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(sources, settings, log=log, on_load_error=on_load_error)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="on",
                            access_log=False)
    server = uvicorn.Server(config)
    log(f"tgems serve: listening on http://{settings.host}:{settings.port} (loading {', '.join(sources)})")
    # uvicorn re-raises the signal it stopped on once it is done; under this no-op a SIGTERM ends in exit 0
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        return 2
    if not server.started:
        raise TGEMError(f"could not listen on {settings.host}:{settings.port}")
    log("tgems serve: stopped")
    return 0
