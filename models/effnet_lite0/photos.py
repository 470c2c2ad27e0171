"""Evaluation photos and preprocessing shared by inferpool's model tests and measurements.

The photos are the ones bundled with scikit-image (no download needed). Preprocessing mirrors
what the server does for a card with ``resize: stretch``, mean 127 and std 128: decode to RGB,
bilinear (triangle-filter) resize straight to 224x224, ``(x - 127) / 128``, NCHW float32.

The "copies" are the edits a matching service should see through: a 50% downscale, a JPEG
re-encode at quality 40, and a crop of 10% off every border.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import skimage.data
from PIL import Image

SIZE = 224
MEAN = 127.0
STD = 128.0

# Distinct scenes only (skimage's "cat" is chelsea again, motorcycle_right nearly motorcycle_left).
PHOTO_NAMES = [
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
    "moon", "motorcycle", "page", "retina", "rocket", "text",
]

COPY_KINDS = ["downscale50", "jpeg40", "crop10"]


def load_photo(name: str) -> Image.Image:
    """A scikit-image sample as an RGB PIL image.

    Grey is replicated to three channels and alpha is dropped, as the server's decoder does.
    """
    arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return Image.fromarray(arr).convert("RGB")


def make_copy(img: Image.Image, kind: str) -> Image.Image:
    w, h = img.size
    if kind == "downscale50":
        return img.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR)
    if kind == "jpeg40":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=40)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop10":
        dx, dy = w // 10, h // 10
        return img.crop((dx, dy, w - dx, h - dy))
    raise ValueError(kind)


def preprocess(img: Image.Image) -> np.ndarray:
    """RGB image -> float32 [3, 224, 224], stretched and normalised like the server does."""
    resized = img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    x = (np.asarray(resized, dtype=np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def batch(images) -> np.ndarray:
    return np.stack([preprocess(img) for img in images])


def originals() -> dict:
    return {name: load_photo(name) for name in PHOTO_NAMES}


def normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(normalise(a), normalise(b)))


def similarity_groups(embed) -> tuple:
    """Cosines of (photo, its copy) pairs and of (photo, other photo) pairs.

    ``embed`` maps a float32 [N, 3, 224, 224] batch to [N, D] embeddings. Returns two dicts keyed
    by (name, copy kind) and (name, other name).
    """
    photos = originals()
    names = list(photos)
    base = dict(zip(names, embed(batch(photos.values()))))
    same = {}
    for kind in COPY_KINDS:
        copies = embed(batch(make_copy(photos[n], kind) for n in names))
        for name, e in zip(names, copies):
            same[(name, kind)] = cosine(base[name], e)
    different = {(a, b): cosine(base[a], base[b]) for a, b in itertools.combinations(names, 2)}
    return same, different
