"""Images decode as a photo viewer shows them, in every reader (issue 23.3): EXIF orientation applied,
16-bit greyscale scaled to 8 bits, transparency and palettes to RGB."""
import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
import torch

import tgems
from tgems.images import to_rgb
from tgems.jobs.sources import decode_image, open_source
from tgems.jobs.readers import iter_items


def _upright_scene() -> Image.Image:
    """A scenes image upscaled to 64 x 96 (not square, so a missed rotation changes the shape)."""
    img = tgems.load_dataset("scenes:test:1", seed=3).pil(0)
    return img.resize((64, 96), Image.NEAREST)


def _oriented_jpeg(upright: Image.Image) -> bytes:
    """What a phone writes: the pixels stored on their side, with EXIF orientation 6 (rotate 90 CW to view)."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = stored.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=100, exif=exif)
    return buf.getvalue()


def _as_viewed(data: bytes) -> np.ndarray:
    """The stored pixels of the JPEG, turned upright by hand: what every reader must give."""
    with Image.open(io.BytesIO(data)) as img:
        raw = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(np.rot90(raw, k=-1))


@pytest.fixture(scope="module")
def oriented(tmp_path_factory):
    root = tmp_path_factory.mktemp("oriented")
    data = _oriented_jpeg(_upright_scene())
    (root / "photos" / "a_red_star").mkdir(parents=True)
    (root / "photos" / "a_red_star" / "phone.jpg").write_bytes(data)
    return root, data, _as_viewed(data)


def test_reference_is_upright_and_differs_from_the_stored_pixels(oriented):
    _, data, want = oriented
    assert want.shape == (96, 64, 3)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (96, 64)  # stored on its side


def test_every_reader_applies_exif_orientation(oriented, tmp_path):
    root, data, want = oriented
    path = root / "photos" / "a_red_star" / "phone.jpg"
    from tgems.data import read_image
    from tgems.retrieval import _open_image

    assert np.array_equal(np.asarray(decode_image(data)), want)               # webdataset / parquet bytes
    assert np.array_equal(np.asarray(read_image(path)), want)                 # file mode, fit
    assert np.array_equal(np.asarray(_open_image(path)), want)                # search --image
    ds = tgems.load_dataset(f"folder:{root / 'photos'}")                     # fit, eval, index
    assert np.array_equal(np.asarray(ds.pil(0)), want)
    streamed = [it.image for it in iter_items(open_source(f"folder:{root / 'photos'}"), workers=0)]
    assert np.array_equal(np.asarray(streamed[0]), want)
    with tarfile.open(tmp_path / "one.tar", "w") as tf:
        info = tarfile.TarInfo("k0.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    items = list(iter_items(open_source(f"webdataset:{tmp_path / 'one.tar'}"), workers=0))
    assert np.array_equal(np.asarray(items[0].image), want)
    pq.write_table(pa.table({"id": ["p0"], "image": pa.array([data], pa.binary())}), tmp_path / "t.parquet")
    items = list(iter_items(open_source(f"parquet:{tmp_path / 't.parquet'}"), workers=0))
    assert np.array_equal(np.asarray(items[0].image), want)


def test_oriented_photo_classifies_as_the_upright_image(oriented):
    """File mode and a PIL image straight from Image.open (the Python API) both see the upright image."""
    from tgems.pipeline import classify_files

    root, data, want = oriented
    bb = tgems.load_backbone("embedded")
    clf = tgems.EarlyExitClassifier(bb, "embedded:cls", ["a red star", "a blue circle", "a green heart"])
    expected = clf.predict([want])
    with Image.open(io.BytesIO(data)) as opened:
        pixels = bb.preprocess([opened])
    assert torch.equal(pixels, bb.preprocess([want]))
    records, failures = classify_files(clf, [root / "photos" / "a_red_star" / "phone.jpg"])
    assert not failures
    assert records[0]["label"] == expected.labels[0]
    assert records[0]["exit_layer"] == int(expected.exit_layers[0])


def _png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_sixteen_bit_png_is_scaled_not_clipped():
    gradient = np.tile(np.linspace(0, 65535, 64), (16, 1))
    img = decode_image(_png16(gradient))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8
    assert arr.min() == 0 and arr.max() == 255
    assert len(np.unique(arr)) >= 60  # a gradient, not a white image
    assert np.all(np.diff(arr[0, :, 0].astype(int)) >= 0)
    assert abs(int(arr[0, 32, 0]) - round(gradient[0, 32] / 257)) <= 1
    # mid-grey in 16 bits is mid-grey in 8
    assert np.asarray(decode_image(_png16(np.full((4, 4), 32768))))[0, 0, 0] == 128


def test_alpha_palette_and_cmyk_to_rgb():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear))[0, 0].tolist() == [255, 255, 255]  # transparent shows the background
    half = Image.new("LA", (4, 4), (0, 128))
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [127, 127, 127]
    pal = Image.new("RGB", (4, 4), (200, 10, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert to_rgb(pal).mode == "RGB" and np.asarray(to_rgb(pal))[0, 0].tolist() == [200, 10, 30]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    upright = Image.new("RGB", (4, 2))
    assert to_rgb(upright) is upright
