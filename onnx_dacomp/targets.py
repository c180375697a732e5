"""Stage 2: find the decomposable layers of a model (the kinds in `layers/`), with the reason for every
other candidate node; read their constant weights and biases."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import UserError
from .layers import KINDS, NON_FINITE_WEIGHT, ConstantResolver, Layer
from .shapes import Shape, infer_shapes

# a layer whose input covariance would not fit comfortably in memory (n^2 float64 per group)
MAX_VECTOR_LENGTH = 20_000


@dataclass(frozen=True)
class TargetScan:
    """All layers of the kinds onnx-dacomp knows, in graph order."""

    layers: tuple[Layer, ...]

    @property
    def targets(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if layer.decomposable)

    @property
    def skipped(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if not layer.decomposable)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def find_targets(model: onnx.ModelProto, input_shapes: Mapping[str, Shape] | None = None) -> TargetScan:
    """Scan the graph for nodes of the known kinds (those inside If/Loop/Scan bodies are listed, with the
    reason they are not compressed); raise `UserError` if there is none."""
    graph = model.graph
    nodes = [node for node in graph.node if node.op_type in KINDS]
    nested = list(_nested(graph))
    if not nodes and not nested:
        raise UserError("the model has no Conv layer: nothing to compress")
    names = [name for node in nodes for name in KINDS[node.op_type].shape_names(node)]
    shapes = infer_shapes(model, names, input_shapes) if names else {}
    resolver = ConstantResolver(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = (KINDS[node.op_type].discover(node, resolver, shapes, consumers) for node in nodes)
    layers = [layer for layer in found if layer is not None]
    layers += [
        KINDS[node.op_type].skipped(node, f"inside {where}: subgraphs are not compressed") for node, where in nested
    ]
    return TargetScan(tuple(_unique_names(layers)))


def _nested(graph: onnx.GraphProto, where: str = ""):
    """(node, where) for every node of a known kind inside the subgraphs (If branches, Loop/Scan bodies)."""
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
            for subgraph in subgraphs:
                place = f"{where}{node.op_type} {node.name or node.output[0]!r} {attribute.name}"
                for inner in subgraph.node:
                    if inner.op_type in KINDS:
                        yield inner, place
                yield from _nested(subgraph, place + " > ")


def nothing_to_compress(scan: TargetScan) -> str:
    """Why no layer can be decomposed, summed up by reason (e.g. all inside a Loop body)."""
    counts: dict[str, int] = {}
    for layer in scan.layers:
        counts[layer.skip_reason] = counts.get(layer.skip_reason, 0) + 1
    return "; ".join(f"{count} {'layer' if count == 1 else 'layers'} {reason}" for reason, count in counts.items())


def select(
    scan: TargetScan, exclude: Sequence[str] = (), *, covariance: bool = True, unknown: Sequence = ()
) -> tuple[list[Layer], dict[str, str]]:
    """The layers to fit (in graph order) and the reason each other layer is left as it is: not
    decomposable, excluded by a glob pattern, or (with `covariance`) an input vector too long for one.
    `unknown`: the model inputs with dynamic dims (`InputSpec`s), named in the error when shapes are unknown."""
    broken = [layer.name for layer in scan.layers if layer.skip_reason == NON_FINITE_WEIGHT]
    if broken:
        raise UserError(
            f"layer {broken[0]} has NaN or Inf weights: the model itself is broken (its outputs are not finite); "
            f"repair or re-export it"
        )
    reasons: dict[str, str] = {}
    for layer in scan.layers:
        if not layer.decomposable:
            reasons[layer.name] = layer.skip_reason
        elif any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in exclude):
            reasons[layer.name] = "excluded (--exclude)"
        elif layer.output_shape is None or layer.input_shape is None:
            hints = " ".join(f"--input-shape {spec.hint()}" for spec in unknown) or "--input-shape NAME:D1xD2x..."
            raise UserError(
                f"layer {layer.name} has no static shape: the model's inputs have dynamic dims; pass {hints} "
                f"(N: any batch size; --size HxW for an image input)"
            )
        elif covariance and layer.vector_length > MAX_VECTOR_LENGTH:
            reasons[layer.name] = f"patch length {layer.vector_length} too large for a covariance"
    return [layer for layer in scan.targets if layer.name not in reasons], reasons


def refittable(scan: TargetScan, exclude: Sequence[str] = ()) -> list[Layer]:
    """The layers next-layer compensation may refit (`Layer.refittable`: a constant linear map of known size,
    depthwise convs included), in graph order, but those the user excluded or too long for a covariance."""
    return [
        layer
        for layer in scan.layers
        if layer.refittable
        and layer.input_shape is not None
        and layer.vector_length <= MAX_VECTOR_LENGTH
        and not any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in exclude)
    ]


def read_weights(model: onnx.ModelProto, layers: Sequence[Layer]) -> dict[str, np.ndarray]:
    """The constant weight of each refittable layer as its kind reads it, `(T, S / G, *kernel)`."""
    resolver = ConstantResolver(model.graph)
    return {layer.name: layer.weight_matrix(resolver.value(layer.weight)) for layer in layers if layer.refittable}


def read_biases(model: onnx.ModelProto, layers: Sequence[Layer]) -> dict[str, np.ndarray | None]:
    """The constant bias of each layer as float64, or None where it has none."""
    resolver = ConstantResolver(model.graph)
    return {layer.name: layer.bias_vector(resolver.value(layer.bias)) if layer.bias else None for layer in layers}


def _unique_names(layers: list[Layer]) -> list[Layer]:
    # names must address layers uniquely (--ranks, --exclude); fall back to the unique output name
    seen: set[str] = set()
    for index, layer in enumerate(layers):
        if layer.name in seen:
            layers[index] = layer.renamed(layer.output)
        seen.add(layers[index].name)
    return layers
