"""Explicit zero Pads folded into the convolutions after them: the same function without the Pad nodes.

PyTorch exports of TensorFlow's "SAME" padding (EfficientNet-Lite, MobileNet and other TF ports) put a Pad
before each strided or depthwise convolution, its amounts computed by a small graph of constants.
onnxruntime's CPU provider runs Pad outside its blocked channel layout, so each such Pad costs a reorder out
of that layout, the pad, and a reorder back: on EfficientNet-Lite0 (17 Pads) 40 % of the time at batch 1.
A Conv pads its input with zeros itself (`pads`, begin and end per spatial axis), so a constant zero Pad of
the spatial axes whose only reader is a Conv is that Conv with larger pads. The constants that computed the
amounts are removed with the Pad where nothing else reads them; the rest of the graph is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .rewrite import check_postcondition, consumed_names, drop_unread

# ops whose output is not a function of their inputs alone: a graph of them is no constant
_RANDOM = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


@dataclass(frozen=True)
class PadFolding:
    """The model with its foldable Pads folded, and the names of the Pad nodes folded (in graph order)."""

    model: onnx.ModelProto
    folded: tuple[str, ...]


def fold_pads(model: onnx.ModelProto) -> PadFolding:
    """A new model in which every Pad that can be is folded into the Conv reading it (`model` is not changed)."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inner = set()  # names read inside subgraphs: a Pad output read there stays
    for node in graph.node:
        for attr in node.attribute:
            for subgraph in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                inner |= consumed_names(subgraph)
    outputs = {value.name for value in graph.output}
    constants = Constants(model)
    folds = {}  # Pad node index -> (the Conv's index, its new pads)
    for index, node in enumerate(graph.node):
        if node.op_type != "Pad" or not node.output or node.output[0] in outputs | inner:
            continue
        conv = readers.get(node.output[0], [])
        if len(conv) != 1 or conv[0].op_type != "Conv" or list(conv[0].input[:1]) != [node.output[0]]:
            continue
        pads = _spatial_pads(node, conv[0], constants)
        if pads is not None:
            folds[index] = (list(graph.node).index(conv[0]), pads)
    if not folds:
        return PadFolding(model, ())

    new = onnx.ModelProto()
    new.CopyFrom(model)
    nodes = list(new.graph.node)
    for pad_index, (conv_index, pads) in folds.items():
        conv = nodes[conv_index]
        conv.input[0] = nodes[pad_index].input[0]
        kept = [attr for attr in conv.attribute if attr.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("pads", pads)])
    pending = [name for index in folds for name in nodes[index].input[1:] if name]
    del new.graph.node[:]
    new.graph.node.extend(node for index, node in enumerate(nodes) if index not in folds)
    drop_unread(new.graph, pending)
    check_postcondition(model, new)
    return PadFolding(new, tuple(graph.node[index].name or graph.node[index].output[0] for index in sorted(folds)))


def _spatial_pads(pad: onnx.NodeProto, conv: onnx.NodeProto, constants: Constants) -> list[int] | None:
    """The Conv's pads with the Pad's added, or None where the Pad is not a constant zero pad of the spatial
    axes only or the Conv pads by `auto_pad`."""
    attributes = {attr.name: helper.get_attribute_value(attr) for attr in pad.attribute}
    conv_attributes = {attr.name: helper.get_attribute_value(attr) for attr in conv.attribute}
    if attributes.get("mode", b"constant") not in (b"constant", "constant"):
        return None
    if conv_attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    if "pads" in attributes:  # opset < 11: amounts and value as attributes
        amounts, value, axes = attributes["pads"], attributes.get("value", 0.0), None
    else:
        inputs = [*pad.input, "", "", ""]
        amounts = constants.value(inputs[1])
        value = constants.value(inputs[2]) if inputs[2] else 0.0
        axes = constants.value(inputs[3]) if inputs[3] else None
        if amounts is None or value is None or (inputs[3] and axes is None):
            return None
    if np.any(np.asarray(value) != 0):
        return None
    weight = constants.initializers.get(conv.input[1])
    spatial = len(conv_attributes.get("kernel_shape") or []) or (len(weight.dims) - 2 if weight is not None else 0)
    rank = len(amounts) // 2
    if axes is not None:  # amounts of the named axes only: spread over all of them
        if not spatial:
            return None
        rank, named = 2 + spatial, np.asarray(axes).reshape(-1)
        full = np.zeros(2 * rank, np.int64)
        for position, axis in enumerate(named):
            full[int(axis) % rank], full[rank + int(axis) % rank] = amounts[position], amounts[len(named) + position]
        amounts = full
    amounts = np.asarray(amounts, np.int64).reshape(-1)
    if rank < 3 or (spatial and rank != spatial + 2) or np.any(amounts < 0):
        return None
    if amounts[0] or amounts[1] or amounts[rank] or amounts[rank + 1]:
        return None  # batch or channel padding is not a Conv's
    count = rank - 2
    current = list(conv_attributes.get("pads") or [0] * (2 * count))
    added = [*amounts[2:rank], *amounts[rank + 2 :]]
    return [int(a) + int(b) for a, b in zip(current, added)]


class Constants:
    """Values of tensors computed from initializers alone (Constant nodes, shape arithmetic over constants),
    evaluated with onnx's reference evaluator; None for anything that depends on a graph input."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        inputs = {value.name for value in model.graph.input}
        # an initializer that is also a graph input can be overridden at run time: not a constant
        self.initializers = {init.name: init for init in model.graph.initializer if init.name not in inputs}
        self.producers = {output: node for node in model.graph.node for output in node.output}

    def value(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        nodes = self._ancestors(name)
        if nodes is None:
            return None
        from onnx.reference import ReferenceEvaluator

        used = {input_name for node in nodes for input_name in node.input}
        graph = helper.make_graph(
            nodes, "constant", [], [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
            [init for init_name, init in self.initializers.items() if init_name in used],
        )  # fmt: skip
        constant = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        try:
            return np.asarray(ReferenceEvaluator(constant).run(None, {})[0])
        except Exception:  # an op the reference evaluator lacks: the Pad stays
            return None

    def _ancestors(self, name: str) -> list[onnx.NodeProto] | None:
        """The nodes computing `name` in graph order, or None where a graph input or a random op feeds it."""
        found, pending = {}, [name]
        while pending:
            current = pending.pop()
            if not current or current in self.initializers or current in found:
                continue
            node = self.producers.get(current)
            if node is None or node.op_type in _RANDOM or any(attr.g.node or attr.graphs for attr in node.attribute):
                return None
            for output in node.output:
                found[output] = node
            pending.extend(node.input)
        order = {id(node): index for index, node in enumerate(self.model.graph.node)}
        return sorted({id(node): node for node in found.values()}.values(), key=lambda node: order[id(node)])
