"""Ray Serve: the `tgems serve` app as a Serve deployment of N replicas behind Serve's HTTP proxy.

    tgems serve --engine ray --replicas 4 --classifier my_classifier/            # a local Ray
    RAY_ADDRESS=auto tgems serve --engine ray --replicas 4 --classifier ...      # a running Ray cluster

    from ray import serve
    from tgems.integrations.ray_serve import application
    from tgems.serve.models import ServeSettings
    serve.run(application({"clf": "my_classifier/"}, ServeSettings(replicas=4)), name="tgems")

    serve run tgems.integrations.ray_serve:build_app classifier=my_classifier/ replicas=4

Each replica is the very app of `tgems serve` (tgems.serve.app.create_app), built from the same sources and
ServeSettings: it loads the classifiers once, when it starts (Serve routes to it only then), and owns its
own depth-queue scheduler, so a replica's blocks run full batches of the requests routed to it. Routes,
answers, errors and limits are those of the local server; /metrics answers for the replica that took the
scrape. Installed with ``pip install "tgems[ray-serve]"``; nothing imports this module but `--engine ray`.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, fields, replace

from tgems.errors import TGEMError

APP_NAME = "tgems"
CONSTRUCTOR_RETRIES = 2  # a replica that fails to load is retried this often (Serve's default is 20)
EXTRA_HINT = 'tgems serve --engine ray needs the ray-serve extra: pip install "tgems[ray-serve]"'


def require_serve():
    """(ray, ray.serve), or one line naming the extra."""
    import logging
    import warnings

    try:
        with warnings.catch_warnings():  # Serve's own pydantic deprecations are no news to a tgems user
            warnings.simplefilter("ignore", DeprecationWarning)
            import ray
            import ray.serve as serve
        import starlette  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise TGEMError(f"{EXTRA_HINT} ({e.name} is missing)") from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this process logs its own lines
    return ray, serve


def replica_cpus(settings, cluster_cpus: float) -> float:
    """CPUs a replica reserves (Ray sets its torch threads to match): `settings.replica_cpus`, else an equal
    share of the cluster's CPUs, in whole CPUs when there is at least one per replica."""
    if settings.replica_cpus is not None:
        return float(settings.replica_cpus)
    share = cluster_cpus / settings.replicas
    return float(int(share)) if share >= 1 else round(share, 3)


def application(sources: dict, settings, cpus_per_replica: float = 1.0):
    """The Serve application (run it with `serve.run`): `settings.replicas` replicas of the `tgems serve`
    app on {name: classifier dir}, each reserving `cpus_per_replica` CPUs and, on a CUDA device, one GPU.
    Serve's proxy listens where Serve was started (`serve.start(http_options=...)`), not at settings.port."""
    _, serve = require_serve()
    settings = settings.check()
    sources = {name: str(path) for name, path in sources.items()}

    def build():
        """Runs in the replica: load the classifiers before the replica takes requests."""
        from tgems.serve.app import create_app
        from tgems.serve.models import build_served

        return create_app(settings=settings, models=build_served(sources, settings))

    options = dict(name=APP_NAME, num_replicas=settings.replicas,
                   # each request holds one image or more, so the scheduler's queue bound (429) is what limits
                   # a replica, as on the local server; the proxy holds at most as many again
                   max_ongoing_requests=settings.queue_size, max_queued_requests=settings.queue_size,
                   ray_actor_options={"num_cpus": cpus_per_replica,
                                      "num_gpus": 1 if str(settings.device).startswith("cuda") else 0})
    accepted = _deployment_options(serve)
    if "max_constructor_retry_count" in accepted:
        options["max_constructor_retry_count"] = CONSTRUCTOR_RETRIES
    if "backpressure_config" in accepted:  # a full proxy queue: 429 with Retry-After, as the scheduler's
        from ray.serve.config import BackpressureConfig

        options["backpressure_config"] = BackpressureConfig(status_code=429, retry_after_s=1)
    return serve.deployment(serve.ingress(build)(), **options).bind()


def build_app(args: dict):
    """`serve run tgems.integrations.ray_serve:build_app classifier=DIR [replicas=N ...]`: `classifier` is a
    directory, NAME=DIR, or several of them separated by commas; any other key is a ServeSettings field."""
    from tgems.serve.models import ServeSettings
    from tgems.serve.server import parse_sources

    args = dict(args)
    classifier = args.pop("classifier", None)
    values = classifier.split(",") if isinstance(classifier, str) else classifier
    settings = _settings_from(ServeSettings(), args).check()
    return application(parse_sources(values), settings, replica_cpus(settings, float(settings.replicas)))


@dataclass
class RayService:
    """A running deployment; `close()` deletes it, and shuts the local Ray down when it was started here."""

    url: str
    cpus_per_replica: float
    started_ray: bool

    def close(self):
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            serve.delete(APP_NAME)  # replicas finish their requests in flight while the proxy still answers
        finally:
            if self.started_ray:
                ray.shutdown()


def deploy(sources: dict, settings, log=None, on_ray=None) -> RayService:
    """Start `settings.replicas` replicas on the Ray cluster at RAY_ADDRESS, or on a local Ray of this
    machine's CPUs, with Serve's proxy on settings.host:settings.port; returns when every replica has loaded.
    `on_ray()` runs once Ray is up: `ray.init` installs its own SIGTERM handler, so handlers go in after it."""
    ray, serve = require_serve()
    log = log or (lambda m: None)
    settings = settings.check()
    _check_sources(sources)
    address = os.environ.get("RAY_ADDRESS") or None
    started = False
    if not ray.is_initialized():
        if address is None:
            from tgems.serve.server import _check_port
            from tgems.spec import available_cpus

            _check_port(settings.host, settings.port)  # before the seconds of starting Ray
            cpus = available_cpus()
            if settings.replica_cpus is not None:
                cpus = math.ceil(settings.replicas * replica_cpus(settings, cpus))
            _init(ray, address="local", num_cpus=cpus)
        else:
            _init(ray, address=address)
        started = True
    if on_ray is not None:
        on_ray()
    service = RayService(f"http://{settings.host}:{settings.port}", 0.0, started)
    try:
        service.cpus_per_replica = replica_cpus(settings, ray.cluster_resources().get("CPU", 1.0))
        serve.start(http_options={"host": settings.host, "port": settings.port})
        log(f"tgems serve: starting {settings.replicas} replica(s) on Ray "
            f"({service.cpus_per_replica:g} CPU{'' if service.cpus_per_replica == 1 else 's'} each; loading "
            f"{', '.join(sources)})")
        serve.run(application(sources, settings, service.cpus_per_replica), name=APP_NAME, route_prefix="/")
    except BaseException as e:
        if isinstance(e, TGEMError) or not isinstance(e, Exception):
            service.close()
            raise
        refused, reason = _reason("\n".join([str(e)] + _deployment_messages(serve)))
        service.close()
        raise TGEMError(reason if refused else f"the Ray Serve deployment failed: {reason}") from None
    return service


def run_ray_server(sources: dict, settings, log) -> int:
    """`tgems serve --engine ray`: deploy, then wait for SIGTERM or Ctrl-C; the replicas finish the requests in
    flight, Serve (and the local Ray) shut down, exit 0."""
    t0 = time.perf_counter()
    stop = threading.Event()
    previous = {}

    def catch(*signals):
        previous.update({s: signal.signal(s, lambda *a: stop.set()) for s in signals if s not in previous})

    try:  # a SIGTERM while the replicas load (the proxy may answer already) stops once they have; Ctrl-C aborts
        service = deploy(sources, settings, log, on_ray=lambda: catch(signal.SIGTERM))
    except BaseException:
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    catch(signal.SIGINT)
    try:
        log(f"tgems serve: ready: {settings.replicas} replica(s) on Ray, listening on {service.url} "
            f"({time.perf_counter() - t0:.1f} s)")
        while not stop.wait(0.5):
            pass
        log("tgems serve: stopping")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        service.close()
    log("tgems serve: stopped")
    return 0


# ---------------------------------------------------------------------------------------------- helpers


def _check_sources(sources: dict) -> None:
    """What can be said before Ray starts: each source is a saved classifier (its config reads)."""
    from tgems.artifacts import CLASSIFIER, read_config

    if not sources:
        raise TGEMError("give at least one --classifier DIR (a classifier saved by `tgems calibrate`)")
    for path in sources.values():
        read_config(os.path.expanduser(str(path)), CLASSIFIER)


def _settings_from(base, args: dict):
    names = {f.name: f for f in fields(base)}
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise TGEMError(f"unknown setting(s) {', '.join(unknown)} (use classifier= and {', '.join(names)})")
    given = {}
    for k, v in args.items():
        default = getattr(base, k)
        kind = type(default) if default is not None else (float if k == "replica_cpus" else
                                                           int if k == "max_inflight" else str)
        try:
            given[k] = kind(v) if isinstance(v, str) and kind is not str else v
        except ValueError:
            raise TGEMError(f"{k}={v!r} is not a {kind.__name__}") from None
    return replace(base, **given)


def _deployment_options(serve) -> set:
    import inspect

    try:
        return set(inspect.signature(serve.deployment).parameters)
    except (TypeError, ValueError):
        return set()


def _init(ray, **kwargs) -> None:
    import logging

    try:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level=logging.ERROR, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        where = f"at RAY_ADDRESS={kwargs['address']}" if kwargs.get("address") != "local" else "(local)"
        raise TGEMError(f"cannot reach a Ray cluster {where}: {_reason(e)[1]}") from None


def _deployment_messages(serve) -> list[str]:
    """What Serve says of the deployment: a replica that failed to start leaves its traceback here."""
    try:
        app = serve.status().applications.get(APP_NAME)
        return [d.message for d in app.deployments.values() if d.message] if app else []
    except Exception:  # Serve itself is gone: the exception has to do
        return []


def _reason(text) -> tuple[bool, str]:
    """(refused, one line) from a Serve failure: the TGEMError's line when a replica refused its input, else
    the last line that says something."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in reversed(lines):
        for marker in ("tgems.errors.TGEMError: ", "TGEMError: "):
            if marker in ln:
                return True, ln.split(marker, 1)[1]
    return False, lines[-1] if lines else "no reason given"
