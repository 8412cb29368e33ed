"""Decoding an image as a photo viewer shows it; every reader (file mode, folders, webdataset, parquet,
the index, fit) and `Backbone.preprocess` go through `to_rgb`, so no path sees other pixels. Below both
backbones and data, so each may use it.

- EXIF orientation is applied (a phone photo taken upright is upright, not on its side);
- 16-bit greyscale (PIL modes I;16*, and I, which is how PNG and TIFF 16-bit images open) is scaled
  to 8 bits (PIL's own conversion clips every value above 255 to white);
- transparency is composited onto white (dropping alpha would show what lies under it, often black);
- palette, L, 1, CMYK and other modes are converted to RGB.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
BACKGROUND = (255, 255, 255)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright) of an image, 1 when it has none."""
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except Exception:  # a damaged EXIF block is not a reason to refuse the pixels
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image as a viewer would show `img` (an upright RGB image comes back as is)."""
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(fp) -> Image.Image:
    """Open a path or a binary file object, decode it now (a truncated file fails here) and `to_rgb` it."""
    with Image.open(fp) as img:
        img.load()
        return to_rgb(img)
