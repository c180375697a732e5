"""An augmented copy of the model whose only outputs are the per-batch moment sums of each target layer,
built from the nodes each layer kind contributes (`Layer.statistics_graph`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
from onnx import TensorProto, helper

from ..layers import POSITION_SEED, GraphSums, Layer
from ..load import default_opset


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
    for layer in layers:
        nodes, initializers, sums = layer.statistics_graph(input_shapes[layer.name], opset, sampled)
        after.setdefault(position.get(layer.input, -1), []).extend(nodes)
        graph.initializer.extend(initializers)
        for name in sums.names:
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        outputs[layer.name] = sums
    if any(POSITION_SEED in node.input for nodes in after.values() for node in nodes):
        graph.input.append(helper.make_tensor_value_info(POSITION_SEED, TensorProto.INT64, [1]))
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend(after.get(-1, []))
    for index, node in enumerate(original):
        graph.node.append(node)
        graph.node.extend(after.get(index, []))
    return new, outputs
