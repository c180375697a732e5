"""What a model takes: each graph input's dtype, dims and batch axis, and how batches are cut, joined and
checked against them.

Not every model takes one image tensor with the batch first. A voice-activity model takes `input [B, T]`,
`state [2, B, 128]` (batch on axis 1) and a scalar `sr`; Paddle exports declare a batch of `-1`; others fix
it to 1. The batch axis of an input is, in this order: declared (`--batch-axis NAME:AXIS|none`); where the
model names its dims, the axis carrying the batch symbol (the name on axis 0 of the first input that has
one); else a dynamic axis 0; else, in a model with fixed dims, the first axis whose size is the first
input's batch (1). Inputs without one (scalars, fixed-size settings) are given once and fed to every run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .errors import UserError

Dim = int | None  # None: dynamic


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...]  # as declared (negative dims are dynamic), with --input-shape applied
    batch_axis: int | None

    @property
    def rank(self) -> int:
        return len(self.dims)

    def hint(self) -> str:
        """An `--input-shape` value for this input: its fixed dims, `N` for the batch, a placeholder elsewhere."""
        parts = []
        for axis, dim in enumerate(self.dims):
            parts.append("N" if axis == self.batch_axis else str(dim) if dim is not None else f"D{axis}")
        return f"{self.name}:{'x'.join(parts) or 'scalar'}"

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.dims)
        batch = "no batch axis" if self.batch_axis is None else f"batch axis {self.batch_axis}"
        return f"{self.name} {self.dtype.name} [{dims}] ({batch})"


@dataclass(frozen=True)
class InputSignature:
    specs: tuple[InputSpec, ...]

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def batched(self) -> list[InputSpec]:
        return [spec for spec in self.specs if spec.batch_axis is not None]

    @property
    def fixed_batch(self) -> int | None:
        """The number of samples every run must have, when the model fixes it."""
        sizes = {spec.dims[spec.batch_axis] for spec in self.batched}
        return sizes.pop() if len(sizes) == 1 and None not in sizes else None

    def spec(self, name: str) -> InputSpec:
        return next(spec for spec in self.specs if spec.name == name)

    def length(self, batch: Mapping[str, np.ndarray]) -> int:
        """Samples in a (checked) batch: the length of the batch axes; 1 for a model without one."""
        for spec in self.batched:
            return int(np.shape(batch[spec.name])[spec.batch_axis])
        return 1

    def slice(self, batch: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples `start:stop` of a batch; inputs without a batch axis pass unchanged."""
        return {name: self._take(name, array, slice(start, stop)) for name, array in batch.items()}

    def take(self, batch: Mapping[str, np.ndarray], indices) -> dict[str, np.ndarray]:
        return {name: self._take(name, array, indices) for name, array in batch.items()}

    def concatenate(self, batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        joined = {}
        for spec in self.specs:
            parts = [batch[spec.name] for batch in batches]
            joined[spec.name] = parts[0] if spec.batch_axis is None else np.concatenate(parts, axis=spec.batch_axis)
        return joined

    def random_batch(self, size: int, seed: int) -> dict[str, np.ndarray]:
        """A random input batch of `size` samples for timing (latency does not depend on the values)."""
        unknown = self.unknown()
        if unknown:
            hints = " ".join(f"--input-shape {spec.hint()}" for spec in unknown)
            raise UserError(f"timing the models needs fixed input dims: pass --data, or {hints}")
        rng = np.random.default_rng(seed)
        batch = {}
        for spec in self.specs:
            shape = [size if axis == spec.batch_axis else d for axis, d in enumerate(spec.dims)]
            batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return batch

    def resized(self, batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        """A batch of exactly `size` samples: its own, repeated as often as needed."""
        length = self.length(batch)
        return self.take(batch, np.arange(size) % length)

    def inference_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one sample for the inputs whose other dims are all known (for shape inference)."""
        shapes = {}
        for spec in self.specs:
            dims = [1 if axis == spec.batch_axis and d is None else d for axis, d in enumerate(spec.dims)]
            if all(d is not None for d in dims):
                shapes[spec.name] = tuple(dims)
        return shapes

    def unknown(self) -> list[InputSpec]:
        """Inputs with dynamic dims other than the batch axis."""
        return [s for s in self.specs if any(d is None for a, d in enumerate(s.dims) if a != s.batch_axis)]

    def run_shapes(self, batch: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
        """The shapes of a batch with one sample (for shape inference)."""
        shapes = {}
        for spec in self.specs:
            shape = list(np.shape(batch[spec.name]))
            if spec.batch_axis is not None:
                shape[spec.batch_axis] = 1
            shapes[spec.name] = tuple(shape)
        return shapes

    def check(self, batch, index: int) -> dict[str, np.ndarray]:
        """Validate one batch; one-line errors name the input, the batch and what the model expects."""
        if not isinstance(batch, Mapping):
            raise UserError(f"batch {index} is a {type(batch).__name__}, expected a dict keyed by input name")
        missing, unknown = set(self.names) - set(batch), set(batch) - set(self.names)
        if missing or unknown:
            raise UserError(f"batch {index} has inputs {sorted(batch)}, the model expects {sorted(self.names)}")
        checked, lengths = {}, {}
        for spec in self.specs:
            array = np.asarray(batch[spec.name])
            if array.dtype != spec.dtype:
                if array.dtype.kind == spec.dtype.kind or (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                    array = array.astype(spec.dtype)
                else:
                    raise UserError(
                        f"input {spec.name!r} in batch {index}: got {array.dtype} data, the model expects "
                        f"{spec.dtype}; convert or preprocess the data"
                    )
            fits = array.ndim == spec.rank and all(
                d is None or axis == spec.batch_axis or d == n
                for axis, (d, n) in enumerate(zip(spec.dims, array.shape))
            )
            if not fits:
                expected = [("N" if a == spec.batch_axis else "?" if d is None else d) for a, d in enumerate(spec.dims)]
                raise UserError(
                    f"input {spec.name!r} in batch {index}: shape {list(array.shape)} does not fit the model's "
                    f"{expected}" + ("" if spec.batch_axis is None else f" (batch on axis {spec.batch_axis})")
                )
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise UserError(f"input {spec.name!r} in batch {index} contains NaN or Inf")
            checked[spec.name] = array
            if spec.batch_axis is not None:
                lengths[spec.name] = array.shape[spec.batch_axis]
        if len(set(lengths.values())) > 1 or 0 in lengths.values():
            sizes = ", ".join(f"{name} {length}" for name, length in lengths.items())
            raise UserError(f"batch {index}: the inputs' batch axes must hold the same number of samples, got {sizes}")
        return checked

    def _take(self, name: str, array: np.ndarray, index) -> np.ndarray:
        axis = self.spec(name).batch_axis
        if axis is None:
            return array
        selector = [slice(None)] * np.ndim(array)
        selector[axis] = index
        return np.asarray(array)[tuple(selector)]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of the graph (initializers listed as inputs excluded)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def declared_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a value: ints where fixed, the symbolic name or None where dynamic (negative dims, as some
    exporters write `-1`, are dynamic)."""
    dims: list[int | str | None] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return dims


def input_signature(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    batch_axes: Mapping[str, int | None] | None = None,
) -> InputSignature:
    """The signature of `model`'s inputs (see the module doc for how batch axes are found)."""
    values = graph_inputs(model)
    input_shapes, batch_axes = dict(input_shapes or {}), dict(batch_axes or {})
    known = {value.name for value in values}
    for name in (*input_shapes, *batch_axes):
        if name not in known:
            raise UserError(f"an option names input {name!r}, but the model's inputs are {sorted(known)}")
    declared = {value.name: declared_dims(value) for value in values}
    symbol = next((d[0] for d in declared.values() if d and isinstance(d[0], str)), None)
    fixed = next((d[0] for d in declared.values() if d and isinstance(d[0], int)), None)
    specs = []
    for value in values:
        dims = declared[value.name]
        if value.name in batch_axes:
            axis = batch_axes[value.name]
            if axis is not None and not 0 <= axis < len(dims):
                raise UserError(f"--batch-axis {value.name}:{axis}: the input has {len(dims)} dims")
        elif symbol is not None and symbol in dims:
            axis = dims.index(symbol)
        elif symbol is None and dims and dims[0] is None:
            axis = 0
        elif all(isinstance(d, int) for d in dims) and dims and fixed in dims and symbol is None:
            axis = dims.index(fixed)
        else:
            axis = None
        resolved = tuple(d if isinstance(d, int) else None for d in dims)
        if value.name in input_shapes:
            resolved = _override(value.name, resolved, input_shapes[value.name], axis)
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        specs.append(InputSpec(value.name, np.dtype(dtype), resolved, axis))
    return InputSignature(tuple(specs))


def _override(name: str, declared: tuple[Dim, ...], shape: tuple[int, ...], batch_axis: int | None) -> tuple[Dim, ...]:
    """`--input-shape` dims over the declared ones: -1 keeps a dim dynamic; fixed dims must agree (the batch
    axis may be given any size: it is the number of samples per run)."""
    if len(shape) != len(declared):
        raise UserError(
            f"--input-shape {name}: {len(shape)} dims given, the model declares {len(declared)} "
            f"([{', '.join('?' if d is None else str(d) for d in declared)}])"
        )
    resolved = []
    for axis, (want, have) in enumerate(zip(shape, declared)):
        if want < 0 or axis == batch_axis:
            resolved.append(have)
        elif have is not None and have != want:
            raise UserError(f"--input-shape {name}: dim {axis} is fixed to {have} in the model, not {want}")
        else:
            resolved.append(want)
    return tuple(resolved)


def with_image_size(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], size: tuple[int, int] | None, layout: str
) -> dict[str, tuple[int, ...]]:
    """`input_shapes` plus, with `--size`, the spatial dims of the model's single image input (4-D with
    dynamic height/width) where no `--input-shape` gives them."""
    shapes = dict(input_shapes)
    images = [value for value in graph_inputs(model) if len(declared_dims(value)) == 4]
    if size is None or len(images) != 1 or images[0].name in shapes:
        return shapes
    dims = declared_dims(images[0])
    height, width = (2, 3) if layout == "NCHW" else (1, 2)
    if isinstance(dims[height], int) and isinstance(dims[width], int):
        return shapes
    shape = [d if isinstance(d, int) else -1 for d in dims]
    shape[height], shape[width] = size
    shapes[images[0].name] = tuple(shape)
    return shapes
