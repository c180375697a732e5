"""Static shapes of graph tensors (batch 1): `--input-shape` overrides, ONNX shape inference, onnxruntime
fallback."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import shape_inference

from .inputs import InputSignature, declared_dims, input_signature
from .log import logger

Shape = tuple[int, ...]


def with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    """A copy of `model` whose inputs named in `shapes` have those fixed dims."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    return copy


def infer_shapes(
    model: onnx.ModelProto, names: Sequence[str], input_shapes: Mapping[str, Shape] | None = None
) -> dict[str, Shape | None]:
    """Static shapes of the tensors `names` for the given inputs (batch 1 where the batch is dynamic).

    ONNX shape inference first; tensors it leaves partly unknown (for example behind a Pad whose pads are
    computed at run time) are measured by running the model once in onnxruntime on zeros.
    """
    signature = input_signature(model, input_shapes)
    fixed = signature.inference_shapes()
    model = with_input_shapes(model, fixed)
    known: dict[str, Shape | None] = {name: None for name in names}
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
        values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
        for value in values:
            if value.name in known:
                dims = declared_dims(value)
                if dims and all(isinstance(d, int) for d in dims[1:]):
                    known[value.name] = (1, *dims[1:])
    except Exception as exc:  # inference is an optimisation; the runtime fallback below is authoritative
        logger.debug("ONNX shape inference failed (%s); measuring shapes with onnxruntime", exc)
    missing = [name for name, shape in known.items() if shape is None]
    if missing and not signature.unknown():
        known.update(_measure_shapes(model, missing, signature, fixed))
    elif missing:
        logger.debug("cannot resolve some layer shapes: the model has dynamic dims")
    return known


def _measure_shapes(
    model: onnx.ModelProto, names: Sequence[str], signature: InputSignature, feeds_shapes: Mapping[str, Shape]
) -> dict[str, Shape | None]:
    import onnxruntime as ort  # deferred: importing onnxruntime costs a second on every CLI start

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {value.name for value in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in existing)
    feeds = {spec.name: np.zeros(feeds_shapes[spec.name], dtype=spec.dtype) for spec in signature.specs}
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = session.run(list(names), feeds)
    except Exception as exc:
        logger.warning("cannot measure layer shapes with onnxruntime: %s", str(exc).splitlines()[0])
        return {}
    return {name: (1, *(int(d) for d in array.shape[1:])) for name, array in zip(names, outputs)}
