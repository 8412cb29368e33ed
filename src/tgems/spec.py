"""What a predictor is and what a job is, written once: every entry point (CLI file mode and stream mode,
`run_job` / `run_command` in Python, Ray, the service) builds a `PredictorSpec` (and a `JobSpec` for a
streamed job), checks it with `check()` and builds the classifier with `build()`.

Each option's default lives here (the CLI reads it from these dataclasses), every option is checked in
`check()`, and a job's fingerprint comes from the *built* predictor (`predictor_settings`): labels and
templates, goal and threshold, exit-module and Jumper weights, the backbone's fingerprint and dtype. So any
change that can change a row changes the fingerprint. This module imports no torch (the CLI parser and
`import tgems` stay light); `build()` does.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from tgems.errors import TGEMError
from tgems.options import (BATCH_SIZE, DELTA, DTYPES, ENGINES, NEVER_EXIT, SCHEDULERS, SEED_MAX, device_name, integer,
                           label_list, number, one_of)

DEFAULT_MODEL = "embedded"
DEFAULT_TGEM = "embedded:cls"
TASKS = ("classify", "embed")


@runtime_checkable
class Predictor(Protocol):
    """What a job, Ray's actors and the server run: class texts and `predict(images) -> Prediction` (labels,
    probabilities, exit layers, FLOPs, and the exit embeddings for the embed task). `build()` makes one; any
    object of this shape runs too."""

    labels: list

    def predict(self, images): ...


@runtime_checkable
class EarlyExitPredictor(Predictor, Protocol):
    """A predictor whose encoder a scheduler runs itself, block by block: its backbone and its exit policy."""

    backbone: object

    def policy(self): ...


def read_label_file(path) -> list[str]:
    """One class text per line (blank lines skipped)."""
    try:
        return [ln.strip() for ln in Path(path).expanduser().read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise TGEMError(f"cannot read labels file {path}: {getattr(e, 'strerror', None) or e}") from None


@dataclass(frozen=True)
class PredictorSpec:
    """A predictor: a saved `classifier` directory, or `model` + `tgem` + `labels` (+ `templates`); and a goal
    (`budget` or `max_drop` with `delta`, calibrated on `calib`, or a hand-set `tau`). Plain, frozen data: it
    travels to Ray actors and into `_SUCCESS`; `check()` returns a checked copy, `build()` makes the
    `EarlyExitClassifier` and keeps nothing.

    `model=None` means the default model, or, with a `classifier`, the backbone it was saved with (a given
    `model` is checked against the classifier's backbone fingerprint)."""

    classifier: str | None = None
    model: str | None = None
    tgem: str | None = None
    labels: list | None = None
    templates: list | None = None
    budget: float | None = None
    max_drop: float | None = None
    delta: float = DELTA
    calib: str | None = None
    tau: float | None = None
    label_free: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    @property
    def calibrated(self) -> bool:
        """Built with a calibration (a goal on --calib images), not only from the options."""
        return self.budget is not None or self.max_drop is not None

    def check(self) -> "PredictorSpec":
        """Every option checked once, before any model is loaded; returns the checked (normalised) copy."""
        fixed = {}
        if self.classifier is not None:
            fixed["classifier"] = str(self.classifier)
            if not Path(fixed["classifier"]).expanduser().is_dir():
                raise TGEMError(f"saved classifier {self.classifier} is not a directory")
            if self.labels:
                raise TGEMError("--classifier already holds its labels; drop --labels")
            if self.templates:
                raise TGEMError("--classifier already holds its templates; drop templates")
            if self.tgem is not None:
                raise TGEMError("--classifier already holds its T-GEM; drop --tgem")
        else:
            fixed["labels"] = label_list(self.labels)
            from tgems.artifacts import TGEM
            from tgems.pretrained import tgem_path

            tgem = tgem_path(self.tgem or DEFAULT_TGEM)
            if not (tgem / TGEM.config).is_file() or not (tgem / TGEM.tensors).is_file():
                raise TGEMError(f"{tgem} is not a T-GEM checkpoint (expected {TGEM.config} and {TGEM.tensors})")
        if self.templates is not None:
            fixed["templates"] = [str(t) for t in self.templates]
            if not fixed["templates"] or any("{}" not in t for t in fixed["templates"]):
                raise TGEMError("every template must hold {} where the label goes, e.g. 'a photo of {}'")
        if self.budget is not None and self.max_drop is not None:
            raise TGEMError("give --budget or --max-drop, not both")
        if self.tau is not None and self.calibrated:
            raise TGEMError("--tau sets the threshold directly; it cannot be combined with --budget/--max-drop")
        if self.calibrated and not self.calib:
            raise TGEMError("--budget/--max-drop need --calib SPEC (held-out images to calibrate on)")
        if self.calib and not self.calibrated:
            raise TGEMError("--calib is only used with --budget or --max-drop")
        if self.budget is not None:
            fixed["budget"] = number(self.budget, "budget", 0, 1)
        if self.max_drop is not None:
            fixed["max_drop"] = number(self.max_drop, "max-drop", 0, 1, hi_open=True)
        fixed["delta"] = number(self.delta, "delta", 0, 1, hi_open=True)
        if self.tau is not None:
            fixed["tau"] = number(self.tau, f"tau ({NEVER_EXIT:g} never exits early)", 0, NEVER_EXIT, lo_open=False)
        one_of(self.dtype, "dtype", DTYPES)
        device_name(self.device)
        integer(self.seed, "seed", 0, SEED_MAX)
        return replace(self, **fixed)

    def build(self, backbone=None, progress: bool = False, log=None):
        """The EarlyExitClassifier this spec describes (`backbone`: an already loaded one to use)."""
        from tgems.classifier import EarlyExitClassifier

        if backbone is None and (self.model is not None or self.classifier is None):
            from tgems.backbones import load_backbone

            backbone = load_backbone(self.model or DEFAULT_MODEL, device=self.device, dtype=self.dtype)
        if self.classifier is not None:
            clf = EarlyExitClassifier.load(self.classifier, backbone=backbone, device=self.device, dtype=self.dtype)
        else:
            from tgems.tgem import read_tgem_config

            read_tgem_config(self.tgem or DEFAULT_TGEM)
            clf = EarlyExitClassifier(backbone, self.tgem or DEFAULT_TGEM, self.labels, self.templates)
        if self.calibrated:
            from tgems.data import load_dataset

            calib = load_dataset(self.calib, seed=self.seed)
            if not self.label_free and (calib.labels >= 0).all():
                clf.match_labels(calib)  # its classes against the label set before minutes of encoding
            clf = clf.calibrate(calib, budget=self.budget, max_drop=self.max_drop,
                                delta=self.delta, use_labels=not self.label_free, progress=progress)
            if log:
                how = "on labels" if clf.calibration["labels_used"] else "label-free (agreement with the full model)"
                log(f"calibrated {clf.goal} {how} on {clf.calibration['n_calib']} images: tau {clf.tau:.4f}, "
                    f"{clf.calibration['calib_mean_layers']:.2f} mean layers")
        elif self.tau is not None:
            clf = clf.with_tau(self.tau)
        return clf

    def options(self) -> dict:
        """The options as plain data (what a Ray actor receives)."""
        return asdict(self)


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tensor_hash(h, tensors: dict) -> None:
    for k in sorted(tensors):
        v = tensors[k]
        h.update(k.encode())
        v = v.detach().cpu().float().contiguous() if hasattr(v, "detach") else v
        h.update(v.numpy().tobytes() if hasattr(v, "numpy") else repr(v).encode())


def predictor_settings(predictor) -> dict:
    """What makes a predictor's rows: its labels and templates, goal and threshold, the exit modules' and
    Jumper's weights (a hash), and its backbone's fingerprint and dtype. An object without exit modules
    (any `predict`-able thing) is fingerprinted by the state it holds."""
    profiles, jumper = getattr(predictor, "profiles", None), getattr(predictor, "jumper", None)
    if not (hasattr(profiles, "state") and hasattr(jumper, "state")):
        return _object_settings(predictor)
    h = hashlib.sha256()
    source = getattr(predictor, "profile_source", None)  # the modules' hash: bit-stable across thread counts
    if source is not None:
        h.update(f"modules {source}".encode())
    _tensor_hash(h, {**(profiles.state() if source is None else {}), **jumper.state()})
    h.update(json.dumps(profiles.config(), sort_keys=True, default=str).encode())
    bb = predictor.backbone
    return {"labels": list(predictor.labels), "templates": list(predictor.templates), "goal": predictor.goal,
            "tau": float(f"{float(predictor.tau):.6g}"),  # a calibrated tau moves in the last bits with the threads
            "weights": h.hexdigest()[:16], "backbone": bb.fingerprint(),
            "backbone_name": str(bb.name), "dtype": str(bb.dtype).replace("torch.", "")}


def _object_settings(predictor) -> dict:
    """A fingerprint of any predictor object: its labels, threshold and the tensors it holds."""
    h = hashlib.sha256()

    def feed(obj, depth=0):
        if depth > 3:
            return
        if hasattr(obj, "state_dict") and callable(obj.state_dict):
            _tensor_hash(h, obj.state_dict())
        elif hasattr(obj, "detach") and hasattr(obj, "cpu"):
            h.update(obj.detach().float().cpu().numpy().tobytes())
        elif hasattr(obj, "tobytes"):
            h.update(obj.tobytes())
        elif isinstance(obj, (int, float, str, bool)) or obj is None:
            h.update(repr(obj).encode())
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                feed(v, depth + 1)
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                feed(obj[k], depth + 1)
        elif hasattr(obj, "__dict__"):
            feed(vars(obj), depth + 1)

    for name in ("labels", "tau", "goal", "profiles", "jumper"):
        h.update(name.encode())
        feed(getattr(predictor, name, None))
    desc = {"type": type(predictor).__name__, "labels": list(getattr(predictor, "labels", []))}
    fp = getattr(getattr(predictor, "backbone", None), "fingerprint", None)
    if callable(fp):
        desc["backbone"] = fp()
    desc["state"] = h.hexdigest()[:16]
    return desc


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class JobSpec:
    """A streamed job: the input `data` spec, the output directory, the task, the encoder `batch_size`, and
    how it runs (decoding `workers`, the `engine` and its Ray options, the reader's options). `scheduler`:
    "drop" runs one micro-batch at a time, its later blocks on the rows that have not exited; "depth" keeps
    every block's batch full, refilled from the stream (for accelerators; on a CPU the two measured equally
    fast, docs/batch.md)."""

    data: str
    out: str
    task: str = "classify"
    batch_size: int = BATCH_SIZE
    workers: int = 2
    engine: str = "local"
    address: str | None = None
    concurrency: int | None = None  # Ray actors; None: chosen from the cluster's CPUs (or GPUs)
    num_gpus: float = 0.0
    image_column: str | None = None
    id_column: str | None = None
    block: int | None = None
    scheduler: str = "drop"

    def check(self) -> "JobSpec":
        """Every option checked; returns the checked copy (`out` a string, `workers` at most the CPUs)."""
        if not self.data or not self.out:
            raise TGEMError("a streamed job needs both --data SPEC and --out DIR")
        if self.task not in TASKS:
            raise TGEMError(f"unknown task '{self.task}' (use one of {', '.join(TASKS)})")
        if self.engine not in ENGINES:
            raise TGEMError(f"unknown engine '{self.engine}' (use {' or '.join(ENGINES)})")
        if self.scheduler not in SCHEDULERS:
            raise TGEMError(f"unknown scheduler '{self.scheduler}' (use {' or '.join(SCHEDULERS)})")
        integer(self.batch_size, "batch size", 1)
        integer(self.workers, "--workers (decoding processes; 0 decodes in a thread)", 0)
        workers, cpus = self.workers, available_cpus()
        if workers > cpus:
            warnings.warn(f"--workers {workers} is more than the {cpus} CPUs here; using {cpus} workers",
                          stacklevel=2)
            workers = cpus
        if self.concurrency is not None:
            integer(self.concurrency, "--concurrency (Ray actors)", 1)
        if self.block is not None:
            integer(self.block, "--block (files per part)", 1)
        return replace(self, out=str(self.out), workers=workers,
                       num_gpus=number(self.num_gpus, "--num-gpus", 0, 1024, lo_open=False))

    def reader_options(self) -> dict:
        return {"block": self.block, "image_column": self.image_column, "id_column": self.id_column}


@dataclass(frozen=True)
class IndexSpec:
    """`tgems index`: the images to encode with early exit into a retrieval index, with which maps and to what
    goal (`budget`, or `max_drop` with `delta` and `rank`, calibrated on `calib` or on `n_calib` images of the
    data). `check()` returns the checked copy; `tgems.indexing.index_images` builds the index."""

    data: str = "scenes:testall"
    out: str | None = None
    model: str = DEFAULT_MODEL
    tgem: str = "embedded:retrieval"  # retrieval maps + scorer: the shipped ones, or a `tgems index-fit` directory
    n: int | None = None
    budget: float | None = None
    max_drop: float | None = None
    delta: float = DELTA
    rank: int = 1
    calib: str | None = None
    n_calib: int = 2000
    workers: int | None = None  # decoding processes of streamed data (default: as streamed jobs)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def check(self) -> "IndexSpec":
        if self.budget is not None and self.max_drop is not None:
            raise TGEMError("give --budget or --max-drop, not both")
        if self.out is None:
            raise TGEMError("give an output directory for the index")
        fixed = {"out": str(self.out), "tgem": str(self.tgem), "delta": number(self.delta, "delta", 0, 1, hi_open=True)}
        if self.budget is not None:
            fixed["budget"] = number(self.budget, "budget", 0, 1)
        if self.max_drop is not None:
            fixed["max_drop"] = number(self.max_drop, "max-drop", 0, 1, hi_open=True)
        integer(self.rank, "--rank", 1)
        integer(self.n_calib, "--n-calib", 1)
        if self.n is not None:
            integer(self.n, "--n", 1)
        if self.workers is not None:
            integer(self.workers, "--workers (decoding processes; 0 decodes in a thread)", 0)
        integer(self.seed, "seed", 0, SEED_MAX)
        one_of(self.dtype, "dtype", DTYPES)
        device_name(self.device)
        return replace(self, **fixed)


PREDICTOR_FIELDS = tuple(f.name for f in fields(PredictorSpec))
INDEX_FIELDS = tuple(f.name for f in fields(IndexSpec))
JOB_FIELDS = tuple(f.name for f in fields(JobSpec))


def default(name: str, *specs):
    """An option's default, from the spec that defines it (for the CLI's argparse; `specs`: where to look,
    by default PredictorSpec and JobSpec)."""
    for cls in specs or (PredictorSpec, JobSpec):
        for f in fields(cls):
            if f.name == name:
                return f.default
    raise KeyError(name)


def specs_from_options(**options) -> tuple[PredictorSpec, JobSpec | None]:
    """Keyword options (`run_command`'s, the CLI's) -> (PredictorSpec, JobSpec or None when neither `data`
    nor `out` is given), unchecked; an unknown option is an error; `labels_file` is read into `labels`."""
    labels_file = options.pop("labels_file", None)
    if labels_file:
        if options.get("labels"):
            raise TGEMError("give --labels or --labels-file, not both")
        options["labels"] = read_label_file(labels_file)
    unknown = sorted(set(options) - set(PREDICTOR_FIELDS) - set(JOB_FIELDS))
    if unknown:
        raise TGEMError(f"unknown option(s): {', '.join(unknown)}")
    pred = PredictorSpec(**{k: v for k, v in options.items() if k in PREDICTOR_FIELDS})
    job_opts = {k: v for k, v in options.items() if k in JOB_FIELDS and v is not None}
    job = JobSpec(**{"data": None, "out": None, **job_opts}) if job_opts.get("data") or job_opts.get("out") else None
    return pred, job
