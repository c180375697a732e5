"""The convolution kind: Conv nodes (1-D and 2-D, grouped, any stride/padding/dilation), whose input vectors
are patches (docs/MATH.md), and the other convolution-like ops, listed with the reason they are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..geometry import LayerGeometry
from .base import NON_FINITE_WEIGHT, channel_gather, one_layer_model, unique_name
from .constants import ConstantResolver
from .conv_patches import patches
from .conv_statistics import patch_sum_nodes

OP_TYPES = ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv")
SUPPORTED_DTYPES = ("float32", "float16")
DEPTHWISE = "depthwise convolution (group == input channels): no channel mixing to factor"
Shape = tuple[int, ...]


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
    def refittable(self) -> bool:
        return self.skip_reason is None or self.skip_reason == DEPTHWISE  # a depthwise conv is linear too

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

    @property
    def geometry(self) -> LayerGeometry | None:
        if self.params is None:
            return None
        spatial = len(self.kernel_shape)
        return LayerGeometry(
            out_channels=self.out_channels,
            in_channels=self.in_channels,
            group=self.group,
            kernel=tuple(self.kernel_shape),
            input_spatial=tuple(self.input_shape[2:]) if self.input_shape else (1,) * spatial,
            output_spatial=tuple(self.output_shape[2:]) if self.output_shape else (1,) * spatial,
            bias=bool(self.bias),
        )

    @property
    def vector_length(self) -> int:
        return self.in_channels // self.group * math.prod(self.kernel_shape)

    @property
    def signature(self) -> tuple:
        return (
            self.out_channels,
            self.in_channels,
            self.group,
            self.kernel_shape,
            self.strides,
            self.pads,
            self.auto_pad,
            self.dilations,
        )

    @property
    def timing_key(self) -> tuple:
        return (*self.signature, tuple(self.input_shape[1:]), self.dtype, self.bias is not None)

    absorbed = ()  # a conv replaces its own node only
    kind = "conv"

    def renamed(self, name: str) -> ConvLayer:
        return replace(self, name=name)

    def weight_matrix(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def bias_vector(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw, np.float64)

    def input_vectors(self, x: np.ndarray, dtype=np.float64) -> np.ndarray:
        return patches(x, self, dtype)

    def output_vectors(self, y: np.ndarray, dtype=np.float64) -> np.ndarray:
        y = np.asarray(y, dtype)
        return y.reshape(len(y), y.shape[1], -1).transpose(1, 0, 2).reshape(y.shape[1], -1)

    def statistics_graph(self, input_shape: Shape, opset: int, sampled: bool = True):
        return patch_sum_nodes(self, tuple(input_shape[2:]), opset, sampled)

    def chain_nodes(self, node, stages, method, bias, taken):
        dtype = np.dtype(self.dtype)
        base = f"{node.name or node.output[0]}/dacomp_{method}"
        nodes, initializers = [], []
        current = self.input
        for index, stage in enumerate(stages):
            last = index == len(stages) - 1
            if stage.channels is not None:
                current = channel_gather(current, stage.channels, 1, f"{base}_{index}", nodes, initializers, taken)
            weight_name = unique_name(f"{base}_{index}.weight", taken)
            initializers.append(numpy_helper.from_array(stage.weight.astype(dtype), weight_name))
            inputs = [current, weight_name]
            if last and bias is not None:
                bias_name = unique_name(f"{base}_{index}.bias", taken)
                initializers.append(numpy_helper.from_array(np.asarray(bias).astype(dtype), bias_name))
                inputs.append(bias_name)
            elif last and self.bias:
                inputs.append(node.input[2])
            output = node.output[0] if last else unique_name(f"{base}_{index}_output", taken)
            attributes = self._pointwise_attributes() if stage.axes is None else self._attributes(stage.axes)
            nodes.append(
                helper.make_node(
                    "Conv",
                    inputs,
                    [output],
                    name=unique_name(f"{base}_{index}", taken),
                    kernel_shape=list(stage.weight.shape[2:]),
                    group=stage.group,
                    **attributes,
                )
            )
            current = output
        return nodes, initializers

    def _attributes(self, axes: Sequence[int]) -> dict:
        """Conv attributes that apply the layer's stride, padding and dilation along `axes` only."""
        spatial = len(self.kernel_shape)
        axes = set(axes)
        strides = [self.strides[a] if a in axes else 1 for a in range(spatial)]
        dilations = [self.dilations[a] if a in axes else 1 for a in range(spatial)]
        if self.auto_pad != "NOTSET":
            # SAME_*/VALID padding is computed per axis from that axis' kernel/stride/dilation only, and an axis
            # with kernel 1 and stride 1 gets no padding, so the attribute carries over unchanged.
            return dict(strides=strides, dilations=dilations, auto_pad=self.auto_pad)
        pads = [self.pads[a] if a in axes else 0 for a in range(spatial)]
        pads += [self.pads[spatial + a] if a in axes else 0 for a in range(spatial)]
        return dict(strides=strides, dilations=dilations, pads=pads)

    def _pointwise_attributes(self) -> dict:
        ones = [1] * len(self.kernel_shape)
        return dict(strides=ones, dilations=ones, pads=[0] * 2 * len(self.kernel_shape))

    def timing_model(self, batch: int, opset: int):
        rng = np.random.default_rng(0)
        dtype = np.dtype(self.dtype)
        weight = rng.standard_normal((self.out_channels, self.in_channels // self.group, *self.kernel_shape))
        initializers = [numpy_helper.from_array(weight.astype(dtype), "W")]
        inputs = ["x", "W"]
        if self.bias:
            initializers.append(numpy_helper.from_array(rng.standard_normal(self.out_channels).astype(dtype), "B"))
            inputs.append("B")
        attributes = dict(kernel_shape=list(self.kernel_shape), strides=list(self.strides), group=self.group)
        attributes["dilations"] = list(self.dilations)
        if self.auto_pad != "NOTSET":
            attributes["auto_pad"] = self.auto_pad
        else:
            attributes["pads"] = list(self.pads)
        node = helper.make_node("Conv", inputs, ["y"], name="conv", **attributes)
        return one_layer_model([node], initializers, [batch, *self.input_shape[1:]], dtype, opset)

    def timing_baseline(self, batch: int, opset: int):
        # a depthwise 1x1 conv: one pass over the input, converted into the blocked layout and back like the layer
        channels, spatial = self.input_shape[1], len(self.kernel_shape)
        weight = numpy_helper.from_array(np.ones((channels, 1, *[1] * spatial), np.dtype(self.dtype)), "W")
        node = helper.make_node("Conv", ["x", "W"], ["y"], name="baseline", group=channels, kernel_shape=[1] * spatial)
        return one_layer_model([node], [weight], [batch, *self.input_shape[1:]], np.dtype(self.dtype), opset)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "kernel": list(self.kernel_shape),
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "stride": list(self.strides),
            "dilation": list(self.dilations),
            "group": self.group,
            "dtype": self.dtype,
            "params": self.params,
            "macs": self.macs,
            "decomposable": self.decomposable,
            "reason": self.skip_reason,
        }


def shape_names(node: onnx.NodeProto) -> list[str]:
    """The tensors whose static shapes discovery needs."""
    return [node.input[0], node.output[0]] if node.op_type == "Conv" else []


def skipped(node: onnx.NodeProto, reason: str) -> ConvLayer:
    """A node of this kind listed with the reason it is not decomposed."""
    return ConvLayer(node.name or node.output[0], node.op_type, node.output[0], node.input[0], skip_reason=reason)


def discover(
    node: onnx.NodeProto, resolver: ConstantResolver, shapes: Mapping[str, Shape | None], consumers: Mapping
) -> ConvLayer:
    if node.op_type != "Conv":
        return skipped(node, _unsupported_op_reason(node.op_type))
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    weight_name = node.input[1]
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    common = dict(
        name=node.name or node.output[0],
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
        common["output_shape"] = _output_shape(common["input_shape"], weight.shape[0], geometry)

    reason = None
    if spatial not in (1, 2):
        reason = f"{spatial}-D convolution is not supported (1-D and 2-D are)"
    elif group == in_channels and group > 1:
        reason = DEPTHWISE
    elif weight.shape[0] % group:
        reason = f"output channels {weight.shape[0]} not divisible by group {group}"
    elif str(weight.dtype) not in SUPPORTED_DTYPES:
        reason = f"weight dtype {weight.dtype} is not supported (float32 and float16 are)"
    elif bias_name is not None and resolver.source(bias_name) is not None:
        reason = "bias is not a constant"
    elif not np.isfinite(weight).all():
        reason = NON_FINITE_WEIGHT
    return ConvLayer(**common, **geometry, skip_reason=reason)


def _unsupported_op_reason(op_type: str) -> str:
    if op_type == "ConvTranspose":
        return "ConvTranspose (transposed convolution) is not supported"
    return f"quantized convolution ({op_type}): decompose the float model before quantizing it"


def _output_shape(input_shape: Shape, out_channels: int, geometry: dict) -> Shape | None:
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
