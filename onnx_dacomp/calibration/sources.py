"""Calibration data sources. Every source is an iterable of `{input_name: array}` batches.

Adapters: .npz/.npy files and folders of them, folders of images (class sub-folders or flat), any Python
iterable or onnxruntime `CalibrationDataReader` (`get_next()`), and random data on explicit request.
Sources with labels (class folders, .npz with a `labels` array) expose them through `labelled()`.
"""

from __future__ import annotations

import copy
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..config import DataConfig, ImagePreprocessing
from ..errors import UserError
from ..inputs import InputSignature, declared_dims, input_signature
from ..log import logger

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}
ARRAY_SUFFIXES = {".npz", ".npy"}
Batch = dict[str, np.ndarray]


class Source:
    """Base of the adapters: iterate batches; `labelled()` also yields labels (or None)."""

    description = "calibration data"
    size: int | None = None  # number of samples when known (for progress bars)
    labels_from: str | None = None  # where the labels come from, when there are any

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
    """Images in class sub-folders or directly in the folder, with labels from, in this order: a labels file
    (`labels`: CSV/TSV of file name -> class index), a class order file (`class_order`: one class folder
    name per line, the line number is the class index), or the sorted class folder names; a flat folder
    without a labels file has none. Sorted folder names are the model's class index only when every class is
    there: if `classes` (the model's output width) differs from the folders found, the labels are dropped
    with a warning instead of reporting a top-1 of mislabelled images.

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
        *,
        labels: str | os.PathLike | None = None,
        class_order: str | os.PathLike | None = None,
        classes: int | None = None,
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"image folder not found: {self.folder}")
        self.input_name, self.preprocessing, self.batch_size = input_name, preprocessing, batch_size
        self.layout_channels, self.image_size = image_geometry(input_shape, preprocessing)
        folders = sorted(p.name for p in self.folder.iterdir() if p.is_dir() and _images_in(p))
        paths = [path for name in folders for path in _images_in(self.folder / name)] or _images_in(self.folder)
        if not paths:
            raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.folder}")
        indices, self.labels_from = self._labels(paths, folders, labels, class_order, classes)
        files = list(zip(paths, indices))
        order = np.random.default_rng(seed).permutation(len(files))
        stop = None if limit is None else offset + limit
        self.files = [files[i] for i in order[offset:stop]]
        if not self.files:
            raise UserError(f"{self.folder} has {len(files)} images; offset {offset} leaves none")
        self.classes = folders
        self._describe()

    @property
    def has_labels(self) -> bool:
        return self.labels_from is not None

    def _labels(self, paths, folders, labels, class_order, classes) -> tuple[list[int], str | None]:
        if labels is not None:
            table = read_labels(labels)
            found = [table.get(str(path.relative_to(self.folder)), table.get(path.name)) for path in paths]
            missing = [path.name for path, index in zip(paths, found) if index is None]
            if missing:
                raise UserError(
                    f"the labels file {labels} has no class for {len(missing)} of {len(paths)} images "
                    f"(e.g. {missing[0]}); list every image by file name"
                )
            return found, f"labels file {labels}"
        if not folders:
            return [-1] * len(paths), None
        if class_order is not None:
            order = {name: index for index, name in enumerate(_lines(class_order))}
            unknown = sorted(set(folders) - set(order))
            if unknown:
                raise UserError(f"class folder {unknown[0]!r} is not in the class order file {class_order}")
            source = f"class order file {class_order}"
        else:
            order = {name: index for index, name in enumerate(folders)}
            if classes is not None and classes != len(folders):
                logger.warning(
                    "%s has %d class folders but the model scores %d classes: their sorted order is not the "
                    "model's class index; pass --labels FILE or --class-order FILE (no top-1 is reported)",
                    self.folder,
                    len(folders),
                    classes,
                )
                return [-1] * len(paths), None
            source = "sorted class folder names"
        return [order[path.parent.name] for path in paths], source

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
            labels = np.array([label for _, label in chunk]) if self.labels_from else None
            yield {self.input_name: np.stack(arrays)}, labels


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """A labels file: one image per line, its file name (or path in the folder) and its class index,
    separated by a tab, a comma or spaces (further columns are ignored; a header line is skipped)."""
    table = {}
    for number, line in enumerate(_lines(path), start=1):
        separated = line.split("\t") if "\t" in line else line.split(",") if "," in line else line.split()
        fields = [field.strip() for field in separated]
        if len(fields) < 2 or not fields[1].lstrip("-").isdigit():
            if number == 1:
                continue  # a header
            raise UserError(f"{path}, line {number}: expected a file name and a class index, got {line!r}")
        table[fields[0]] = int(fields[1])
    if not table:
        raise UserError(f"the labels file {path} lists no images")
    return table


def _lines(path: str | os.PathLike) -> list[str]:
    try:
        return [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


class ArraySource(Source):
    """`.npz` (arrays keyed by input name, optional `labels`) or `.npy` files, or a folder of them.

    Samples lie along each input's batch axis (`inputs`: the model's `InputSignature`, or input names, all
    batched on axis 0); an input without a batch axis is stored once per file and fed to every batch.
    `limit` and `offset` select from a seeded permutation of all samples (files are often sorted by class,
    so the first N would miss classes); disjoint offsets give disjoint splits.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        inputs: InputSignature | Sequence[str],
        batch_size: int = 32,
        limit: int | None = None,
        offset: int = 0,
        seed: int = 0,
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
        self.path, self.batch_size = path, batch_size
        self.axes = _batch_axes(inputs)
        self.lengths = [self._length(file) for file in self.files]
        labelled = all(file.suffix == ".npz" and "labels" in _array_shapes(file) for file in self.files)
        self.labels_from = f"the labels arrays of {path}" if labelled else None
        available = sum(self.lengths)
        order = np.random.default_rng(seed).permutation(available)
        self.chosen = order[offset : None if limit is None else offset + limit]
        if len(self.chosen) == 0:
            raise UserError(f"{path} holds {available} samples; none are left after the first {offset}")
        self._describe(available)

    def _describe(self, available: int) -> None:
        self.size = len(self.chosen)
        part = "" if self.size == available else f" (a seeded random {self.size} of {available})"
        self.description = f"{self.size} samples from {self.path}{part}"

    def subset(self, offset: int, limit: int | None) -> ArraySource:
        part = copy.copy(self)
        part.chosen = self.chosen[offset : None if limit is None else offset + limit]
        if len(part.chosen) == 0:
            raise UserError(f"{self.path} holds {self.size} samples; none are left after the first {offset}")
        part._describe(sum(self.lengths))
        return part

    def _length(self, path: Path) -> int:
        """Samples in one file, from the array headers (nothing is loaded)."""
        shapes = _array_shapes(path)
        shapes.pop("labels", None)
        batched = [(name, axis) for name, axis in self.axes.items() if axis is not None]
        if len(shapes) == 1 and len(self.axes) == 1:
            shapes = {next(iter(self.axes)): next(iter(shapes.values()))}
        for name, axis in batched:
            if name in shapes and len(shapes[name]) > axis:
                return shapes[name][axis]
        raise UserError(
            f"{path} holds arrays {sorted(shapes)} but the model's inputs are {list(self.axes)}: key the arrays "
            f"by input name"
        )

    def _arrays(self, path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        try:
            loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix == ".npy" else None)
            if isinstance(loaded, np.ndarray):
                content = {"": loaded}
            else:
                with loaded:
                    content = {key: loaded[key] for key in loaded.files}
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
        labels = content.pop("labels", None)
        names = list(self.axes)
        if set(content) == set(names):
            arrays = content
        elif len(content) == 1 and len(names) == 1:
            arrays = {names[0]: next(iter(content.values()))}
        else:
            raise UserError(
                f"{path} holds arrays {sorted(content)} but the model's inputs are {names}: key the arrays by "
                f"input name (inputs without a batch axis are stored once)"
            )
        lengths = {name: array.shape[axis] for name, array in arrays.items() if (axis := self.axes[name]) is not None}
        if labels is not None:
            lengths["labels"] = len(labels)
        if len(set(lengths.values())) != 1:
            sizes = ", ".join(
                f"{name} {length}" + (f" (axis {self.axes[name]})" if name in self.axes else "")
                for name, length in lengths.items()
            )
            raise UserError(
                f"{path}: the inputs' batch axes hold different numbers of samples: {sizes}; store the samples "
                f"along each input's batch axis or pass --batch-axis NAME:AXIS"
            )
        return arrays, labels

    def labelled(self) -> Iterator[tuple[Batch, np.ndarray | None]]:
        start = 0
        for path, length in zip(self.files, self.lengths):
            picked = np.sort(self.chosen[(self.chosen >= start) & (self.chosen < start + length)]) - start
            start += length
            if len(picked) == 0:
                continue
            arrays, labels = self._arrays(path)
            for first in range(0, len(picked), self.batch_size):
                indices = picked[first : first + self.batch_size]
                batch = {name: _take(array, self.axes[name], indices) for name, array in arrays.items()}
                for name, array in batch.items():
                    if array.dtype.kind in "fc" and not np.isfinite(array).all():
                        raise UserError(f"{path}: array for input {name!r} contains NaN or Inf")
                yield batch, None if labels is None else np.asarray(labels[indices])


class IterableSource(Source):
    """Any iterable of `{input_name: array}` (or bare arrays for a single-input model), or an onnxruntime
    `CalibrationDataReader` (anything with `get_next()` returning a dict, then None)."""

    def __init__(self, data, inputs: InputSignature | Sequence[str], description: str = "user-supplied batches"):
        self.data, self.input_names, self.description = data, list(_batch_axes(inputs)), description

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

    def __init__(self, signature: InputSignature, batch_size: int = 32, batches: int = 8, seed: int = 0):
        unknown = signature.unknown()
        if unknown:
            hints = " ".join(f"--input-shape {spec.hint()}" for spec in unknown)
            raise UserError(f"random data needs fixed input dims: pass {hints} (N: any batch size)")
        logger.warning(  # compress calibrates on it, evaluate verifies on it: either way not on real inputs
            "random data stands in for real inputs: statistics and errors measured on it do not describe the "
            "model's inputs (the distribution-aware fit loses its advantage); pass --data with real samples"
        )
        self.signature, self.batch_size, self.batches, self.seed = signature, batch_size, batches, seed
        self.size = batches * (signature.fixed_batch or batch_size)
        self.description = f"random normal data ({batches} batches, seed {seed})"

    def labelled(self) -> Iterator[tuple[Batch, np.ndarray | None]]:
        rng = np.random.default_rng(self.seed)
        size = self.signature.fixed_batch or self.batch_size
        for _ in range(self.batches):
            batch = {}
            for spec in self.signature.specs:
                shape = [size if axis == spec.batch_axis else d for axis, d in enumerate(spec.dims)]
                batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            yield batch, None


def _array_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every array in a .npy/.npz file, read from the array headers only."""
    try:
        if path.suffix == ".npy":
            return {"": np.load(path, mmap_mode="r", allow_pickle=False).shape}
        shapes = {}
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shapes[member.removesuffix(".npy")] = reader(stream)[0]
        return shapes
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _batch_axes(inputs: InputSignature | Sequence[str]) -> dict[str, int | None]:
    if isinstance(inputs, InputSignature):
        return {spec.name: spec.batch_axis for spec in inputs.specs}
    return {name: 0 for name in inputs}


def _take(array: np.ndarray, axis: int | None, indices) -> np.ndarray:
    if axis is None:
        return np.asarray(array)
    return np.take(array, indices, axis=axis)


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
    preprocessing.check_channels(channels)
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
    batch_axes: Mapping[str, int | None] | None = None,
    labels: str | os.PathLike | None = None,
    class_order: str | os.PathLike | None = None,
) -> Source:
    """A source from a command-line style spec: `natural`, `random`, a .npz/.npy file, or a folder of
    arrays or images."""
    signature = input_signature(model, input_shapes, batch_axes)
    if str(spec) == "random":
        batches = max(1, -(-(limit or 8 * batch_size) // batch_size))
        return RandomSource(signature, batch_size, batches=batches, seed=seed)
    path = Path(spec)
    if str(spec) != "natural" and not path.exists():
        raise UserError(f"data not found: {path} (give a folder of images, .npz/.npy files, 'natural' or 'random')")
    if str(spec) == "natural" or path.is_dir() and not _holds_arrays(path):
        images = [spec for spec in signature.specs if spec.rank == 4]
        if len(images) != 1 or len(signature.specs) != 1:
            raise UserError(f"images feed models with one 4-D image input; this one takes {_inputs(signature)}")
        name, shape = images[0].name, images[0].dims
        if str(spec) == "natural":
            from .natural import DEFAULT_SAMPLES, NaturalImageSource

            count = limit or DEFAULT_SAMPLES
            return NaturalImageSource(name, shape, preprocessing, count=count, batch_size=batch_size, seed=seed)
        return ImageFolderSource(
            path, name, shape, preprocessing, batch_size=batch_size, limit=limit, offset=offset, seed=seed,
            labels=labels, class_order=class_order, classes=output_classes(model),
        )  # fmt: skip
    if labels is not None or class_order is not None:
        raise UserError("--labels and --class-order apply to image folders; .npz files carry a `labels` array")
    return ArraySource(path, signature, batch_size=batch_size, limit=limit, offset=offset, seed=seed)


def output_classes(model) -> int | None:
    """The number of classes the model scores, if its first output is `[N, C]` with a fixed C."""
    dims = declared_dims(model.graph.output[0]) if model.graph.output else []
    return dims[1] if len(dims) == 2 and isinstance(dims[1], int) else None


def _holds_arrays(folder: Path) -> bool:
    return any(p.suffix in ARRAY_SUFFIXES for p in folder.iterdir())


def _inputs(signature: InputSignature) -> str:
    return ", ".join(spec.describe() for spec in signature.specs)


def open_data(spec: str | os.PathLike, model, config: DataConfig, seed: int, *, limit: int | None = None) -> Source:
    """The source a spec names (as `--data`), with `config`'s preprocessing, batch size, input shapes, batch
    axes and labels."""
    return open_source(
        spec,
        model,
        preprocessing=config.preprocessing,
        batch_size=config.batch_size,
        limit=limit,
        seed=seed,
        input_shapes=config.input_shapes,
        batch_axes=config.batch_axes,
        labels=config.labels,
        class_order=config.class_order,
    )


def rereadable(data) -> bool:
    """Whether iterating `data` again gives the same samples (files, generated data, lists), unlike a
    one-pass iterable or a calibration data reader."""
    return isinstance(data, (list, tuple)) or (isinstance(data, Source) and not isinstance(data, IterableSource))


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
