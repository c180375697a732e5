"""Per-layer latency in onnxruntime: is a layer's chain really faster than the original Conv?

Small layers and CP's depthwise pair are often slower than the dense conv they replace, whatever their MACs.
Each candidate is timed as a one-layer model (the original Conv, and the chain built by `rewrite` from
factors of the chosen ranks; values do not change the speed) on the chosen execution provider.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from dataclasses import replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .decompose.factors import CPFactors, SVDFactors, Tucker2Factors
from .evaluate import Latency, measure_latency, session_latency
from .rewrite import replace_convs
from .runtime import create_session, provider_name
from .targets import ConvLayer

IR_VERSION = 8


def layer_latency(
    layer: ConvLayer, method: str, ranks: tuple[int, ...], *, batch: int, device: str, opset: int, repeats: int = 30
) -> Latency:
    """Median latency of the original layer and of its chain at `batch` images."""
    model, feeds = _single_conv(layer, batch, opset)
    single = replace(layer, input="x", output="y", weight="W", bias="B" if layer.bias else None)
    factors = [_placeholder_factors(layer, method, ranks, seed=g) for g in range(layer.group)]
    chain = replace_convs(model, {"y": (single, factors)})
    return measure_latency(model, chain, feeds, device=device, repeats=repeats)


class LatencyTable:
    """Measured latency (ms) of original layers and of chains on one provider at one batch size.

    Layers of the same geometry (channels, kernel, stride, padding, dilation, input size, dtype) share
    their measurements, so a network with many repeated blocks is timed once per distinct layer.
    """

    def __init__(self, *, batch: int, device: str, opset: int):
        self.batch, self.device, self.opset = batch, device, opset
        self._measured: dict[tuple, float] = {}
        self.provider = None

    def original(self, layer: ConvLayer) -> float:
        key = (_timing_key(layer), None, None)
        if key not in self._measured:
            model, feeds = _single_conv(layer, self.batch, self.opset)
            self._measured[key], self.provider = session_latency(model, feeds, device=self.device)
        return self._measured[key]

    def chain(self, layer: ConvLayer, method: str, ranks: tuple[int, ...]) -> float:
        key = (_timing_key(layer), method, tuple(ranks))
        if key not in self._measured:
            latency = layer_latency(layer, method, ranks, batch=self.batch, device=self.device, opset=self.opset)
            self._measured[key] = latency.compressed_ms
            self._measured.setdefault((_timing_key(layer), None, None), latency.original_ms)
            self.provider = latency.provider
        return self._measured[key]


def _timing_key(layer: ConvLayer) -> tuple:
    return (
        layer.out_channels,
        layer.in_channels,
        layer.group,
        tuple(layer.kernel_shape),
        tuple(layer.strides),
        tuple(layer.pads),
        layer.auto_pad,
        tuple(layer.dilations),
        tuple(layer.input_shape[1:]),
        layer.dtype,
        layer.bias is not None,
    )


@functools.lru_cache(maxsize=None)
def channel_multiple(device: str) -> int:
    """The channel count that a rank should be a multiple of to run at full speed on `device`.

    onnxruntime's CPU provider runs convs in a blocked layout (NCHWc) whose block is 8 or 16 channels,
    depending on the CPU's vector width; a conv with fewer channels than the block drops out of that
    layout and pays a reorder before and after, and larger counts are padded up to the block. The block
    is found by letting onnxruntime optimize 1x1 -> 3x3 -> 1x1 chains of a few widths: the narrowest that
    stays in the blocked layout throughout. CUDA gets 8 (tensor-core tiles); 1 where neither applies.
    """
    for width in (4, 8, 16, 32):
        optimized = _optimized_chain(width, device)
        if optimized is None:
            return 8
        reorders = sum(node.op_type.startswith("Reorder") for node in optimized.graph.node)
        if reorders == 2:  # into the blocked layout once at the input, back once at the output
            return width
    return 1


def _optimized_chain(width: int, device: str) -> onnx.ModelProto | None:
    """The CPU provider's optimized graph of a 64 -> width -> width -> 64 conv chain; None on CUDA."""
    rng = np.random.default_rng(0)
    shapes = {"w0": (width, 64, 1, 1), "w1": (width, width, 3, 3), "w2": (64, width, 1, 1)}
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"]),
        helper.make_node("Conv", ["a", "w1"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=IR_VERSION)
    if provider_name(create_session(model, device)) != "CPU":
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        create_session(model, "cpu", optimized_path=path)
        return onnx.load(path)


def _single_conv(layer: ConvLayer, batch: int, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    dtype = np.dtype(layer.dtype)
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    weight = rng.standard_normal((layer.out_channels, layer.in_channels // layer.group, *layer.kernel_shape))
    initializers = [numpy_helper.from_array(weight.astype(dtype), "W")]
    inputs = ["x", "W"]
    if layer.bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(layer.out_channels).astype(dtype), "B"))
        inputs.append("B")
    attributes = dict(kernel_shape=list(layer.kernel_shape), strides=list(layer.strides), group=layer.group)
    attributes["dilations"] = list(layer.dilations)
    if layer.auto_pad != "NOTSET":
        attributes["auto_pad"] = layer.auto_pad
    else:
        attributes["pads"] = list(layer.pads)
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attributes)
    shape = [batch, *layer.input_shape[1:]]
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, [None] * len(shape))],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    return model, {"x": rng.standard_normal(shape).astype(dtype)}


def _placeholder_factors(layer: ConvLayer, method: str, ranks: tuple[int, ...], seed: int):
    rng = np.random.default_rng(seed)
    out_channels, in_channels = layer.out_channels // layer.group, layer.in_channels // layer.group
    kernel = tuple(layer.kernel_shape)
    scale = 1 / math.sqrt(in_channels * math.prod(kernel))
    if method == "svd":
        rank = ranks[0]
        return SVDFactors(
            rng.standard_normal((rank, in_channels, *kernel)) * scale, rng.standard_normal((out_channels, rank))
        )
    if method == "tucker2":
        rank_out, rank_in = ranks
        return Tucker2Factors(
            rng.standard_normal((in_channels, rank_in)),
            rng.standard_normal((rank_out, rank_in, *kernel)) * scale,
            rng.standard_normal((out_channels, rank_out)),
        )
    rank = ranks[0]
    spatial = tuple(rng.standard_normal((size, rank)) for size in kernel)
    return CPFactors(
        rng.standard_normal((in_channels, rank)) * scale, spatial, rng.standard_normal((out_channels, rank))
    )
