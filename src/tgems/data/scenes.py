"""Procedural "scenes": one main coloured shape on a textured background, with distractors.

Every sample is a pure function of (split, seed, index), so any split can be regenerated,
streamed or sliced without storing images. A fixed set of colour-shape combinations is
held out: it never appears in the train / calib / test splits, only in ``heldout``.
"""
from __future__ import annotations

import numpy as np

from tgems.data.dataset import Dataset
from tgems.errors import TGEMError

IMAGE_SIZE = 32
_SS = 2  # supersampling factor for anti-aliased edges

COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (235, 215, 30),
    "green": (35, 165, 55),
    "cyan": (30, 200, 215),
    "blue": (35, 65, 225),
    "purple": (135, 45, 190),
    "pink": (250, 125, 185),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent")
COLOUR_NAMES = tuple(COLOURS)
CLASSES = [f"a {c} {s}" for c in COLOUR_NAMES for s in SHAPES]


def _heldout_pairs() -> set[tuple[int, int]]:
    """12 combinations, spread so every colour and every shape still has >= 6 seen partners."""
    pairs = {(c, (3 * c) % 8) for c in range(8)}
    pairs |= {(c, (3 * c + 4) % 8) for c in range(4)}
    return pairs


HELDOUT = np.zeros(len(CLASSES), dtype=bool)
for _c, _s in _heldout_pairs():
    HELDOUT[_c * len(SHAPES) + _s] = True
SEEN_CLASSES = np.flatnonzero(~HELDOUT)
HELDOUT_CLASSES = np.flatnonzero(HELDOUT)

# split name -> (stream id, default size, which classes)
_SPLITS = {
    "train": (1, 20000, "seen"),
    "calib": (2, 2000, "seen"),
    "test": (3, 2600, "seen"),
    "heldout": (4, 1200, "heldout"),
    "shots": (5, 1024, "all"),  # images of every class, only for the k-shot (sample-based) baseline
}
SPLITS = (*_SPLITS, "testall")

SIZE_WORDS = ("small", "medium", "large")
_SIZE_RANGES = ((4.0, 5.5), (5.5, 7.5), (7.5, 10.0))
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")

TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape}",
    "a {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape}",
    "{where} there is a {colour} {shape}",
    "a {size} {shape} that is {colour}",
    "the {shape} is {colour} and {size}",
    "a {colour} {shape} among {n} small shapes",
    "a {colour} {shape} next to a small shape",
    "an image of a {colour} {shape} on a textured background",
)
PROMPT_TEMPLATES = ("{}", "a picture of {}", "an image of {}", "there is {}")


def _where(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {_COLS[col]}"
    if col == 1:
        return f"at the {_ROWS[row]}"
    return f"near the {_ROWS[row]} {_COLS[col]}"


def vocabulary() -> list[str]:
    """Every word a caption, class text or prompt template can contain (for the word-level tokenizer)."""
    words = set()
    fills = dict(size=" ".join(SIZE_WORDS), colour=" ".join(COLOUR_NAMES), shape=" ".join(SHAPES),
                 where=" ".join(_where(r, c) for r in range(3) for c in range(3)), n="two three")
    for t in TEMPLATES + PROMPT_TEMPLATES:
        words.update(t.replace("{}", "").format(**fills).replace(",", " ").split())
    return sorted(words)


# ---------------------------------------------------------------- rasterisation

_G = (np.arange(IMAGE_SIZE * _SS, dtype=np.float32) + 0.5) / _SS
_GX, _GY = np.meshgrid(_G, _G)
_STAR = np.array([(np.cos(np.pi / 2 + k * np.pi / 5) * (1.0 if k % 2 == 0 else 0.45),
                   -np.sin(np.pi / 2 + k * np.pi / 5) * (1.0 if k % 2 == 0 else 0.45)) for k in range(10)],
                 dtype=np.float32)
_TRI = np.array([(0.0, -1.0), (0.92, 0.72), (-0.92, 0.72)], dtype=np.float32)


def _in_convex(u, v, poly):
    inside = np.ones(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
    return inside


def _in_star(u, v):
    ang = np.mod(np.arctan2(-v, u) - np.pi / 2, 2 * np.pi)
    k = np.floor(ang / (np.pi / 5)).astype(int) % 10
    p0, p1 = _STAR[k], _STAR[(k + 1) % 10]
    cross = (p1[..., 0] - p0[..., 0]) * (v - p0[..., 1]) - (p1[..., 1] - p0[..., 1]) * (u - p0[..., 0])
    return cross <= 0


def _inside(shape: str, u, v):
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 0.9
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "triangle":
        return _in_convex(u, v, _TRI[::-1])
    if shape == "star":
        return _in_star(u, v) & (r2 <= 1.0)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "ring":
        return (r2 <= 0.95) & (r2 >= 0.36)
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "crescent":
        return (r2 <= 0.95) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.55)
    raise ValueError(shape)


def _coverage(shape, cx, cy, r, theta):
    """Anti-aliased coverage (32x32 in [0,1]) of one shape."""
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = _GX - cx, _GY - cy
    u = (dx * c + dy * s) / r
    v = (-dx * s + dy * c) / r
    m = _inside(shape, u, v).astype(np.float32)
    return m.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS).mean(axis=(1, 3))


def _background(rng, level, texture):
    n = IMAGE_SIZE
    tint = rng.uniform(-0.08, 0.08, 3)
    base = np.clip(level + tint, 0.05, 0.95)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    a = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)) * rng.uniform(0, 0.3)
    f, b = rng.uniform(2, 7), rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * f * (np.cos(b) * xx + np.sin(b) * yy) + rng.uniform(0, 6.3))
    blobs = rng.normal(0, 1, (4, 4, 3)).astype(np.float32).repeat(8, 0).repeat(8, 1)
    img = base[None, None, :] + grad[..., None] + texture * (0.12 * stripes[..., None] + 0.06 * blobs)
    return img.astype(np.float32)


def _render(rng, label):
    """One sample: (image uint8, caption, difficulty)."""
    colour, shape = COLOUR_NAMES[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    d = rng.uniform()  # latent difficulty drives every nuisance factor
    size_i = int(rng.choice(3, p=np.array([0.15 + 0.5 * d, 0.35, 0.5 - 0.5 * d]) / 1.0))
    r = rng.uniform(*_SIZE_RANGES[size_i])
    contrast = np.clip(1.0 - 0.45 * d + rng.normal(0, 0.06), 0.45, 1.0)
    noise = 0.01 + 0.09 * d * rng.uniform(0.5, 1.0)
    texture = np.clip(0.2 + 0.9 * d * rng.uniform(0.5, 1.0), 0, 1.1)
    n_distr = int(rng.binomial(3, 0.2 + 0.6 * d))

    img = _background(rng, rng.uniform(0.25, 0.75), texture)
    for _ in range(n_distr):
        dc = COLOURS[COLOUR_NAMES[rng.integers(8)]]
        cov = _coverage(SHAPES[rng.integers(8)], rng.uniform(2, 30), rng.uniform(2, 30),
                        rng.uniform(2.0, 3.2), rng.uniform(-np.pi, np.pi))
        img = img * (1 - cov[..., None]) + (np.array(dc, np.float32) / 255)[None, None] * cov[..., None]
    lo, hi = r + 0.5, IMAGE_SIZE - r - 0.5
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    cov = _coverage(shape, cx, cy, r, rng.uniform(-0.5, 0.5)) * contrast
    col = np.clip(np.array(COLOURS[colour], np.float32) / 255 + rng.normal(0, 0.035, 3), 0, 1)
    img = img * (1 - cov[..., None]) + col[None, None] * cov[..., None]
    img = img + rng.normal(0, noise, img.shape)
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    row = min(int(cy / IMAGE_SIZE * 3), 2)
    col_i = min(int(cx / IMAGE_SIZE * 3), 2)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    if ("{n}" in template and n_distr < 2) or ("next to" in template and n_distr != 1):
        template = TEMPLATES[0]
    caption = template.format(size=SIZE_WORDS[size_i], colour=colour, shape=shape, where=_where(row, col_i),
                              n=("two", "three")[n_distr == 3])
    difficulty = np.mean([
        1 - (r - 4.0) / 6.0, (1.0 - contrast) / 0.55, (noise - 0.01) / 0.09, texture / 1.1, n_distr / 3,
    ])
    return image, caption, float(np.clip(difficulty, 0, 1))


def generate(split: str, start: int, n: int, seed: int = 0) -> Dataset:
    """Samples start .. start+n-1 of a split (labels balanced and cycling over the split's classes)."""
    if split not in _SPLITS:
        raise TGEMError(f"unknown scenes split '{split}' (choose from {', '.join(SPLITS)})")
    stream, _, which = _SPLITS[split]
    classes = {"seen": SEEN_CLASSES, "heldout": HELDOUT_CLASSES, "all": np.arange(len(CLASSES))}[which]
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    captions, difficulty = [], np.empty(n, dtype=np.float32)
    order = np.random.default_rng([stream, seed, 7]).permutation(len(classes))
    for j in range(n):
        i = start + j
        rng = np.random.default_rng([stream, seed, i])
        label = int(classes[order[i % len(classes)]])
        images[j], cap, difficulty[j] = _render(rng, label)
        labels[j] = label
        captions.append(cap)
    return Dataset(name=f"scenes:{split}", images=images, labels=labels, classes=list(CLASSES),
                   captions=captions, difficulty=difficulty, heldout=HELDOUT.copy(),
                   meta={"split": split, "seed": seed, "start": start})


def _concat(a: Dataset, b: Dataset, name: str) -> Dataset:
    return Dataset(name=name, images=np.concatenate([a.images, b.images]),
                   labels=np.concatenate([a.labels, b.labels]), classes=a.classes,
                   captions=a.captions + b.captions, difficulty=np.concatenate([a.difficulty, b.difficulty]),
                   heldout=a.heldout, meta={"split": name.split(":")[1], "seed": a.meta["seed"]})


def load_split(split: str, n: int | None = None, seed: int = 0) -> Dataset:
    """A named split; ``testall`` is the seen test split followed by the held-out one."""
    if split == "testall":
        nt, nh = _SPLITS["test"][1], _SPLITS["heldout"][1]
        if n is not None:
            nt = max(1, round(n * nt / (nt + nh)))
            nh = max(1, n - nt)
        return _concat(generate("test", 0, nt, seed), generate("heldout", 0, nh, seed), "scenes:testall")
    if split not in _SPLITS:
        raise TGEMError(f"unknown scenes split '{split}' (choose from {', '.join(SPLITS)})")
    return generate(split, 0, _SPLITS[split][1] if n is None else n, seed)
