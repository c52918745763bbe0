"""Distinct JPEGs made from real photographs that ship with installed packages."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Photographs bundled with scikit-image itself (no download needed).
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "brick", "grass", "gravel", "clock",
    "stereo_motorcycle", "cell",
)
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
MIN_SIDE, MAX_SIDE = 150, 600


@dataclass(frozen=True)
class JpegImage:
    """One encoded JPEG and the size it decodes to."""

    data: bytes
    width: int
    height: int
    source: str


@functools.lru_cache(maxsize=1)
def load_source_photos() -> tuple[tuple[str, Image.Image], ...]:
    """Load the source photographs as RGB images, named after where they come from.

    Matplotlib's sample photographs join the set only where matplotlib is installed, so
    the image bytes for a seed depend on that; the metadata and ground truth do not.
    """
    from skimage import data

    photos = []
    for name in SKIMAGE_PHOTOS:
        pixels = getattr(data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle is a stereo pair: keep the left view
            pixels = pixels[0]
        photos.append((f"skimage.{name}", Image.fromarray(pixels).convert("RGB")))
    if importlib.util.find_spec("matplotlib") is not None:
        from matplotlib import cbook

        for name in MATPLOTLIB_PHOTOS:
            with Image.open(cbook.get_sample_data(name, asfileobj=False)) as photo:
                photos.append((f"matplotlib.{name}", photo.convert("RGB")))
    logger.debug("Loaded %s source photographs", len(photos))
    return tuple(photos)


def make_distinct_jpegs(n_images: int, seed: int) -> list[JpegImage]:
    """Make `n_images` JPEGs with pairwise different bytes from random edits of the photos.

    Sources are used in turn; each image is a random crop, flip, resize (sides between
    MIN_SIDE and MAX_SIDE, often non-square) and colour shift. Same seed, same bytes.
    """
    photos = load_source_photos()
    rng = np.random.default_rng(seed)
    images: list[JpegImage] = []
    seen: set[str] = set()
    while len(images) < n_images:
        name, photo = photos[len(images) % len(photos)]
        image = _random_variant(photo, name, rng)
        digest = hashlib.sha256(image.data).hexdigest()
        if digest in seen:  # vanishingly rare, but distinctness is promised
            continue
        seen.add(digest)
        images.append(image)
    return images


def _random_variant(photo: Image.Image, name: str, rng: np.random.Generator) -> JpegImage:
    width, height = photo.size
    crop_w = int(width * rng.uniform(0.35, 1.0))
    crop_h = int(height * rng.uniform(0.35, 1.0))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.1:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    out_w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    aspect = crop_h / crop_w * rng.uniform(0.9, 1.1)
    out_h = int(np.clip(round(out_w * aspect), MIN_SIDE, MAX_SIDE))
    image = image.resize((out_w, out_h), Image.Resampling.BICUBIC, reducing_gap=2.0)
    # Colour shift: a per-channel gain and offset, applied as one lookup table.
    gain = rng.uniform(0.8, 1.2, size=(3, 1))
    offset = rng.uniform(-25.0, 25.0, size=(3, 1))
    table = np.clip(np.arange(256) * gain + offset, 0, 255).astype(np.uint8)
    image = image.point(table.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    return JpegImage(data=buffer.getvalue(), width=out_w, height=out_h, source=name)
