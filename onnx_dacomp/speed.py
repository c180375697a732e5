"""Per-layer latency in onnxruntime: is a layer's chain really faster than the original Conv?

Small layers and CP's depthwise pair are often slower than the dense conv they replace, whatever their MACs.
Each candidate is timed as a one-layer model (the original Conv, and the chain built by `rewrite` from
factors of the chosen ranks; values do not change the speed) on the chosen execution provider.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .decompose.factors import CPFactors, SVDFactors, Tucker2Factors
from .evaluate import Latency, measure_latency
from .rewrite import replace_convs
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
    return measure_latency(model, chain, feeds, device=device, warmup=3, repeats=repeats)


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
