"""Embedded calibration data for users with no data of their own: crops of natural photographs.

The photographs are the ones scikit-image ships inside its wheel (`skimage/data`: an astronaut, a cat,
coffee, motorcycles, a rocket, textures, ...), read with Pillow without importing scikit-image. Each sample is
a random resized crop (area 8-100%, aspect 3/4-4/3) with a random horizontal flip, resized to the model input
and preprocessed like any image folder. Sample i depends only on (seed, i), so subsets are disjoint splits.
Statistics of generic photographs transfer imperfectly to a model's own domain; in-domain data is better.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import UserError
from .sources import Batch, ImagePreprocessing, Source, image_geometry

DEFAULT_SAMPLES = 1024
PHOTOGRAPHS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)


@cache
def photographs() -> tuple:
    """The decoded photographs (PIL images, RGB)."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" if spec else None
    if folder is None or not folder.is_dir():
        raise UserError("natural-image calibration needs scikit-image's sample photographs: pip install scikit-image")
    images = []
    for name in PHOTOGRAPHS:
        if (folder / name).is_file():
            with Image.open(folder / name) as image:
                images.append(image.convert("RGB"))
    if not images:
        raise UserError(f"no sample photographs found in {folder}; reinstall scikit-image")
    return tuple(images)


class NaturalImageSource(Source):
    def __init__(
        self,
        input_name: str,
        input_shape: tuple,
        preprocessing: ImagePreprocessing = ImagePreprocessing(),
        count: int = DEFAULT_SAMPLES,
        batch_size: int = 32,
        seed: int = 0,
        start: int = 0,
    ):
        self.input_name, self.preprocessing, self.batch_size, self.seed = input_name, preprocessing, batch_size, seed
        self.channels, self.image_size = image_geometry(input_shape, preprocessing)
        self.start, self.size = start, count
        self.description = f"{count} random crops of {len(PHOTOGRAPHS)} natural photographs (scikit-image)"

    def subset(self, offset: int, limit: int | None) -> NaturalImageSource:
        part = copy.copy(self)
        part.start = self.start + offset
        part.size = max(0, self.size - offset) if limit is None else min(limit, self.size - offset)
        if part.size <= 0:
            raise UserError(f"{self.size} natural-image samples leave none after the first {offset}")
        part.description = self.description.replace(str(self.size), str(part.size), 1)
        return part

    def sample(self, index: int) -> np.ndarray:
        from PIL import Image

        rng = np.random.default_rng([self.seed, index])
        images = photographs()
        image = images[rng.integers(len(images))]
        width, height = image.size
        area = width * height * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_w = min(width, max(1, round(math.sqrt(area * aspect))))
        crop_h = min(height, max(1, round(math.sqrt(area / aspect))))
        left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
        crop = image.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = crop.resize(self.image_size[::-1], Image.BILINEAR)
        return self.preprocessing.normalize(crop, self.channels)

    def labelled(self) -> Iterator[tuple[Batch, None]]:
        for first in range(self.start, self.start + self.size, self.batch_size):
            indices = range(first, min(first + self.batch_size, self.start + self.size))
            yield {self.input_name: np.stack([self.sample(i) for i in indices])}, None
