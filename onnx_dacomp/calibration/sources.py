"""Calibration data sources. Every source is an iterable of `{input_name: array}` batches.

Adapters: .npz/.npy files and folders of them, folders of images (class sub-folders or flat), any Python
iterable or onnxruntime `CalibrationDataReader` (`get_next()`), and random data on explicit request.
Sources with labels (class folders, .npz with a `labels` array) expose them through `labelled()`.
"""

from __future__ import annotations

import copy
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from ..config import DataConfig, ImagePreprocessing
from ..errors import UserError
from ..log import logger
from ..shapes import concrete_input_shapes, declared_shape, graph_inputs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}
ARRAY_SUFFIXES = {".npz", ".npy"}
Batch = dict[str, np.ndarray]


class Source:
    """Base of the adapters: iterate batches; `labelled()` also yields labels (or None)."""

    description = "calibration data"
    size: int | None = None  # number of samples when known (for progress bars)

    def labelled(self) -> Iterator[tuple[Batch, np.ndarray | None]]:
        for batch in self:
            yield batch, None

    def subset(self, offset: int, limit: int | None) -> Source:
        """The samples `offset .. offset + limit` (in the source's order): disjoint subsets give splits.
        Only sources of known size support it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be split")

    def __iter__(self) -> Iterator[Batch]:
        for batch, _ in self.labelled():
            yield batch


class ImageFolderSource(Source):
    """Images in class sub-folders (labels = sorted class index) or directly in the folder (no labels).

    `limit` takes that many images from a seeded shuffle (class folders are sorted, so the first N would
    all be one class); `offset` skips the first images of that shuffle, which gives disjoint splits.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        input_name: str,
        input_shape: tuple[int, ...],
        preprocessing: ImagePreprocessing = ImagePreprocessing(),
        batch_size: int = 32,
        limit: int | None = None,
        offset: int = 0,
        seed: int = 0,
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"image folder not found: {self.folder}")
        self.input_name, self.preprocessing, self.batch_size = input_name, preprocessing, batch_size
        self.layout_channels, self.image_size = image_geometry(input_shape, preprocessing)
        classes = sorted(p.name for p in self.folder.iterdir() if p.is_dir() and _images_in(p))
        if classes:
            files = [(path, index) for index, name in enumerate(classes) for path in _images_in(self.folder / name)]
        else:
            files = [(path, -1) for path in _images_in(self.folder)]
        if not files:
            raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.folder}")
        order = np.random.default_rng(seed).permutation(len(files))
        stop = None if limit is None else offset + limit
        self.files = [files[i] for i in order[offset:stop]]
        if not self.files:
            raise UserError(f"{self.folder} has {len(files)} images; offset {offset} leaves none")
        self.has_labels = bool(classes)
        self.classes = classes
        self._describe()

    def _describe(self) -> None:
        self.size = len(self.files)
        classes = f" ({len(self.classes)} classes)" if self.classes else ""
        self.description = f"{self.size} images from {self.folder}{classes}"

    def subset(self, offset: int, limit: int | None) -> ImageFolderSource:
        part = copy.copy(self)
        part.files = self.files[offset : None if limit is None else offset + limit]
        if not part.files:
            raise UserError(f"{self.folder}: {self.size} images leave none after the first {offset}")
        part._describe()
        return part

    def labelled(self) -> Iterator[tuple[Batch, np.ndarray | None]]:
        from PIL import Image, UnidentifiedImageError

        for start in range(0, len(self.files), self.batch_size):
            chunk = self.files[start : start + self.batch_size]
            arrays = []
            for path, _ in chunk:
                try:
                    with Image.open(path) as image:
                        arrays.append(self.preprocessing.apply(image, self.image_size, self.layout_channels))
                except (UnidentifiedImageError, OSError, ValueError) as exc:
                    raise UserError(f"cannot read image {path}: {exc}") from None
            labels = np.array([label for _, label in chunk]) if self.has_labels else None
            yield {self.input_name: np.stack(arrays)}, labels


class ArraySource(Source):
    """`.npz` (arrays keyed by input name, optional `labels`) or `.npy` files, or a folder of them."""

    def __init__(
        self,
        path: str | os.PathLike,
        input_names: list[str],
        batch_size: int = 32,
        limit: int | None = None,
        offset: int = 0,
    ):
        path = Path(path)
        if path.is_dir():
            self.files = sorted(p for p in path.iterdir() if p.suffix in ARRAY_SUFFIXES)
            if not self.files:
                raise UserError(f"no .npz or .npy files in {path}")
        elif path.is_file():
            if path.suffix not in ARRAY_SUFFIXES:
                raise UserError(f"{path} is not a .npz or .npy file")
            self.files = [path]
        else:
            raise UserError(f"calibration data not found: {path}")
        self.input_names, self.batch_size, self.limit, self.offset = list(input_names), batch_size, limit, offset
        self.path = path
        available = sum(_array_length(file) for file in self.files)
        self.size = max(0, min(available - offset, limit if limit is not None else available))
        if self.size == 0:
            raise UserError(f"{path} holds {available} samples; none are left after the first {offset}")
        self.description = f"{self.size} samples from {path}"

    def subset(self, offset: int, limit: int | None) -> ArraySource:
        if limit is not None and self.limit is not None:
            limit = min(limit, self.limit - offset)
        elif limit is None:
            limit = None if self.limit is None else self.limit - offset
        return ArraySource(self.path, self.input_names, self.batch_size, limit, self.offset + offset)

    def _arrays(self, path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                content = {"": loaded}
            else:
                with loaded:
                    content = {key: loaded[key] for key in loaded.files}
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
        labels = content.pop("labels", None)
        if set(content) == set(self.input_names):
            arrays = content
        elif len(content) == 1 and len(self.input_names) == 1:
            arrays = {self.input_names[0]: next(iter(content.values()))}
        else:
            raise UserError(
                f"{path} holds arrays {sorted(content)} but the model's inputs are "
                f"{self.input_names}: key the arrays by input name"
            )
        for name, array in arrays.items():
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                raise UserError(f"{path}: array for input {name!r} contains NaN or Inf")
        lengths = {len(array) for array in arrays.values()} | ({len(labels)} if labels is not None else set())
        if len(lengths) != 1:
            raise UserError(f"{path}: arrays (and labels) have different lengths {sorted(lengths)} along axis 0")
        return arrays, labels

    def labelled(self) -> Iterator[tuple[Batch, np.ndarray | None]]:
        skip, remaining = self.offset, self.size
        for path in self.files:
            if remaining == 0:
                return
            length = _array_length(path)
            if skip >= length:
                skip -= length
                continue
            arrays, labels = self._arrays(path)
            stop_file = min(length, skip + remaining)
            for start in range(skip, stop_file, self.batch_size):
                stop = min(start + self.batch_size, stop_file)
                yield (
                    {name: array[start:stop] for name, array in arrays.items()},
                    None if labels is None else labels[start:stop],
                )
            remaining -= stop_file - skip
            skip = 0


class IterableSource(Source):
    """Any iterable of `{input_name: array}` (or bare arrays for a single-input model), or an onnxruntime
    `CalibrationDataReader` (anything with `get_next()` returning a dict, then None)."""

    def __init__(self, data, input_names: list[str], description: str = "user-supplied batches"):
        self.data, self.input_names, self.description = data, list(input_names), description

    def labelled(self) -> Iterator[tuple[Batch, np.ndarray | None]]:
        items: Iterable = iter(self.data.get_next, None) if hasattr(self.data, "get_next") else self.data
        for item in items:
            if isinstance(item, Mapping):
                yield {name: np.asarray(value) for name, value in item.items()}, None
            elif len(self.input_names) == 1:
                yield {self.input_names[0]: np.asarray(item)}, None
            else:
                raise UserError(
                    f"a batch must be a dict keyed by input name for a model with inputs {self.input_names}"
                )


class RandomSource(Source):
    """Standard normal batches. Data-free statistics defeat the distribution-aware method: only on request."""

    def __init__(
        self,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_dtypes: Mapping[str, np.dtype],
        batches: int = 8,
        seed: int = 0,
    ):
        logger.warning(
            "calibrating on random data: the statistics do not describe real inputs, so the "
            "distribution-aware fit loses its advantage; pass --data with real samples"
        )
        self.shapes, self.dtypes, self.batches, self.seed = dict(input_shapes), dict(input_dtypes), batches, seed
        self.size = batches * next(iter(self.shapes.values()))[0]
        self.description = f"random normal data ({batches} batches, seed {seed})"

    def labelled(self) -> Iterator[tuple[Batch, np.ndarray | None]]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.batches):
            yield (
                {name: rng.standard_normal(shape).astype(self.dtypes[name]) for name, shape in self.shapes.items()},
                None,
            )


def _array_length(path: Path) -> int:
    """Samples in a .npy/.npz file (axis 0 of its first array), read from the array header only."""
    try:
        if path.suffix == ".npy":
            return len(np.load(path, mmap_mode="r", allow_pickle=False))
        with zipfile.ZipFile(path) as archive:
            member = next((name for name in archive.namelist() if name != "labels.npy"), None)
            if member is None:
                return 0
            with archive.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                reader = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape = reader(stream)[0]
        return shape[0] if shape else 0
    except (OSError, ValueError, zipfile.BadZipFile, StopIteration) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_geometry(input_shape: tuple[int, ...], preprocessing: ImagePreprocessing) -> tuple[int, tuple[int, int]]:
    """Channels and (H, W) of the images for a model input declared as `input_shape` (dims may be None)."""
    if len(input_shape) != 4:
        raise UserError(f"image folders need a 4-D image input, but the model input has shape {list(input_shape)}")
    if preprocessing.layout == "NCHW":
        channels, height, width = input_shape[1:]
    else:
        height, width, channels = input_shape[1:]
    size = preprocessing.size or (height, width)
    if not all(isinstance(s, int) and s > 0 for s in size):
        raise UserError("the model input has dynamic height/width: pass --size H or --size HxW")
    if channels not in (1, 3):
        raise UserError(f"image folders feed 1 or 3 channels, the model input has {channels}; check --layout")
    return channels, (int(size[0]), int(size[1]))


def open_source(
    spec: str | os.PathLike,
    model,
    *,
    preprocessing: ImagePreprocessing = ImagePreprocessing(),
    batch_size: int = 32,
    limit: int | None = None,
    offset: int = 0,
    seed: int = 0,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Source:
    """A source from a command-line style spec: `random`, a .npz/.npy file, or a folder of arrays or images."""
    from onnx import helper

    inputs = graph_inputs(model)
    names = [value.name for value in inputs]
    if str(spec) == "natural":
        from .natural import DEFAULT_SAMPLES, NaturalImageSource

        if len(inputs) != 1:
            raise UserError(f"natural images feed single-input models; this one has inputs {names}")
        return NaturalImageSource(
            names[0],
            _input_shape(inputs[0], input_shapes),
            preprocessing,
            count=limit or DEFAULT_SAMPLES,
            batch_size=batch_size,
            seed=seed,
        )
    if str(spec) == "random":
        shapes = concrete_input_shapes(model, input_shapes or {})
        if shapes is None:
            raise UserError("random calibration data needs fixed input dims: pass --input-shape")
        shapes = {name: (batch_size, *shape[1:]) for name, shape in shapes.items()}
        dtypes = {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in inputs}
        batches = max(1, -(-(limit or 8 * batch_size) // batch_size))
        return RandomSource(shapes, dtypes, batches=batches, seed=seed)
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"calibration data not found: {path} (give a folder of images, .npz/.npy files, 'natural' or 'random')"
        )
    if path.is_file() or any(p.suffix in ARRAY_SUFFIXES for p in path.iterdir()):
        return ArraySource(path, names, batch_size=batch_size, limit=limit, offset=offset)
    if len(inputs) != 1:
        raise UserError(f"image folders feed single-input models; this one has inputs {names}: use .npz files")
    return ImageFolderSource(
        path,
        names[0],
        _input_shape(inputs[0], input_shapes),
        preprocessing,
        batch_size=batch_size,
        limit=limit,
        offset=offset,
        seed=seed,
    )


def _input_shape(value, input_shapes) -> tuple:
    if input_shapes and value.name in input_shapes:
        return tuple(input_shapes[value.name])
    return tuple(declared_shape(value))


def open_data(spec: str | os.PathLike, model, config: DataConfig, seed: int, *, limit: int | None = None) -> Source:
    """The source a spec names (as `--data`), with `config`'s preprocessing, batch size and input shapes."""
    return open_source(
        spec,
        model,
        preprocessing=config.preprocessing,
        batch_size=config.batch_size,
        limit=limit,
        seed=seed,
        input_shapes=config.input_shapes,
    )


def split(
    data: Source | Iterable | str | os.PathLike | None, model, config: DataConfig, holdout: int, seed: int
) -> tuple[Source | Iterable | None, Source | None]:
    """(calibration data, held-out verification data). Only sources of known size can be split: the first
    `holdout` samples (a fifth at most) verify, the next `config.limit` calibrate."""
    if data is None:
        return None, None
    limit = config.limit
    if isinstance(data, (str, os.PathLike)):
        generated = str(data) == "random"  # random data has no size of its own: --limit is how much to make
        data = open_data(data, model, config, seed, limit=limit if generated else None)
        limit = None if generated else limit
    size = getattr(data, "size", None)
    splittable = isinstance(data, Source) and size is not None and type(data).subset is not Source.subset
    if not splittable:
        if limit is not None:
            raise UserError("--limit needs a data source of known size (an image folder or .npz/.npy files)")
        return data, None
    kept = min(holdout, size // 5)
    if holdout and kept < holdout:
        logger.info("holding out %d of %d samples for verification (a fifth of the data)", kept, size)
    if kept == 0:
        return data.subset(0, limit), None
    return data.subset(kept, limit), data.subset(0, kept)
