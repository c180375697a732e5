"""Stage 6: replace decomposed Conv nodes by their chains of smaller convolutions (DESIGN.md 2.1-2.3).

The input model is never modified: a copy is edited in place of the node, so the rest of the graph (node
order, names, inputs/outputs, value_info, opset, metadata, functions) stays exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .decompose.factors import CPFactors, Factors, SVDFactors, Tucker2Factors, reconstruct
from .targets import ConvLayer

METHOD_NAMES = {SVDFactors: "svd", Tucker2Factors: "tucker2", CPFactors: "cp"}


@dataclass(frozen=True)
class _ChainConv:
    """One conv of a chain: its weight (all groups stacked), group count and geometry along each axis."""

    weight: np.ndarray
    group: int
    geometry: dict


def replace_convs(model: onnx.ModelProto, replacements: Mapping[str, tuple]) -> onnx.ModelProto:
    """A new model in which each layer (keyed by its output name) is replaced by the chain of its factors.

    `replacements[output] = (layer, factors)` or `(layer, factors, bias)`, with one factors object per group
    of the layer, all of the same type and ranks; `bias` (T,) replaces the layer's bias (a refitted bias,
    also for a layer that had none). Weights and biases left without a consumer are removed.
    """
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    taken = _all_names(graph)
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        if node.op_type == "Conv" and node.output[0] in replacements:
            layer, factors, *bias = replacements[node.output[0]]
            chain_nodes, initializers = _chain(node, layer, factors, taken, bias[0] if bias else None)
            graph.node.extend(chain_nodes)
            graph.initializer.extend(initializers)
        else:
            graph.node.append(node)
    _drop_unused_constants(graph, [name for layer, *_ in replacements.values() for name in (layer.weight, layer.bias)])
    return new


def _chain(node: onnx.NodeProto, layer: ConvLayer, factors: Sequence[Factors], taken: set[str], bias=None):
    if isinstance(factors, (SVDFactors, Tucker2Factors, CPFactors)):
        factors = (factors,)
    _check_factors(layer, factors)
    convs = _chain_convs(layer, factors)
    dtype = np.dtype(layer.dtype)
    method = METHOD_NAMES[type(factors[0])]
    base = f"{node.name or node.output[0]}/dacomp_{method}"
    nodes, initializers = [], []
    current = node.input[0]
    for index, conv in enumerate(convs):
        last = index == len(convs) - 1
        weight_name = _unique(f"{base}_{index}.weight", taken)
        initializers.append(numpy_helper.from_array(conv.weight.astype(dtype), weight_name))
        inputs = [current, weight_name]
        if last and bias is not None:
            bias_name = _unique(f"{base}_{index}.bias", taken)
            initializers.append(numpy_helper.from_array(np.asarray(bias).astype(dtype), bias_name))
            inputs.append(bias_name)
        elif last and layer.bias:
            inputs.append(node.input[2])
        output = node.output[0] if last else _unique(f"{base}_{index}_output", taken)
        nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [output],
                name=_unique(f"{base}_{index}", taken),
                kernel_shape=list(conv.weight.shape[2:]),
                group=conv.group,
                **conv.geometry,
            )
        )
        current = output
    return nodes, initializers


def _chain_convs(layer: ConvLayer, factors: Sequence[Factors]) -> list[_ChainConv]:
    spatial = len(layer.kernel_shape)
    ones = (1,) * spatial
    group = layer.group
    full = _geometry(layer, range(spatial))
    pointwise = dict(strides=list(ones), dilations=list(ones), pads=[0] * 2 * spatial)
    first = factors[0]
    if isinstance(first, SVDFactors):
        return [
            _ChainConv(np.concatenate([f.first for f in factors]), group, full),
            _ChainConv(_pointwise(np.concatenate([f.last for f in factors]), spatial), group, pointwise),
        ]
    if isinstance(first, Tucker2Factors):
        # a square (full-rank) factor is folded into the core: one 1x1 conv less, same function
        fold_in = first.input_factor.shape[0] == first.input_factor.shape[1]
        fold_out = first.output_factor.shape[0] == first.output_factor.shape[1]
        cores = []
        for f in factors:
            core = np.einsum("oi...,si->os...", f.core, f.input_factor) if fold_in else f.core
            cores.append(np.einsum("tr,r...->t...", f.output_factor, core) if fold_out else core)
        convs = [_ChainConv(np.concatenate(cores), group, full)]
        if not fold_in:
            inputs = np.concatenate([f.input_factor.T for f in factors])
            convs.insert(0, _ChainConv(_pointwise(inputs, spatial), group, pointwise))
        if not fold_out:
            outputs = np.concatenate([f.output_factor for f in factors])
            convs.append(_ChainConv(_pointwise(outputs, spatial), group, pointwise))
        return convs
    rank = first.rank
    convs = [_ChainConv(_pointwise(np.concatenate([f.input_factor.T for f in factors]), spatial), group, pointwise)]
    for axis in range(spatial):
        # depthwise conv along one axis: kernel k_i on that axis, 1 elsewhere; weight (R, 1, ..., k_i, ...)
        taps = np.concatenate([f.spatial_factors[axis].T for f in factors])  # (group*R, k_i)
        shape = [group * rank, 1] + [layer.kernel_shape[axis] if a == axis else 1 for a in range(spatial)]
        convs.append(_ChainConv(taps.reshape(shape), group * rank, _geometry(layer, [axis])))
    convs.append(_ChainConv(_pointwise(np.concatenate([f.output_factor for f in factors]), spatial), group, pointwise))
    return convs


def _geometry(layer: ConvLayer, axes) -> dict:
    """Conv attributes that apply the layer's stride, padding and dilation along `axes` only."""
    spatial = len(layer.kernel_shape)
    axes = set(axes)
    strides = [layer.strides[a] if a in axes else 1 for a in range(spatial)]
    dilations = [layer.dilations[a] if a in axes else 1 for a in range(spatial)]
    if layer.auto_pad != "NOTSET":
        # SAME_*/VALID padding is computed per axis from that axis' kernel/stride/dilation only, and an axis
        # with kernel 1 and stride 1 gets no padding, so the attribute carries over unchanged.
        return dict(strides=strides, dilations=dilations, auto_pad=layer.auto_pad)
    pads = [layer.pads[a] if a in axes else 0 for a in range(spatial)]
    pads += [layer.pads[spatial + a] if a in axes else 0 for a in range(spatial)]
    return dict(strides=strides, dilations=dilations, pads=pads)


def _pointwise(matrix: np.ndarray, spatial: int) -> np.ndarray:
    """A (out, in) matrix as a 1x1 conv weight (out, in, 1, ..., 1)."""
    return matrix.reshape(*matrix.shape, *([1] * spatial))


def _check_factors(layer: ConvLayer, factors: Sequence[Factors]) -> None:
    if not layer.decomposable:
        raise ValueError(f"layer {layer.name} is not decomposable: {layer.skip_reason}")
    if len(factors) != layer.group:
        raise ValueError(f"layer {layer.name} has {layer.group} groups but {len(factors)} factor sets were given")
    if len({type(f) for f in factors}) != 1:
        raise ValueError(f"layer {layer.name}: all groups must use the same method")
    expected = (layer.out_channels // layer.group, layer.in_channels // layer.group, *layer.kernel_shape)
    ranks = set()
    for f in factors:
        shape = reconstruct(f).shape
        if shape != expected:
            raise ValueError(f"layer {layer.name}: factors give a weight of shape {shape}, expected {expected}")
        ranks.add(f.ranks if isinstance(f, Tucker2Factors) else f.rank)
    if len(ranks) != 1:
        raise ValueError(f"layer {layer.name}: all groups must have the same ranks, got {sorted(ranks)}")


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def _drop_unused_constants(graph: onnx.GraphProto, names: Sequence[str | None]) -> None:
    """Remove the replaced weights/biases (initializers, Constant, Identity and Cast producers) no one reads."""
    pending = [name for name in names if name]
    while pending:
        name = pending.pop()
        if name in _consumed_names(graph) or name in {value.name for value in graph.output}:
            continue
        for index, init in enumerate(graph.initializer):
            if init.name == name:
                del graph.initializer[index]
                break
        for index, node in enumerate(graph.node):
            if name in node.output and node.op_type in ("Constant", "Identity", "Cast") and len(node.output) == 1:
                pending.extend(node.input)
                del graph.node[index]
                break


def _consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node, including names that subgraphs take from the outer scope."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for subgraph in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                names |= _consumed_names(subgraph)
    return names
