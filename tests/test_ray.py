"""Ray Data: the map_batches predictor and `--engine ray` give the rows of the single-process run."""
import dataclasses

import numpy as np
import pytest

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:  # only the missing extra skips: CI installs it
    pytest.skip('the ray extra is not installed (pip install "tgems[ray]")', allow_module_level=True)

import pyarrow as pa
import pyarrow.parquet as pq
from stream_helpers import (clf, spec,  # noqa: F401 (shared fixtures)
                            LABELS, encode, make_folder, read_parts, scene_images, tgem_checkpoint,
                            truncated_jpeg)

from tgems.batch import run_command, run_job
from tgems.integrations.ray import TGEMPredictor, run_ray_job


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def test_predictor_takes_bytes_or_arrays(spec, clf):
    images, _ = scene_images(12)
    pred = clf.predict(images)
    p = TGEMPredictor(dataclasses.asdict(spec))
    data = [encode(im, "PNG") for im in images]
    data[4] = b"not an image"
    out = p(pa.table({"id": [f"k{i}" for i in range(12)], "bytes": pa.array(data, pa.binary())}))
    good = out.filter(pa.compute.is_null(out.column("error")))
    keep = [i for i in range(12) if i != 4]
    assert good.column("id").to_pylist() == [f"k{i}" for i in keep]
    assert good.column("label").to_pylist() == [pred.labels[i] for i in keep]
    assert np.array_equal(good.column("exit_layer").to_numpy(), pred.exit_layers[keep])
    bad = out.filter(pa.compute.is_valid(out.column("error"))).to_pylist()
    assert [b["id"] for b in bad] == ["k4"] and "not an image" in bad[0]["error"]
    # uint8 arrays, as ray.data.read_images gives them, in the numpy batch format
    arrays = np.stack([np.asarray(im) for im in images])
    out = p({"image": arrays, "path": np.array([f"p{i}" for i in range(12)])})
    assert out.column("label").to_pylist() == pred.labels
    assert out.column("id").to_pylist() == [f"p{i}" for i in range(12)]


def test_ray_engine_gives_the_rows_of_the_local_run(tmp_path, local_ray, spec, clf):
    images, classes = scene_images(200)
    root = tmp_path / "f"
    make_folder(root, images, classes)
    (root / "zz_bad.jpg").write_bytes(truncated_jpeg(images[0]))
    data = f"folder:{root}?block=50"
    local = run_job(clf, data, tmp_path / "local", batch_size=32, workers=0, settings=spec.settings(),
                    progress=False)
    summary, code = run_command(data=data, out=str(tmp_path / "ray"), tgem=tgem_checkpoint(), labels=LABELS,
                                engine="ray", concurrency=2, batch_size=32, quiet=True)
    assert code == 1 and summary["engine"] == "ray"
    assert summary["images"] == local["images"] == 200 and summary["errors"] == local["errors"] == 1
    a = read_parts(tmp_path / "local").sort_by("id")
    b = read_parts(tmp_path / "ray").sort_by("id")
    assert a.schema == b.schema
    for col in ("id", "source_label", "label", "label_index", "exit_layer", "top5_labels"):
        assert a.column(col).equals(b.column(col)), col
    np.testing.assert_allclose(a.column("probability").to_numpy(), b.column("probability").to_numpy(), atol=1e-5)
    assert pq.read_table(tmp_path / "ray" / "_errors.parquet").column("id").to_pylist() == ["zz_bad.jpg"]
    assert summary["exit_layers"] == local["exit_layers"]
    assert not [p for p in (tmp_path / "ray").rglob("*") if p.name.endswith(".tmp")]
    # a finished Ray job is not redone; another job into its directory is refused
    again = run_ray_job(spec, data, tmp_path / "ray", batch_size=32, concurrency=2, progress=False)
    assert again["images"] == 200 and again["parts_written"] == 0
