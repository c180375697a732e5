"""Stage 7: replace decomposed layers by their chains (docs/MATH.md), and record provenance.

The input model is never modified: a copy is edited in place of each node (the layer kind writes the chain,
`Layer.chain_nodes`), so the rest of the graph (node order, names, inputs/outputs, value_info, opset,
metadata, functions) stays exactly as it was. onnx-graphsurgeon's import/export would rebuild the graph
instead and lose that fidelity, so it is not used. The result passes the ONNX checker, or `InternalError`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import onnx

from . import __version__
from .decompose.factors import Factors, weight_shape
from .errors import InternalError
from .layers import Layer
from .methods import Stage, method_of

CHECKER_LIMIT = 2**31 - 1  # the in-memory checker refuses protobufs over 2 GB (save_model checks the file)


def replace_layers(model: onnx.ModelProto, replacements: Mapping[str, tuple]) -> onnx.ModelProto:
    """A new model in which each layer (keyed by its output name) is replaced by the chain of its factors.

    `replacements[output] = (layer, factors)` or `(layer, factors, bias)`, with one factors object per group
    of the layer, all of the same method and ranks; `bias` (T,) replaces the layer's bias (a refitted bias,
    also for a layer that had none). Weights and biases left without a consumer are removed. Each new node's
    doc_string names the layer it replaces.
    """
    chains = {}
    for output, (layer, factors, *bias) in replacements.items():
        factors = _check_factors(layer, factors)
        method = method_of(factors[0])
        chains[output] = (layer, method.stages(factors), method.name, bias[0] if bias else None)
    return _rewritten(model, chains)


def refit_layers(model: onnx.ModelProto, refits: Mapping[str, tuple]) -> onnx.ModelProto:
    """A new model in which each layer (keyed by its output name) keeps its node but gets a new weight and bias:
    `refits[output] = (layer, weight, bias)`, the weight in the layer's `(T, S / G, *kernel)` layout."""
    chains = {}
    for output, (layer, weight, bias) in refits.items():
        geometry = layer.geometry
        expected = (geometry.out_channels, geometry.group_in, *geometry.kernel)
        if weight.shape != expected:
            raise ValueError(f"layer {layer.name}: a weight of shape {weight.shape}, expected {expected}")
        stage = Stage(weight, geometry.group, tuple(range(weight.ndim - 2)))
        chains[output] = (layer, [stage], "refit", bias)
    return _rewritten(model, chains)


def _rewritten(model: onnx.ModelProto, chains: Mapping[str, tuple]) -> onnx.ModelProto:
    """`model` with each layer's node replaced by its chain: `chains[output] = (layer, stages, name, bias)`."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    taken = _all_names(graph)
    nodes = list(graph.node)
    absorbed = {name for layer, *_ in chains.values() for name in layer.absorbed}
    del graph.node[:]
    for node in nodes:
        if node.output and node.output[0] in absorbed:
            continue  # part of a layer whose chain replaces it (a MatMul before its bias Add)
        if node.output and node.output[0] in chains:
            layer, stages, name, bias = chains[node.output[0]]
            chain, initializers = layer.chain_nodes(node, stages, name, bias, taken)
            for chain_node in chain:
                chain_node.doc_string = f"onnx-dacomp: {name} chain replacing {node.op_type} {layer.name}"
            graph.node.extend(chain)
            graph.initializer.extend(initializers)
        else:
            graph.node.append(node)
    # the replaced weights and biases, with the Constant, Identity and Cast nodes that produced them
    replaced = [name for layer, *_ in chains.values() for name in (layer.weight, layer.bias)]
    drop_unread(graph, replaced, lambda node: node.op_type in ("Constant", "Identity", "Cast") and len(node.output) < 2)
    check_postcondition(model, new)
    return new


def with_provenance(model: onnx.ModelProto, entries: Mapping[str, object]) -> onnx.ModelProto:
    """A copy of `model` whose `metadata_props` also say what made it: the tool version and `entries`
    (method, ratio, ...), as `onnx_dacomp.*` keys (earlier ones of the same key are replaced)."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    values = {"onnx_dacomp.version": __version__, **{f"onnx_dacomp.{key}": str(v) for key, v in entries.items()}}
    kept = [prop for prop in new.metadata_props if prop.key not in values]
    del new.metadata_props[:]
    new.metadata_props.extend(kept)
    for key, value in values.items():
        new.metadata_props.add(key=key, value=value)
    return new


def check_postcondition(model: onnx.ModelProto, new: onnx.ModelProto) -> None:
    """The rewrite must not break a model that passes the ONNX checker (a model that already fails it, for
    reasons of its own, keeps them)."""
    if new.ByteSize() >= CHECKER_LIMIT:
        return
    try:
        onnx.checker.check_model(new)
    except onnx.checker.ValidationError as exc:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError:
            return
        raise InternalError(f"the rewritten model fails the ONNX checker: {exc}") from exc


def _check_factors(layer: Layer, factors) -> Sequence[Factors]:
    if not isinstance(factors, (list, tuple)):
        factors = (factors,)
    if not layer.decomposable:
        raise ValueError(f"layer {layer.name} is not decomposable: {layer.skip_reason}")
    geometry = layer.geometry
    if len(factors) != geometry.group:
        raise ValueError(f"layer {layer.name} has {geometry.group} groups but {len(factors)} factor sets were given")
    if len({type(f) for f in factors}) != 1:
        raise ValueError(f"layer {layer.name}: all groups must use the same method")
    method = method_of(factors[0])
    ranks = set()
    for f in factors:
        shape = weight_shape(f)
        if shape != geometry.weight_shape:
            raise ValueError(
                f"layer {layer.name}: factors give a weight of shape {shape}, expected {geometry.weight_shape}"
            )
        ranks.add(method.ranks_of(f))
    if len(ranks) != 1:
        raise ValueError(f"layer {layer.name}: all groups must have the same ranks, got {sorted(ranks)}")
    return factors


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def drop_unread(graph: onnx.GraphProto, names: Sequence[str | None], removable=lambda node: True) -> None:
    """Remove the initializers and producers behind `names` that nothing reads any more, and so on back through
    the inputs of the nodes removed; `removable(node)` says which producers may go."""
    nodes = list(graph.node)
    reads = [_read_by(node) for node in nodes]
    readers = Counter(name for names_read in reads for name in names_read)
    readers.update(value.name for value in graph.output)
    producers = {output: index for index, node in enumerate(nodes) for output in node.output}
    initializers = {init.name for init in graph.initializer}
    dropped_nodes, dropped_initializers = set(), set()
    pending = [name for name in names if name]
    while pending:
        name = pending.pop()
        if readers[name]:
            continue
        if name in initializers:
            dropped_initializers.add(name)
        index = producers.get(name)
        node = None if index is None or index in dropped_nodes else nodes[index]
        if node is not None and removable(node) and not any(readers[output] for output in node.output):
            dropped_nodes.add(index)
            readers.subtract(reads[index])
            pending.extend(node.input)
    # deleted in place, last first: a rebuilt list would copy every kept weight
    unread = [index for index, init in enumerate(graph.initializer) if init.name in dropped_initializers]
    for index in reversed(unread):
        del graph.initializer[index]
    for index in sorted(dropped_nodes, reverse=True):
        del graph.node[index]


def _read_by(node: onnx.NodeProto) -> set[str]:
    """The tensor names `node` reads, including those its subgraphs take from the outer scope."""
    names = set(node.input)
    for attr in node.attribute:
        for subgraph in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            names |= consumed_names(subgraph)
    return names


def consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node, including names that subgraphs take from the outer scope."""
    return set().union(*(_read_by(node) for node in graph.node))
