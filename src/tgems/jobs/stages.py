"""The stage functions a job's encoder runs, shared by the runner (micro-batches), the depth queues
(`tgems.jobs.depth`) and Ray's actors: what the readers may resize and crop (`reader_geometry`), what the
predictor takes (`encoder_input`), and a Prediction as the part's columns (`prediction_table`)."""
from __future__ import annotations

import time

from tgems.errors import TGEMError
from tgems.jobs.writer import TOP_K, result_schema


def reader_geometry(predictor):
    """The resize / crop the readers may apply for this predictor: its backbone's own, or None (a predictor
    without a backbone transform gets decoded PIL images, as before)."""
    transform = getattr(getattr(predictor, "backbone", None), "transform", None)
    if transform is None or not hasattr(transform, "normalize"):
        return None
    return getattr(transform, "geometry", None)


def encoder_input(predictor, images):
    """Images as the readers give them -> what `predictor.predict` takes: normalised pixels when every image
    is already a model-size array (the readers applied the backbone's geometry), else the images as they are."""
    import numpy as np

    geometry = reader_geometry(predictor)
    if geometry is not None and images and all(isinstance(im, np.ndarray) and im.ndim == 3 for im in images):
        shape = images[0].shape
        if shape[:2] == tuple(geometry.crop_size) and all(im.shape == shape for im in images):
            bb = predictor.backbone
            return bb.transform.normalize(np.stack(images), bb.device)
    return images


def exit_embeddings(pred):
    """The readout z at each image's exit layer (`Prediction.embeddings`), for the embed task."""
    import numpy as np

    emb = getattr(pred, "embeddings", None)
    if emb is None:
        raise TGEMError("the predictor's Prediction carries no embeddings (the embed task needs them)")
    return np.asarray(emb, dtype=np.float32)


def predict_table(predictor, images, ids, source_labels, task: str):
    """Run the predictor on images (PIL images, uint8 arrays, or normalised pixels) and return the part
    columns as a pyarrow Table."""
    return prediction_table(predictor, predictor.predict(images), ids, source_labels, task)


def prediction_table(predictor, pred, ids, source_labels, task: str):
    """A Prediction -> the part columns as a pyarrow Table."""
    import numpy as np

    import pyarrow as pa

    exit_layers = np.asarray(pred.exit_layers, dtype=np.int16)
    flops_ratio = np.asarray(pred.flops_ratio, dtype=np.float32)
    cols = {"id": pa.array([str(i) for i in ids], pa.string()),
            "source_label": pa.array(list(source_labels), pa.string())}
    if task == "classify":
        probs = np.asarray(pred.probs, dtype=np.float32)
        idx = np.asarray(pred.indices, dtype=np.int64)
        k = min(TOP_K, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        labels = list(predictor.labels)
        cols.update(label=pa.array(list(pred.labels), pa.string()), label_index=pa.array(idx.astype(np.int32)),
                    probability=pa.array(probs[np.arange(len(idx)), idx]),
                    top5_labels=pa.array([[labels[j] for j in row] for row in order], pa.list_(pa.string())),
                    top5_probs=pa.array(list(np.take_along_axis(probs, order, 1)), pa.list_(pa.float32())))
    else:
        emb = exit_embeddings(pred)
        cols["embedding"] = pa.array(list(emb), pa.list_(pa.float32()))
    cols.update(exit_layer=pa.array(exit_layers), flops_ratio=pa.array(flops_ratio))
    return pa.table(cols, schema=result_schema(task))


def predict_items(predictor, items, task: str, stats: dict | None = None):
    """Decoded items (good ones) -> (table, [(id, reason)]). A batch the predictor refuses is retried image
    by image, so one odd image (say, smaller than the crop) is an error record, not a failed job."""
    if not items:
        return None, []
    stats = {} if stats is None else stats
    clock = time.perf_counter
    t = clock()
    inputs = encoder_input(predictor, [it.image for it in items])
    t1 = clock()
    stats["normalize_s"] = stats.get("normalize_s", 0.0) + t1 - t
    try:
        try:
            return predict_table(predictor, inputs, [it.id for it in items], [it.source_label for it in items],
                                 task), []
        except TGEMError as e:
            if len(items) == 1:
                return None, [(items[0].id, f"cannot encode image: {e}")]
        import pyarrow as pa

        tables, errors = [], []
        for i, it in enumerate(items):
            try:
                tables.append(predict_table(predictor, inputs[i:i + 1], [it.id], [it.source_label], task))
            except TGEMError as e:
                errors.append((it.id, f"cannot encode image: {e}"))
        return (pa.concat_tables(tables) if tables else None), errors
    finally:
        stats["encode_s"] = stats.get("encode_s", 0.0) + clock() - t1
