"""The library calls of `tgems index` and `tgems search`: an early-exit index built from a data spec (a
built-in dataset, or a user's own images read as a stream), calibrated on a sample of it, and a saved index
searched by text or by image. The index itself, its maps and its exit rule are `tgems.retrieval`'s."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import tgems.artifacts as artifacts
from tgems.errors import TGEMError
from tgems.retrieval import NEVER, EarlyExitIndex, _check_k, calibrate_index, load_index_model, reference_texts
from tgems.spec import IndexSpec


STREAM_KINDS = ("folder", "webdataset", "wds", "parquet")  # indexed through tgems.jobs.sources


def is_stream_spec(spec) -> bool:
    """A user's own images (a folder of any layout, webdataset shards, parquet), read as a stream."""
    return isinstance(spec, str) and spec.strip().partition(":")[0].lower() in STREAM_KINDS


def sample_images(spec: str, n: int | None = None, seed: int = 0):
    """A Dataset of images named by a spec, for calibration or fitting the maps: the built-in datasets by
    `load_dataset`; a stream spec (`is_stream_spec`) as a seeded random sample of n of its items (all when n
    is None), read in two passes so only the sample is held. Labels of a stream are its source labels (a
    folder's first sub-folder, a sample's .txt) where they read as text, else -1; unreadable items are
    left out and counted in meta["skipped"]."""
    from tgems.data import load_dataset
    from tgems.data.dataset import Dataset
    from tgems.jobs.sources import open_source
    from tgems.jobs.readers import decode_records

    if not is_stream_spec(spec):
        return load_dataset(spec, n=n, seed=seed)
    source = open_source(spec)
    sizes = [s.size for s in source.shards]
    total = sum(sizes) if None not in sizes else sum(1 for s in source.shards for _ in source.records(s))
    pick = set(np.random.default_rng(seed).permutation(total)[:total if n is None else n].tolist())
    chosen, i = [], 0
    for shard in source.shards:
        for rec in source.records(shard):
            if i in pick:
                chosen.append(rec)
            i += 1
    items = [it for it in decode_records(chosen) if it.error is None]
    if not items:
        raise TGEMError(f"{spec}: none of the {len(chosen)} sampled images could be read")
    texts = sorted({it.source_label for it in items if it.source_label and any(c.isalpha() for c in it.source_label)})
    code = {t: j for j, t in enumerate(texts)}
    return Dataset(name=spec, images=[it.image for it in items],
                   labels=np.asarray([code.get(it.source_label, -1) for it in items], dtype=np.int64),
                   classes=texts, meta={"spec": spec, "ids": [it.id for it in items],
                                        "skipped": len(chosen) - len(items)})


def build_index(model: str = IndexSpec.model, index_model: str = IndexSpec.tgem, data: str = IndexSpec.data,
                out=None, progress: bool = False, **options) -> dict:
    """`index_images` from keywords: `options` are `IndexSpec`'s other fields (budget, max_drop, delta, rank,
    calib, n_calib, n, seed, device, dtype, workers)."""
    return index_images(IndexSpec(model=model, tgem=index_model, data=data, out=out, **options), progress)


def index_images(spec: IndexSpec, progress: bool = False) -> dict:
    """`tgems index`: calibrate tau (on `calib`, default a seeded random subset of the data itself: the
    rule is label-free), encode the data with early exit and write the index. Returns a summary dict.

    `folder:DIR` (any layout: flat or in sub-folders), `webdataset:PATTERN` and `parquet:PATH` are read as
    streams (`EarlyExitIndex.build_stream`): ids are relative paths, sample keys or the id column, and
    unreadable images are skipped and listed (the summary's `skipped`, the index's meta)."""
    from tgems.backbones import load_backbone
    from tgems.data import load_dataset
    from tgems.jobs.sources import open_source
    from tgems.features import extract_features

    s = spec.check()
    model, index_model, data, n, seed = s.model, s.tgem, s.data, s.n, s.seed
    budget, max_drop, calib, n_calib = s.budget, s.max_drop, s.calib, s.n_calib
    out = Path(s.out)
    if out.exists() and not (out.is_dir() and ((out / artifacts.INDEX.config).is_file() or not any(out.iterdir()))):
        raise TGEMError(f"{out} exists and is not a tgems index; refusing to replace it")
    bb = load_backbone(model, device=s.device, dtype=s.dtype)
    im = load_index_model(index_model, bb)
    stream = is_stream_spec(data)
    source = open_source(data) if stream else None
    ds = None if stream else load_dataset(data, n=n, seed=seed)
    calibration = {"goal": "model_default", "tau": im.config.get("tau", NEVER)}
    tau = None
    if budget is not None or max_drop is not None:
        if calib is not None or stream:
            cds = sample_images(calib or data, n_calib, seed)
        else:
            pick = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n_calib])
            cds = ds.subset(pick)
        feats = extract_features(bb, cds, progress=progress, desc="calibration features")
        text = bb.encode_text(reference_texts(cds)) if max_drop is not None else None
        tau, calibration = calibrate_index(im, feats.z, budget=budget, max_drop=max_drop, delta=s.delta,
                                           text=text, rank=s.rank, patch=feats.patch)
        calibration["calib"] = calib or f"{n_calib} images of {data} (seed {seed})"
    meta = {"data": data, "model": model, "index_model": str(index_model), "seed": seed}
    if stream:
        index = EarlyExitIndex.build_stream(bb, source, im, tau=tau, n=n, calibration=calibration, meta=meta,
                                            workers=s.workers, progress=progress)
    else:
        index = EarlyExitIndex.build(bb, ds, im, tau=tau, calibration=calibration, progress=progress, meta=meta)
    index.save(out)
    skipped = index.meta.get("skipped", [])
    return {"index": str(out), "images": len(index), "mean_layers": round(index.mean_layers, 4),
            "num_layers": bb.num_layers, "flops_ratio": round(index.flops_ratio, 4), "tau": index.tau,
            "calibration": calibration, "skipped": skipped}


def search(index_dir, query: str | None = None, image=None, k: int = 10, model: str | None = None,
           device="cpu", dtype="float32") -> dict:
    """`tgems search`: top-k of a text query or (with `image`) of a query image. Returns a dict.
    `model` None: the backbone the index was built with (its `--model`)."""
    from tgems.backbones import load_backbone

    k = _check_k(k)
    if (query is None) == (image is None):
        raise TGEMError("give a text query or --image, not both" if query is not None else "give a text query or --image")
    if query is not None and (not isinstance(query, str) or not query.strip()):
        raise TGEMError("the query is empty: give a non-empty text")
    path = Path(index_dir)
    header = artifacts.read_config(path, artifacts.INDEX)
    model = model or (header.get("meta") or {}).get("model") or header.get("backbone")
    bb = load_backbone(model, device=device, dtype=dtype)
    index = EarlyExitIndex.load(path, bb)
    hits = index.search_text(query, k) if query is not None else index.search_image(image, k)
    return {"index": str(path), "query": query if query is not None else str(image), "k": k,
            "hits": [{"rank": r + 1, "id": h.id, "score": round(h.score, 6), "exit_layer": h.exit_layer,
                      **({"path": index.path_of(h.id)} if index.path_of(h.id) else {})}
                     for r, h in enumerate(hits)]}


def summary_line(index: EarlyExitIndex, query: str = "a small red star near the top left", k: int = 3) -> str:
    """One line for the demo: the top hits of one text query and what the index cost."""
    hits = index.search_text(query, k)
    L = index.backbone.num_layers
    tops = ", ".join(f"{h.id} ({h.score:.3f}, layer {h.exit_layer})" for h in hits)
    return (f'retrieval: "{query}" -> {tops}; index of {len(index)} images at {index.mean_layers:.2f} of {L} layers, '
            f"FLOPs ratio {index.flops_ratio:.3f}")
