"""Static shapes of graph tensors: `--input-shape` overrides, ONNX shape inference, onnxruntime fallback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, shape_inference

from .errors import UserError
from .log import logger

Shape = tuple[int, ...]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of the graph (initializers listed as inputs excluded)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def declared_shape(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a value: ints where fixed, the symbolic name or None where dynamic."""
    dims: list[int | str | None] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or None)
    return dims


def with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    """A copy of `model` whose inputs named in `shapes` have those fixed dims (validated)."""
    inputs = {value.name: value for value in graph_inputs(model)}
    for name, shape in shapes.items():
        if name not in inputs:
            raise UserError(f"--input-shape names {name!r}, but the model's inputs are {sorted(inputs)}")
        declared = declared_shape(inputs[name])
        if len(declared) != len(shape):
            raise UserError(f"--input-shape {name}: {len(shape)} dims given, the model declares {len(declared)}")
        for axis, (want, have) in enumerate(zip(shape, declared)):
            if isinstance(have, int) and have != want:
                raise UserError(f"--input-shape {name}: dim {axis} is fixed to {have} in the model, not {want}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    return copy


def concrete_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> dict[str, Shape] | None:
    """Fixed shapes for every graph input: overrides first, dynamic batch (axis 0) as 1; None if unknown."""
    result: dict[str, Shape] = {}
    for value in graph_inputs(model):
        if value.name in shapes:
            result[value.name] = tuple(shapes[value.name])
            continue
        dims = declared_shape(value)
        if not dims:  # a scalar input: no batch axis
            result[value.name] = ()
            continue
        if any(not isinstance(d, int) for d in dims[1:]):
            return None
        result[value.name] = (dims[0] if isinstance(dims[0], int) else 1, *dims[1:])
    return result


def infer_shapes(
    model: onnx.ModelProto, names: Sequence[str], input_shapes: Mapping[str, Shape] | None = None
) -> dict[str, Shape | None]:
    """Static shapes of the tensors `names` for the given inputs (batch 1 where the batch is dynamic).

    ONNX shape inference first; tensors it leaves partly unknown (for example behind a Pad whose pads are
    computed at run time) are measured by running the model once in onnxruntime on zeros.
    """
    input_shapes = dict(input_shapes or {})
    model = with_input_shapes(model, input_shapes) if input_shapes else model
    known: dict[str, Shape | None] = {name: None for name in names}
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
        values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
        for value in values:
            if value.name in known:
                dims = declared_shape(value)
                if dims and all(isinstance(d, int) for d in dims[1:]):
                    known[value.name] = (1, *dims[1:])
    except Exception as exc:  # inference is an optimisation; the runtime fallback below is authoritative
        logger.debug("ONNX shape inference failed (%s); measuring shapes with onnxruntime", exc)
    missing = [name for name, shape in known.items() if shape is None]
    if missing:
        known.update(_measure_shapes(model, missing, input_shapes))
    return known


def _measure_shapes(
    model: onnx.ModelProto, names: Sequence[str], input_shapes: Mapping[str, Shape]
) -> dict[str, Shape | None]:
    import onnxruntime as ort  # deferred: importing onnxruntime costs a second on every CLI start

    feeds_shapes = concrete_input_shapes(model, input_shapes)
    if feeds_shapes is None:
        logger.debug("cannot resolve some layer shapes: the model has dynamic dims")
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {value.name for value in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in existing)
    feeds = {}
    for value in graph_inputs(probe):
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = np.zeros(feeds_shapes[value.name], dtype=dtype)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = session.run(list(names), feeds)
    except Exception as exc:
        logger.warning("cannot measure layer shapes with onnxruntime: %s", str(exc).splitlines()[0])
        return {}
    return {name: (1, *(int(d) for d in array.shape[1:])) for name, array in zip(names, outputs)}
