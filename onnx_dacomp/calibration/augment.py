"""An augmented copy of the model whose only outputs are the per-batch moment sums of each target layer,
built from the nodes each layer kind contributes (`Layer.statistics_graph`). A layer whose statistics nodes
would be too many (MAX_LAYER_NODES) exposes its input instead, and its sums are computed in numpy
(`ExposedInput`): onnxruntime's session creation grows faster than linearly with the nodes of a graph."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..layers import POSITION_SEED, GraphSums, Layer
from ..load import default_opset
from ..log import logger
from ..moments import Moments, vector_sums

# Statistics nodes of one layer above which its input is exposed instead (a graph of 100,000 nodes took
# onnxruntime minutes to load; every layer of the benchmark models stays under 300)
MAX_LAYER_NODES = 2000


@dataclass(frozen=True)
class ExposedInput:
    """A layer whose statistics are summed in numpy from its input, exposed as a graph output: the per-run
    sums are kept under `names` (second, first, count) beside the graph's own."""

    layer: Layer

    @property
    def names(self) -> list[str]:
        return [f"{self.layer.output}/dacomp_exposed/{part}" for part in ("second", "first", "count")]

    def sums(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This run's sums from the session outputs `values` (which hold the layer's input)."""
        moments = vector_sums(self.layer.input_vectors(values[self.layer.input]))
        return dict(zip(self.names, (moments.second, moments.first, np.float64(moments.count))))

    def moments(self, sums: Mapping[str, np.ndarray], images: int) -> Moments:
        second, first, count = (sums[name] for name in self.names)
        return Moments(np.asarray(second), np.asarray(first), int(round(float(count))))


def augment(
    model: onnx.ModelProto, layers: Sequence[Layer], input_shapes: Mapping[str, tuple[int, ...]], sampled: bool = True
) -> tuple[onnx.ModelProto, dict[str, GraphSums]]:
    """A new model computing only the moment sums of `layers` (the original outputs are dropped).

    `input_shapes[layer.name]` is the shape of the layer's input for this run (batch 1). `sampled`: layers may
    sum samples of their input vectors; the model then takes the input POSITION_SEED (int64 [1], one per run).
    """
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    opset = default_opset(model) or 13
    del graph.output[:]
    # each layer's statistics nodes follow the node that produces its input, so that onnxruntime can release
    # that activation early instead of holding every layer input until the end of the graph
    after: dict[int, list] = {}
    position = {output: index for index, node in enumerate(graph.node) for output in node.output}
    outputs = {}
    exposed: dict[str, None] = {}
    for layer in layers:
        nodes, initializers, sums = layer.statistics_graph(input_shapes[layer.name], opset, sampled)
        if len(nodes) > MAX_LAYER_NODES:
            logger.info(
                "layer %s: %d statistics nodes; its sums are computed from its input outside onnxruntime",
                layer.name, len(nodes),
            )  # fmt: skip
            exposed[layer.input] = None
            outputs[layer.name] = ExposedInput(layer)
            continue
        after.setdefault(position.get(layer.input, -1), []).extend(nodes)
        graph.initializer.extend(initializers)
        for name in sums.names:
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        outputs[layer.name] = sums
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in exposed)
    if any(POSITION_SEED in node.input for nodes in after.values() for node in nodes):
        graph.input.append(helper.make_tensor_value_info(POSITION_SEED, TensorProto.INT64, [1]))
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend(after.get(-1, []))
    for index, node in enumerate(original):
        graph.node.append(node)
        graph.node.extend(after.get(index, []))
    return new, outputs
