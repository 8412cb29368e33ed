"""Small on-disk image collections for the streaming / batch / Ray tests: a folder, tar shards, parquet.

Images are `scenes` images (32 px, what the embedded model reads), so exits are spread over layers.
"""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LABELS = ["a red circle", "a blue star", "a green heart", "a yellow square", "a purple ring", "a orange cross"]


def tgem_checkpoint() -> str:
    import tgems

    return str(Path(tgems.__file__).parent / "assets" / "embedded_tgem" / "cls")


def scene_images(n: int, seed: int = 0) -> list:
    import tgems

    ds = tgems.load_dataset(f"scenes:test:{n}", seed=seed)
    return [ds.pil(i) for i in range(n)], [ds.classes[c] for c in ds.labels]


def encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_folder(root, images, classes, fmt="PNG") -> list:
    """root/<class_with_underscores>/NNNN.png; returns the relative paths in image order."""
    root = Path(root)
    rels = []
    for i, (img, c) in enumerate(zip(images, classes)):
        rel = f"{c.replace(' ', '_')}/{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(img, fmt))
        rels.append(rel)
    return rels


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(root, images, per_shard=50, extra=None) -> tuple:
    """webdataset shards root/shard-00000N.tar with KEY.jpg (+ KEY.cls); returns (pattern, keys).

    `extra` is a list of (name, bytes) members appended to the first shard (bad inputs)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    keys, n_shards = [], (len(images) + per_shard - 1) // per_shard
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tf:
            for i in range(s * per_shard, min(len(images), (s + 1) * per_shard)):
                key = f"s{s}/img{i:05d}"
                _add(tf, key + ".jpg", encode(images[i], "JPEG"))
                _add(tf, key + ".cls", str(i % 7).encode())
                keys.append(key)
            if s == 0:
                for name, data in extra or []:
                    _add(tf, name, data)
    return str(root / f"shard-{{000000..{n_shards - 1:06d}}}.tar"), keys


def make_parquet(path, images, ids=None, null_rows=(), image_col="image", id_col="id"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = ids or [f"row{i:05d}" for i in range(len(images))]
    data = [None if i in null_rows else encode(img, "PNG") for i, img in enumerate(images)]
    pq.write_table(pa.table({id_col: ids, image_col: pa.array(data, pa.binary())}), path, row_group_size=37)
    return ids


def read_parts(out) -> "pa.Table":
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(Path(out).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def kill_after_first_part(script: str, out, env=None, timeout: float = 120) -> list:
    """Run a job `script` in its own process group, SIGKILL it once its first part is on disk; the names of
    the parts it left (the job is then checked to have stopped partway: no _SUCCESS, not every part)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = Path(out)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while not (out / "part-00000.parquet").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the job wrote no part in time"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 1 <= len(done) < 6 and not (out / "_SUCCESS").exists()
    return done


def decoded(data: bytes):
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def truncated_jpeg(img) -> bytes:
    data = encode(img, "JPEG")
    return data[: len(data) // 2]


__all__ = ["LABELS", "tgem_checkpoint", "scene_images", "make_folder", "make_shards", "make_parquet", "read_parts",
           "decoded", "truncated_jpeg", "encode", "np"]


@pytest.fixture(scope="module")
def spec():
    """The job's classifier spec: the shipped embedded model and T-GEM over LABELS."""
    from tgems.spec import PredictorSpec

    return PredictorSpec(tgem=tgem_checkpoint(), labels=list(LABELS)).check()


@pytest.fixture(scope="module")
def clf(spec):
    return spec.build()
