"""Stage 2: find the Conv layers of a model, read their geometry and constant weights, count params and MACs.

Every convolution-like node is reported: the decomposable ones as targets, the others with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UserError
from .shapes import Shape, infer_shapes

CONV_LIKE = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"}
SUPPORTED_DTYPES = ("float32", "float16")
NON_FINITE_WEIGHT = "weight contains NaN or Inf"
PASS_THROUGH = ("Identity", "Cast")  # nodes between a constant and the Conv that still leave a constant


@dataclass(frozen=True)
class ConvLayer:
    """One convolution-like node. `skip_reason` is None exactly when the layer can be decomposed."""

    name: str  # node name, or its output name when the node has none
    op_type: str
    output: str  # the node's output tensor: unique in the graph, the key used by later stages
    input: str
    weight: str | None = None
    bias: str | None = None
    dtype: str | None = None
    out_channels: int | None = None
    in_channels: int | None = None
    group: int = 1
    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # ONNX order: all begins, then all ends; zeros under auto_pad
    auto_pad: str = "NOTSET"
    dilations: tuple[int, ...] = ()
    input_shape: Shape | None = None  # with batch 1
    output_shape: Shape | None = None  # with batch 1
    skip_reason: str | None = None

    @property
    def decomposable(self) -> bool:
        return self.skip_reason is None

    @property
    def params(self) -> int | None:
        if self.out_channels is None or self.in_channels is None or not self.kernel_shape:
            return None
        weights = self.out_channels * (self.in_channels // self.group) * math.prod(self.kernel_shape)
        return weights + (self.out_channels if self.bias else 0)

    @property
    def macs(self) -> int | None:
        """Multiply-accumulates for one image."""
        if self.output_shape is None or self.params is None:
            return None
        per_output = (self.in_channels // self.group) * math.prod(self.kernel_shape)
        return self.out_channels * per_output * math.prod(self.output_shape[2:])


@dataclass(frozen=True)
class TargetScan:
    """All convolution-like layers of a model, in graph order."""

    layers: tuple[ConvLayer, ...]

    @property
    def targets(self) -> tuple[ConvLayer, ...]:
        return tuple(layer for layer in self.layers if layer.decomposable)

    @property
    def skipped(self) -> tuple[ConvLayer, ...]:
        return tuple(layer for layer in self.layers if not layer.decomposable)

    def layer(self, name: str) -> ConvLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


class ConstantResolver:
    """Values of constant tensors: initializers and Constant nodes, looked through Identity and Cast."""

    def __init__(self, graph: onnx.GraphProto):
        self._initializers = {init.name: init for init in graph.initializer}
        self._overridable = {value.name for value in graph.input} & set(self._initializers)
        self._producers = {output: node for node in graph.node for output in node.output}

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producers.get(name)

    def source(self, name: str) -> str | None:
        """Why `name` is not a usable constant ('input', 'computed by OP'), or None if it is one."""
        name = self._through_identity(name)
        if name in self._overridable:
            return "input"
        if name in self._initializers:
            return None
        node = self._producers.get(name)
        if node is not None and node.op_type == "Constant":
            return None
        return f"computed by {node.op_type}" if node is not None else "input"

    def value(self, name: str) -> np.ndarray:
        node = self._producers.get(name)
        if name not in self._initializers and node is not None and node.op_type in PASS_THROUGH:
            value = self.value(node.input[0])
            if node.op_type == "Cast":
                to = helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
                value = value.astype(helper.tensor_dtype_to_np_dtype(to))
            return value
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        attribute = node.attribute[0]
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        return np.asarray(helper.get_attribute_value(attribute))

    def _through_identity(self, name: str) -> str:
        """The tensor behind Identity and Cast nodes (a Cast of a constant is a constant)."""
        node = self._producers.get(name)
        while node is not None and node.op_type in PASS_THROUGH and name not in self._initializers:
            name = node.input[0]
            node = self._producers.get(name)
        return name


def read_weights(model: onnx.ModelProto, layers) -> dict[str, np.ndarray]:
    """The constant weight of each decomposable layer, keyed by layer name."""
    resolver = ConstantResolver(model.graph)
    return {layer.name: resolver.value(layer.weight) for layer in layers if layer.decomposable}


def display_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def find_targets(model: onnx.ModelProto, input_shapes: Mapping[str, Shape] | None = None) -> TargetScan:
    """Scan the top-level graph for convolution-like nodes; raise `UserError` if there is none."""
    graph = model.graph
    conv_nodes = [node for node in graph.node if node.op_type in CONV_LIKE]
    if not conv_nodes:
        raise UserError("the model has no Conv layer: nothing to compress")
    names = [name for node in conv_nodes if node.op_type == "Conv" for name in (node.input[0], node.output[0])]
    shapes = infer_shapes(model, names, input_shapes)
    resolver = ConstantResolver(graph)
    layers = []
    for node in conv_nodes:
        if node.op_type == "Conv":
            layers.append(_conv_layer(node, resolver, shapes))
        else:
            layers.append(
                ConvLayer(
                    display_name(node),
                    node.op_type,
                    node.output[0],
                    node.input[0],
                    skip_reason=_unsupported_op_reason(node.op_type),
                )
            )
    _check_unique_names(layers)
    return TargetScan(tuple(layers))


def _unsupported_op_reason(op_type: str) -> str:
    if op_type == "ConvTranspose":
        return "ConvTranspose (transposed convolution) is not supported"
    return f"quantized convolution ({op_type}): decompose the float model before quantizing it"


def _conv_layer(node: onnx.NodeProto, resolver: ConstantResolver, shapes: Mapping[str, Shape | None]) -> ConvLayer:
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    weight_name = node.input[1]
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    common = dict(
        name=display_name(node),
        op_type="Conv",
        output=node.output[0],
        input=node.input[0],
        weight=weight_name,
        bias=bias_name,
        input_shape=shapes.get(node.input[0]),
        output_shape=shapes.get(node.output[0]),
    )

    weight_source = resolver.source(weight_name)
    if weight_source is not None:
        producer = resolver.producer(weight_name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            reason = "quantized weight (DequantizeLinear): decompose the float model before quantizing it"
        elif weight_source == "input":
            reason = "weight is a graph input (can change at run time), not a constant"
        else:
            reason = f"weight is not a constant ({weight_source})"
        return ConvLayer(**common, skip_reason=reason)

    weight = resolver.value(weight_name)
    spatial = weight.ndim - 2
    group = int(attrs.get("group", 1))
    in_channels = weight.shape[1] * group
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", weight.shape[2:]))
    pads = tuple(int(p) for p in attrs.get("pads", [0] * 2 * spatial))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    geometry = dict(
        dtype=str(weight.dtype),
        out_channels=int(weight.shape[0]),
        in_channels=int(in_channels),
        group=group,
        kernel_shape=kernel,
        strides=tuple(int(s) for s in attrs.get("strides", [1] * spatial)),
        pads=pads if auto_pad == "NOTSET" else (0,) * 2 * spatial,
        auto_pad=auto_pad,
        dilations=tuple(int(d) for d in attrs.get("dilations", [1] * spatial)),
    )
    if common["output_shape"] is None and common["input_shape"] is not None:
        common["output_shape"] = _conv_output_shape(common["input_shape"], weight.shape[0], geometry)

    reason = None
    if spatial not in (1, 2):
        reason = f"{spatial}-D convolution is not supported (1-D and 2-D are)"
    elif group == in_channels and group > 1:
        reason = "depthwise convolution (group == input channels): no channel mixing to factor"
    elif weight.shape[0] % group:
        reason = f"output channels {weight.shape[0]} not divisible by group {group}"
    elif str(weight.dtype) not in SUPPORTED_DTYPES:
        reason = f"weight dtype {weight.dtype} is not supported (float32 and float16 are)"
    elif bias_name is not None and resolver.source(bias_name) is not None:
        reason = "bias is not a constant"
    elif not np.isfinite(weight).all():
        reason = NON_FINITE_WEIGHT
    return ConvLayer(**common, **geometry, skip_reason=reason)


def _conv_output_shape(input_shape: Shape, out_channels: int, geometry: dict) -> Shape | None:
    """Output shape from the Conv formula (explicit pads, or auto_pad as ONNX defines it)."""
    spatial_in = input_shape[2:]
    kernel, strides, dilations = geometry["kernel_shape"], geometry["strides"], geometry["dilations"]
    if len(spatial_in) != len(kernel):
        return None
    out = []
    for axis, size in enumerate(spatial_in):
        extent = (kernel[axis] - 1) * dilations[axis] + 1
        if geometry["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[axis]))
        elif geometry["auto_pad"] == "VALID":
            out.append((size - extent) // strides[axis] + 1)
        else:
            padded = size + geometry["pads"][axis] + geometry["pads"][axis + len(kernel)]
            out.append((padded - extent) // strides[axis] + 1)
    return (1, out_channels, *out)


def _check_unique_names(layers: list[ConvLayer]) -> None:
    seen: set[str] = set()
    for index, layer in enumerate(layers):
        if layer.name in seen:
            # names must address layers uniquely (--ranks, --exclude); fall back to the unique output name
            layers[index] = replace(layer, name=layer.output)
        seen.add(layers[index].name)
