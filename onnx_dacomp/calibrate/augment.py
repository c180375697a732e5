"""An augmented copy of the model whose extra outputs are the per-batch patch sums of each target layer.

The patches are cut inside onnxruntime (Pad, then one strided Slice per kernel tap, concatenated) and their
Gram matrix is one Gemm per group, so activations never leave the runtime: only `n x n` sums come back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..load import default_opset
from ..targets import ConvLayer
from .patches import explicit_pads, output_spatial, patch_size


@dataclass(frozen=True)
class LayerOutputs:
    """Names of the augmented outputs of one layer: per group, the Gram (n x n) and the patch sum (n)."""

    second: tuple[str, ...]
    first: tuple[str, ...]
    positions: int  # output positions per image


def augment(
    model: onnx.ModelProto, layers: Sequence[ConvLayer], input_spatial: Mapping[str, tuple[int, ...]]
) -> tuple[onnx.ModelProto, dict[str, LayerOutputs]]:
    """A new model computing only the patch sums of `layers` (the original outputs are dropped).

    `input_spatial[layer.name]` is the spatial size of the layer's input for this run.
    """
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    opset = default_opset(model) or 13
    del graph.output[:]
    outputs = {}
    for layer in layers:
        nodes, initializers, layer_outputs = _patch_sum_nodes(layer, input_spatial[layer.name], opset)
        graph.node.extend(nodes)
        graph.initializer.extend(initializers)
        for name in layer_outputs.second + layer_outputs.first:
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        outputs[layer.name] = layer_outputs
    return new, outputs


def _patch_sum_nodes(layer: ConvLayer, spatial_in: tuple[int, ...], opset: int):
    prefix = f"{layer.output}/dacomp_stats"
    spatial = len(spatial_in)
    nodes, inits = [], []

    def constant(suffix: str, values) -> str:
        name = f"{prefix}/{suffix}"
        if name not in {init.name for init in inits}:
            inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def node(op: str, inputs: list[str], suffix: str, **attrs) -> str:
        output = f"{prefix}/{suffix}"
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    current = layer.input
    if layer.dtype != "float32":
        current = node("Cast", [current], "cast", to=TensorProto.FLOAT)
    pads = explicit_pads(layer, spatial_in)
    if any(pads):
        full = [0, 0, *pads[:spatial], 0, 0, *pads[spatial:]]
        current = node("Pad", [current, constant("pads", full)], "pad", mode="constant")
    # channels first, so that concatenating the tap slices on axis 1 yields rows ordered (channel, tap)
    current = node("Transpose", [current], "channels_first", perm=[1, 0, *range(2, 2 + spatial)])
    out = output_spatial(layer, spatial_in)
    axes = list(range(2, 2 + spatial))
    taps = []
    for index, offsets in enumerate(np.ndindex(*layer.kernel_shape)):
        starts = [o * d for o, d in zip(offsets, layer.dilations)]
        ends = [start + (n - 1) * s + 1 for start, n, s in zip(starts, out, layer.strides)]
        taps.append(
            node(
                "Slice",
                [
                    current,
                    constant(f"starts_{index}", starts),
                    constant(f"ends_{index}", ends),
                    constant(f"axes_{index}", axes),
                    constant(f"steps_{index}", layer.strides),
                ],
                f"tap_{index}",
            )
        )
    stacked = node("Concat", taps, "taps", axis=1) if len(taps) > 1 else taps[0]
    size = patch_size(layer)
    matrix = node("Reshape", [stacked, constant("shape", [size * layer.group, -1])], "patches")
    seconds, firsts = [], []
    for group in range(layer.group):
        rows = matrix
        if layer.group > 1:
            rows = node(
                "Slice",
                [
                    matrix,
                    constant(f"group_start_{group}", [group * size]),
                    constant(f"group_end_{group}", [(group + 1) * size]),
                    constant("group_axis", [0]),
                ],
                f"group_{group}",
            )
        seconds.append(node("Gemm", [rows, rows], f"second_{group}", transB=1))
        if opset >= 13:
            firsts.append(node("ReduceSum", [rows, constant("sum_axis", [1])], f"first_{group}", keepdims=0))
        else:
            firsts.append(node("ReduceSum", [rows], f"first_{group}", axes=[1], keepdims=0))
    return nodes, inits, LayerOutputs(tuple(seconds), tuple(firsts), int(np.prod(out)))
