"""Streaming sources: shards, ids, labels, worker decoding, bad items as error records, bad specs up front."""
import numpy as np
import pytest
from stream_helpers import (decoded, encode, make_folder, make_parquet, make_shards, scene_images, truncated_jpeg)

from tgems.jobs.sources import open_source
from tgems.jobs.readers import iter_items, prepare_records, stream_chunks
from tgems.errors import TGEMError


@pytest.fixture(scope="module")
def imgs():
    return scene_images(24)


def test_folder_blocks_labels_and_order(tmp_path, imgs):
    images, classes = imgs
    rels = make_folder(tmp_path / "f", images, classes)
    (tmp_path / "f" / "loose.png").write_bytes(encode(images[0], "PNG"))  # no sub-folder: no label
    (tmp_path / "f" / "notes.txt").write_text("not an image extension: ignored")
    src = open_source(f"folder:{tmp_path / 'f'}?block=10")
    assert [s.size for s in src.shards] == [10, 10, 5] and src.num_items == 25
    items = list(iter_items(src, chunk_size=4, workers=0))
    assert [it.id for it in items] == sorted(rels + ["loose.png"])
    by_id = {it.id: it for it in items}
    assert by_id["loose.png"].source_label is None
    for rel, img, c in zip(rels, images, classes):
        assert by_id[rel].source_label == c
        assert np.array_equal(np.asarray(by_id[rel].image), np.asarray(img))  # PNG: lossless


def test_workers_give_the_same_items_in_order(tmp_path, imgs):
    images, classes = imgs
    make_folder(tmp_path / "f", images, classes, fmt="JPEG")
    src = open_source(f"folder:{tmp_path / 'f'}?block=7")
    a = list(iter_items(src, chunk_size=3, workers=0))
    b = list(iter_items(src, chunk_size=3, workers=2, prefetch=2))
    assert [x.id for x in a] == [x.id for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))


def test_chunks_never_span_shards_and_close_each_shard(tmp_path, imgs):
    images, classes = imgs
    make_folder(tmp_path / "f", images, classes)
    src = open_source(f"folder:{tmp_path / 'f'}?block=10")
    chunks = list(stream_chunks(src, chunk_size=4, workers=0))
    assert [(c.shard.index, len(c.items), c.last) for c in chunks] == [
        (0, 4, False), (0, 4, False), (0, 2, True), (1, 4, False), (1, 4, False), (1, 2, True),
        (2, 4, False), (2, 0, True)]
    # a shard that ends on a chunk boundary is closed by an empty chunk
    chunks = list(stream_chunks(src, [src.shards[0]], chunk_size=5, workers=0))
    assert [(len(c.items), c.last) for c in chunks] == [(5, False), (5, False), (0, True)]


def test_webdataset_keys_and_bad_members(tmp_path, imgs):
    images, _ = imgs
    extra = [("bad/empty.jpg", b""), ("bad/text.png", b"hello, not a png"), ("bad/cut.jpg", truncated_jpeg(images[1])),
             ("bad/noimage.txt", b"caption only")]
    pattern, keys = make_shards(tmp_path / "wds", images, per_shard=10, extra=extra)
    src = open_source(f"webdataset:{pattern}")
    assert len(src.shards) == 3 and src.num_items is None
    items = list(iter_items(src, chunk_size=8, workers=2))
    good = [it for it in items if it.error is None]
    assert [it.id for it in good] == keys
    assert good[3].source_label == "3"
    assert np.array_equal(np.asarray(good[0].image), np.asarray(decoded(encode(images[0], "JPEG"))))
    errors = {it.id: it.error for it in items if it.error is not None}
    assert set(errors) == {"bad/empty", "bad/text", "bad/cut", "bad/noimage"}
    assert "empty" in errors["bad/empty"]
    assert "not an image" in errors["bad/text"]
    assert "truncated" in errors["bad/cut"].lower()
    assert "no image member" in errors["bad/noimage"]


def test_parquet_ids_null_rows_and_column_names(tmp_path, imgs):
    images, _ = imgs
    ids = make_parquet(tmp_path / "x.parquet", images, null_rows={5}, image_col="png_bytes", id_col="key")
    with pytest.raises(TGEMError, match="no image column"):
        open_source(f"parquet:{tmp_path / 'x.parquet'}")
    with pytest.raises(TGEMError, match="no id column 'id2'"):
        open_source(f"parquet:{tmp_path / 'x.parquet'}?image=png_bytes&id=id2")
    src = open_source(f"parquet:{tmp_path / 'x.parquet'}?image=png_bytes&id=key")
    assert src.num_items == len(images)
    items = list(iter_items(src, chunk_size=5, workers=0))
    assert [it.id for it in items] == ids
    assert items[5].error == "no image bytes (null)" and items[4].error is None
    # without an id column, ids are FILE:ROW
    (tmp_path / "d").mkdir()
    make_parquet(tmp_path / "d" / "a.parquet", images[:3])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [encode(images[0], "PNG")] * 2}), tmp_path / "d" / "b.parquet")
    src = open_source(f"parquet:{tmp_path / 'd'}")
    assert len(src.shards) == 2
    assert [it.id for it in iter_items(src, workers=0)] == ["row00000", "row00001", "row00002",
                                                           "b.parquet:0", "b.parquet:1"]


def test_bad_specs_fail_before_any_work(tmp_path, imgs):
    images, _ = imgs
    with pytest.raises(TGEMError, match="does not exist"):
        open_source(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TGEMError, match="has no images"):
        open_source(f"folder:{tmp_path / 'empty'}")
    pattern, _ = make_shards(tmp_path / "wds", images, per_shard=10)
    missing = pattern.replace("000002}", "000003}")
    with pytest.raises(TGEMError, match=r"shard-000003.tar does not exist"):
        open_source(f"webdataset:{missing}")
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TGEMError, match="not a readable tar"):
        open_source(f"webdataset:{tmp_path / 'junk.tar'}")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(TGEMError, match="cannot read parquet file") as e:
        open_source(f"parquet:{tmp_path / 'junk.parquet'}")
    assert "\n" not in str(e.value)
    with pytest.raises(TGEMError, match="unknown streaming data kind"):
        open_source("scenes:test")
    with pytest.raises(TGEMError, match="unknown option 'blok'"):
        open_source(f"folder:{tmp_path}?blok=3")
    with pytest.raises(TGEMError, match="positive"):
        open_source(f"folder:{tmp_path}?block=0")


def test_a_1080p_photo_reaches_the_main_process_as_a_model_size_array(tmp_path):
    """The workers resize and crop with the backbone's own geometry: what crosses the process boundary is
    the encoder's input (uint8, crop size), identical to what backbone.preprocess would have made of it."""
    from PIL import Image

    from tgems.backbones.transforms import ImageTransform

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8))
    (tmp_path / "f").mkdir()
    big.save(tmp_path / "f" / "photo.jpg", quality=90)
    transform = ImageTransform({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}, 224)
    src = open_source(f"folder:{tmp_path / 'f'}")
    import pickle

    import tgems.jobs.readers as readers

    received, real_recv = [], readers._recv

    def spy(f):
        got = real_recv(f)
        received.append(len(pickle.dumps(got)))
        return got

    stats = {}
    readers._recv = spy
    try:
        [item] = list(iter_items(src, workers=1, geometry=transform.geometry, stats=stats))
    finally:
        readers._recv = real_recv
    assert len(received) == 1 and received[0] < 224 * 224 * 3 + 4096  # not the 6 MB of the full photo
    assert isinstance(item.image, np.ndarray) and item.image.dtype == np.uint8 and item.image.shape == (224, 224, 3)
    assert np.array_equal(item.image, transform.one_image(decoded((tmp_path / "f" / "photo.jpg").read_bytes())))
    assert stats["decode_s"] > 0 and stats["preprocess_s"] > 0  # measured where it happened: in the worker
    # in-process (workers=0) the same geometry gives the same array
    [same] = list(iter_items(src, workers=0, geometry=transform.geometry))
    assert np.array_equal(same.image, item.image)


def test_an_image_smaller_than_the_crop_is_an_error_record(tmp_path):
    from tgems.backbones.geometry import ImageGeometry
    from tgems.jobs.sources import Record

    geometry = ImageGeometry("exact", (40, 40), (48, 48))
    items, spent = prepare_records([Record("a", data=encode(scene_images(1)[0][0], "PNG"))], geometry)
    assert items[0].image is None and "smaller than the crop size 48x48" in items[0].error
    assert set(spent) == {"read_s", "decode_s", "preprocess_s"}


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_a_worker_that_dies_is_one_error_line_not_a_hang(tmp_path, imgs):
    """A worker killed from outside (say, by the kernel's OOM killer) ends the stream with a TGEMError."""
    import os
    import signal

    images, classes = imgs
    make_folder(tmp_path / "f", images, classes)
    src = open_source(f"folder:{tmp_path / 'f'}?block=5")
    chunks = stream_chunks(src, chunk_size=2, workers=1, prefetch=1)
    first = next(chunks)
    assert first.items
    kids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())
                    and "worker_main" in open(f"/proc/{p}/cmdline").read()):
                kids.append(int(p))
        except OSError:  # gone meanwhile
            pass
    assert len(kids) == 1
    os.kill(kids[0], signal.SIGKILL)
    with pytest.raises(TGEMError, match="a decoding worker stopped"):
        for _ in chunks:
            pass
