"""Pruned channels removed at their source: a pruned layer reads a Gather of some of its input channels
(`methods/prune.py`); where those channels are computed by layers through per-channel operations only (an
activation, a bias, a depthwise conv, a batch norm, products of such tensors), those layers can compute just the
channels read, and the Gather goes. The same function, with less work before the pruned layer: ConvNeXt's MLP
computes and activates only the hidden units its second matrix product reads.

Each Gather is taken alone: the region between it and its producers must be read by nothing else (no other
reader, no graph output), and every per-channel constant in it is sliced in a copy. Anything else leaves
the Gather where it is (the model is correct either way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layers.base import Layer, unique_name
from .padding import Constants
from .rewrite import check_postcondition, drop_unread

# elementwise ops of one tensor input (further inputs, where any, must be scalar constants: Clip's bounds)
UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu",
    "Selu", "Softplus", "Softsign", "Mish", "Exp", "Neg", "Abs", "Sqrt", "Identity",
}  # fmt: skip
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"}  # elementwise, broadcasting
POOLS = ("GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool")  # each channel from its own


@dataclass(frozen=True)
class ChannelShrinking:
    """The model with the Gathers of pruned channels removed where their producers could compute only those
    channels, the names of those producers (in graph order), and the depthwise convs between a producer and its
    Gather, sliced with it (name -> the producer)."""

    model: onnx.ModelProto
    shrunk: tuple[str, ...]
    along: Mapping[str, str] = field(default_factory=dict)


def shrink_producers(model: onnx.ModelProto) -> ChannelShrinking:
    """A new model in which every channel Gather that can be is removed by slicing what computes its input
    (`model` is not changed)."""
    gathers = [node for node in model.graph.node if node.op_type == "Gather"]
    if not gathers:
        return ChannelShrinking(model, ())
    try:
        ranks = _ranks(model)
    except Exception:  # noqa: BLE001 - a model shape inference cannot read keeps its Gathers
        return ChannelShrinking(model, ())
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph, shrunk, stale, along = new.graph, [], [], {}
    taken = {init.name for init in graph.initializer} | {n for node in graph.node for n in (*node.input, *node.output)}
    constants = Constants(new)  # regions are disjoint: the constants each reads are the original ones
    for gather in [node for node in graph.node if node.op_type == "Gather"]:
        plan = _Region.find(graph, gather, ranks, constants)
        if plan is None:
            continue
        stale += plan.apply(graph, taken)
        shrunk += [node.name or node.output[0] for node in plan.producers]
        producer = shrunk[-1]
        along |= {node.name or node.output[0]: producer for node in plan.nodes if node.op_type == "Conv"}
    if not shrunk:
        return ChannelShrinking(model, ())
    drop_unread(graph, stale)
    check_postcondition(model, new)
    order = [node.name or node.output[0] for node in model.graph.node]
    return ChannelShrinking(new, tuple(sorted(set(shrunk), key=order.index)), along)


def input_producers(model: onnx.ModelProto, layers: Sequence[Layer]) -> dict[str, tuple[str, ...]]:
    """For each of `layers` (a conv of one group or a dense layer) whose input channels come from other
    layers through per-channel operations only, read by nothing else: the names of those of `layers` that
    compute them (pruning its input channels lets them compute fewer). `layers` in graph order; a layer that
    computes the input of a later one is not among the pruned ones itself (its cost then follows that layer's
    pruning alone)."""
    try:
        ranks = _ranks(model)
    except Exception:  # noqa: BLE001 - shape inference cannot read it: nothing is coupled
        return {}
    graph, constants = model.graph, Constants(model)
    names = {layer.name for layer in layers}
    found, producing = {}, set()
    for layer in reversed(layers):  # a layer computing another's pruned channels is not pruned itself
        if layer.name in producing:
            continue
        geometry = layer.geometry
        if geometry is None or geometry.group != 1 or layer.input not in ranks:
            continue
        readers = [node for node in graph.node if layer.input in node.input]
        axis = 1 if geometry.kernel else ranks[layer.input] - 1  # a conv's channels, a dense layer's features
        region = _Region.search(graph, readers[0], layer.input, axis, ranks, constants) if len(readers) == 1 else None
        if region is not None:
            producers = tuple(node.name or node.output[0] for node in region.producers)
            if all(name in names for name in producers):
                found[layer.name] = producers
                producing.update(producers)
    return dict(reversed(found.items()))


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {value.name: len(value.type.tensor_type.shape.dim) for value in values
            if value.type.tensor_type.HasField("shape")}  # fmt: skip


class _Region:
    """The nodes between one Gather and the layers computing its input, and the slices that remove the channels
    it does not read."""

    def __init__(self, reader: onnx.NodeProto, channels: np.ndarray | None):
        # the Gather whose channels are kept (or, to find the producers, the layer that will read them)
        self.reader, self.channels = reader, channels
        self.nodes: list[onnx.NodeProto] = []  # per-channel nodes inside the region
        self.producers: list[onnx.NodeProto] = []
        self.slices: list[tuple[onnx.NodeProto, int, int]] = []  # (node, input index, axis of that input)
        self.values: dict[tuple[int, int], np.ndarray] = {}  # (node id, input index) -> constant value

    @classmethod
    def find(cls, graph: onnx.GraphProto, gather: onnx.NodeProto, ranks: dict[str, int], constants: Constants):
        indices = constants.value(gather.input[1])
        source = gather.input[0]
        if indices is None or np.ndim(indices) != 1 or source not in ranks:
            return None
        axis = _attribute(gather, "axis", 0) % ranks[source]
        return cls.search(graph, gather, source, axis, ranks, constants, np.asarray(indices, np.int64))

    @classmethod
    def search(cls, graph, reader, source, axis, ranks, constants, channels=None) -> _Region | None:
        """The region computing the channels (`axis`) of `source`, whose only reader is the node `reader`."""
        region = cls(reader, channels)
        producers = {output: node for node in graph.node for output in node.output}
        outputs = {value.name for value in graph.output} | {value.name for value in graph.input}
        pending, seen = [(source, axis, None)], {}  # (tensor, its channel axis, its rank where it must have one)
        while pending:
            tensor, axis, expected = pending.pop()
            if tensor in seen:
                if seen[tensor] != axis:
                    return None
                continue
            seen[tensor] = axis
            node, rank = producers.get(tensor), ranks.get(tensor)
            if node is None or tensor in outputs or rank is None or expected not in (None, rank):
                return None  # a tensor of another rank broadcast into the region: its channel axis is elsewhere
            if not region._take(node, axis, rank, constants, pending, producers):
                return None
        inside = {id(node) for node in region.nodes + region.producers} | {id(reader)}
        for node in graph.node:
            if id(node) not in inside and seen.keys() & set(node.input):
                return None  # a tensor of the region read elsewhere: it needs all its channels
        return region if region.producers else None

    def _take(self, node, axis, rank, constants, pending, producers) -> bool:
        """Adds `node` (which computes a tensor of the region) and queues the region tensors it reads."""
        op = node.op_type
        if op in UNARY:
            if any(name and not _scalar(constants.value(name)) for name in node.input[1:]):
                return False
            pending.append((node.input[0], axis, rank))
            self.nodes.append(node)
            return True
        if op in BINARY:
            for index, name in enumerate(node.input):
                value = constants.value(name)
                if value is None:
                    pending.append((name, axis, rank))
                    continue
                if _scalar(value):
                    continue
                position = axis - (rank - np.ndim(value))  # numpy broadcasting aligns the trailing axes
                if position < 0 or any(size != 1 for i, size in enumerate(np.shape(value)) if i != position):
                    return False
                self.values[id(node), index] = value
                self.slices.append((node, index, position))
            self.nodes.append(node)
            return True
        if op == "Conv" and axis == 1:
            weight = constants.value(node.input[1])
            if weight is None or len(node.input) > 2 and node.input[2] and constants.value(node.input[2]) is None:
                return False
            group = _attribute(node, "group", 1)
            for index in range(1, len(node.input)):
                if node.input[index]:
                    self.values[id(node), index] = constants.value(node.input[index])
                    self.slices.append((node, index, 0))
            if group == 1:
                self.producers.append(node)
                return True
            if group == len(weight) and weight.shape[1] == 1:  # depthwise: each channel from its own
                pending.append((node.input[0], axis, rank))
                self.nodes.append(node)
                return True
            return False
        if op in POOLS and axis == 1:  # per channel, the channel axis kept
            pending.append((node.input[0], 1, rank))
            self.nodes.append(node)
            return True
        source = producers.get(node.input[0])
        if (
            op == "Flatten"
            and axis == 1
            and _attribute(node, "axis", 1) == 1
            and source
            and source.op_type in POOLS[:2]
        ):
            pending.append((node.input[0], 1, None))  # -> (N, C): the channels stay on axis 1
            self.nodes.append(node)
            return True
        if op == "BatchNormalization" and axis == 1 and len(node.output) == 1:
            for index in range(1, 5):
                value = constants.value(node.input[index])
                if value is None:
                    return False
                self.values[id(node), index] = value
                self.slices.append((node, index, 0))
            pending.append((node.input[0], axis, rank))
            self.nodes.append(node)
            return True
        if op == "MatMul" and axis == rank - 1:
            weight = constants.value(node.input[1])
            if weight is None or np.ndim(weight) != 2:
                return False
            self.values[id(node), 1] = weight
            self.slices.append((node, 1, 1))
            self.producers.append(node)
            return True
        return False

    def apply(self, graph: onnx.GraphProto, taken: set[str]) -> list[str]:
        """Slices the region's constants (into new initializers), sets the depthwise convs' groups, and removes
        the Gather; returns the names no longer read by the region."""
        replaced = []
        for node, index, axis in self.slices:
            value = np.take(self.values[id(node), index], self.channels, axis=axis)
            name = unique_name(f"{node.input[index]}_pruned", taken)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            replaced.append(node.input[index])
            node.input[index] = name
        for node in self.nodes:
            if node.op_type == "Conv":
                kept = [attr for attr in node.attribute if attr.name != "group"]
                del node.attribute[:]
                node.attribute.extend([*kept, helper.make_attribute("group", len(self.channels))])
        gather = self.reader
        source, output = gather.input[0], gather.output[0]
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name == output:
                    node.input[index] = source
        graph.node.remove(gather)
        region = {out for node in self.nodes + self.producers for out in node.output}
        for value in [value for value in graph.value_info if value.name in region]:
            graph.value_info.remove(value)  # their channel counts changed
        return [*replaced, *gather.input[1:]]


def _scalar(value) -> bool:
    return value is not None and np.size(value) == 1


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default
