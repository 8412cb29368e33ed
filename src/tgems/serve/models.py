"""A served classifier: the saved classifier, the T-GEM modules that give profiles to other label sets, the
label-set caches and one depth-queue scheduler."""
from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

from tgems.errors import TGEMError
from tgems.options import (BATCH_SIZE, DELTA, DTYPES, ENGINES, SCHEDULERS, SEED_MAX, device_name, integer, number,
                           one_of)

LABEL_CACHE_SIZE = 64  # label sets whose text embeddings and profiles stay cached (LRU)


@dataclass(frozen=True)
class ServeSettings:
    """Every serving option and its default, once (the CLI's `serve` parser reads its defaults here), and its
    check: `check()`, which the CLI, `create_app`, `run_server` and Ray Serve all go through."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = BATCH_SIZE
    max_wait_ms: float = 5.0
    queue_size: int = 1024
    max_client_batch: int = 256
    max_body_mb: float = 64.0  # a request body past this is refused with 413 before it is read whole
    max_inflight: int | None = None  # default: max_batch_size * num_layers (see tgems.scheduling.depth)
    audit_rate: float = 0.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    tgem: str | None = None
    engine: str = "local"  # "ray": replicas of the same app on Ray Serve (tgems.integrations.ray_serve)
    replicas: int = 1  # engine "ray": Serve replicas, each with its own scheduler
    replica_cpus: float | None = None  # engine "ray": CPUs a replica reserves (default: an equal share)
    scheduler: str = "depth"  # "depth": depth queues (tgems.scheduling.depth); "drop": exit-and-drop micro-batches
    threads: int | None = None  # torch threads; default: serve.server.default_threads (one CPU left over)

    def check(self) -> "ServeSettings":
        """Every option checked with `tgems.options`' validators; returns the checked copy (numbers as floats)."""
        if not isinstance(self.host, str) or not self.host:
            raise TGEMError(f"host must be a name or an address, got {self.host!r}")
        integer(self.port, "--port", 0, 65535)
        integer(self.max_batch_size, "--max-batch-size", 1)
        integer(self.queue_size, "--queue-size", 1)
        integer(self.max_client_batch, "--max-client-batch", 1)
        if self.max_inflight is not None:
            integer(self.max_inflight, "--max-inflight", 1)
        integer(self.seed, "seed", 0, SEED_MAX)
        device_name(self.device)
        one_of(self.dtype, "dtype", DTYPES)
        one_of(self.engine, "engine", ENGINES)
        one_of(self.scheduler, "scheduler", SCHEDULERS)
        integer(self.replicas, "--replicas", 1)
        if self.threads is not None:
            integer(self.threads, "--threads", 1)
        fixed = {"max_wait_ms": number(self.max_wait_ms, "max-wait-ms", 0, math.inf, lo_open=False, hi_open=True),
                 "max_body_mb": number(self.max_body_mb, "max-body-mb", 0, math.inf, hi_open=True),
                 "audit_rate": number(self.audit_rate, "audit-rate", 0, 1, lo_open=False)}
        if self.replica_cpus is not None:
            fixed["replica_cpus"] = number(self.replica_cpus, "replica-cpus", 0, math.inf, hi_open=True)
        if self.scheduler == "drop" and fixed["audit_rate"]:
            raise TGEMError("the live audit runs on the depth queues: --audit-rate needs --scheduler depth")
        if self.engine == "ray" and self.threads:
            raise TGEMError("--threads is for the local server; with --engine ray a replica's threads follow "
                            "--replica-cpus")
        return replace(self, **fixed)


def load_served(name: str, path, device: str = "cpu", dtype: str = "float32"):
    """The classifier a server serves under `name`: built from a `PredictorSpec`, as every other entry point
    builds it (the same checks, the same backbone resolution of a saved classifier)."""
    from tgems.spec import PredictorSpec

    return PredictorSpec(classifier=str(path), device=device, dtype=dtype).check().build()


class ServedModel:
    """One named classifier behind the server: policies for any label set and goal, one scheduler."""

    def __init__(self, name: str, clf, settings: ServeSettings, tgem=None, log=None):
        """`settings` checked (`ServeSettings.check()`)."""
        from tgems.policies import NeverExit
        from tgems.scheduling.depth import DepthScheduler

        self.name, self.clf, self.backbone = name, clf, clf.backbone
        self.tgem = tgem
        cal = clf.calibration
        if settings.scheduler == "drop":
            from tgems.scheduling.drop import DropScheduler

            self.scheduler = DropScheduler(self.backbone, settings.max_batch_size, settings.max_wait_ms / 1000,
                                           settings.queue_size)
        else:
            self.scheduler = DepthScheduler(
                self.backbone, settings.max_batch_size, settings.max_inflight, settings.max_wait_ms / 1000,
                settings.queue_size, settings.audit_rate,
                cal.get("max_drop") if cal.get("goal") == "max_drop" else None,
                float(cal.get("delta", DELTA)), settings.seed, log)
        self._profiles = OrderedDict()
        self._policies = OrderedDict()
        self._lock = threading.Lock()
        self.never_exit = NeverExit()
        self.default_policy = clf.policy()

    # ------------------------------------------------------------------ description

    @property
    def calibrated_source(self) -> bool:
        return self.clf.calibration.get("source") == "calibrate"

    def describe(self) -> dict:
        clf, bb, cal = self.clf, self.backbone, self.clf.calibration
        return {"id": self.name, "object": "model", "owned_by": "tgems", "backbone": bb.name,
                "fingerprint": bb.fingerprint(), "num_layers": bb.num_layers, "embedding_dim": bb.embed_dim,
                "labels": clf.labels,
                "templates": clf.templates, "space": clf.profiles.space,
                "calibration": {k: cal.get(k) for k in ("goal", "budget", "max_drop", "delta", "tau", "source",
                                                        "n_calib", "labels_used") if k in cal},
                "other_label_sets": self.tgem is not None,
                "audit": self.scheduler.audit.summary()}

    def calibration_text(self) -> str:
        return self.clf.goal_text()

    # ------------------------------------------------------------------ label sets and goals

    def profiles(self, labels: tuple, templates: tuple):
        """(profiles, warnings) of a label set; the classifier's own, or made by the T-GEM modules and
        cached (LRU): text embeddings and profiles are computed once per label set and templates."""
        clf = self.clf
        if list(labels) == clf.labels and list(templates) == clf.templates:
            return clf.profiles, []
        key = (labels, templates)
        with self._lock:
            if key in self._profiles:
                self._profiles.move_to_end(key)
                return self._profiles[key]
        if self.tgem is None:
            raise TGEMError(f"model '{self.name}' serves only its own {len(clf.labels)} labels (with its "
                            f"templates): start the server with --tgem to serve other label sets")
        from tgems.profiles import check_readable_labels

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = check_readable_labels(self.backbone, list(labels), list(templates))
        value = (self.tgem.profiles(text, self.backbone), sorted({str(w.message) for w in caught}))
        with self._lock:
            self._profiles[key] = value
            while len(self._profiles) > LABEL_CACHE_SIZE:
                self._profiles.popitem(last=False)
        return value

    def policy(self, labels=None, templates=None, budget=None, max_drop=None, tau=None):
        """(policy, calibrated, notes, labels) for one request; a TGEMError says why a goal cannot be met. The
        goal matching and the policy are the classifier's; the label-set caches are the server's."""
        from tgems.calibration import check_tau

        clf = self.clf
        labels = tuple(labels or clf.labels)
        templates = tuple(templates or clf.templates)
        notes = []
        given = [k for k, v in (("budget", budget), ("max_drop", max_drop), ("tau", tau)) if v is not None]
        if len(given) > 1:
            raise TGEMError(f"give at most one of budget, max_drop and tau, got {' and '.join(given)}")
        for what, value in (("budget", budget), ("max_drop", max_drop)):
            if value is not None and not clf.meets_goal(**{what: value}):
                raise TGEMError(f"model '{self.name}' was not calibrated for {what} {value} (it holds "
                                f"{clf.goal_text()})")
        own = labels == tuple(clf.labels) and templates == tuple(clf.templates)
        if tau is not None:
            tau = check_tau(tau)
            notes.append("a hand-set tau: no calibrated guarantee")
        if not own:
            notes.append("a label set other than the calibrated one: the exits apply, the calibrated "
                         "guarantee does not")
        elif tau is None and not self.calibrated_source:
            notes.append("the threshold is the T-GEM checkpoint's default, not calibrated for this label set")
        calibrated = own and tau is None and self.calibrated_source
        tau = clf.tau if tau is None else tau
        if own and tau == clf.tau:
            return self.default_policy, calibrated, notes, list(labels)
        profiles, warned = self.profiles(labels, templates)
        notes += warned
        key = (labels, templates, tau)
        with self._lock:
            pol = self._policies.get(key)
            if pol is None:
                pol = clf.policy(tau, profiles)
                self._policies[key] = pol
                while len(self._policies) > LABEL_CACHE_SIZE:
                    self._policies.popitem(last=False)
            else:
                self._policies.move_to_end(key)
        return pol, calibrated, notes, list(labels)


def build_served(sources: dict, settings: ServeSettings, log=None) -> dict:
    """{name: ServedModel} from {name: classifier dir}. The T-GEM for other label sets: `settings.tgem`, or
    the shipped one of the classifier's space when it runs on the embedded model."""
    from tgems.tgem import load_tgem

    settings = settings.check()
    out = {}
    for name, path in sources.items():
        clf = load_served(name, path, settings.device, settings.dtype)
        spec = settings.tgem
        if spec is None and clf.backbone.name == "embedded":
            spec = f"embedded:{clf.profiles.space}"
        tgem = None
        if spec is not None:
            tgem, jumper, _ = load_tgem(spec, clf.backbone)
            if tgem.space != clf.profiles.space or list(tgem.layers) != list(clf.profiles.layers):
                raise TGEMError(f"--tgem {spec} ({tgem.space}, layers {tgem.layers}) does not match classifier "
                                f"'{name}' ({clf.profiles.space}, layers {clf.profiles.layers})")
        out[name] = ServedModel(name, clf, settings, tgem, log)
    return out
