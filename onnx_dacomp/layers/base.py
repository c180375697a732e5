"""What every layer kind provides to the stages (`Layer`), and what its in-graph statistics give back.

A layer kind (conv.py, ...) finds its nodes, describes their geometry and cost, says how the vectors its
statistics describe are cut from its input, and writes the chain that replaces it. The stages use nothing
else of it, so adding a kind touches its own module and the registry in `__init__.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..geometry import LayerGeometry
from ..moments import Moments

Shape = tuple[int, ...]
NON_FINITE_WEIGHT = "weight contains NaN or Inf"  # a skip reason that means the model itself is broken
# the statistics graph's input (int64 [1]) from which sampled layers draw the phase of their sample, per run
POSITION_SEED = "dacomp_position_seed"


class GraphSums(Protocol):
    """A layer's extra outputs in the statistics graph and how they become its moments."""

    @property
    def names(self) -> list[str]: ...

    def moments(self, sums: Mapping[str, np.ndarray], images: int) -> Moments:
        """The layer's moments from the accumulated outputs `sums` (summed over `images` samples)."""


class Layer(Protocol):
    """One node that may be decomposed. `skip_reason` is None exactly when it can be."""

    name: str  # node name, or its output name when the node has none (as `inspect` prints it)
    kind: str  # the layer kind (conv, dense): what --layer-kinds selects
    op_type: str
    output: str  # the node's output tensor: unique in the graph, the key used by later stages
    input: str  # the tensor whose vectors the statistics describe
    weight: str | None
    bias: str | None
    dtype: str | None
    input_shape: Shape | None  # with batch 1
    output_shape: Shape | None
    skip_reason: str | None

    @property
    def decomposable(self) -> bool: ...

    @property
    def refittable(self) -> bool:
        """A constant linear map of its input vectors whose weight and bias may be refit (next-layer
        compensation): every decomposable layer, and depthwise convs."""

    @property
    def params(self) -> int | None: ...

    @property
    def macs(self) -> int | None:
        """Multiply-accumulates per sample."""

    @property
    def geometry(self) -> LayerGeometry | None:
        """What the cost formulas need; None when the layer's size is unknown."""

    @property
    def vector_length(self) -> int:
        """Length n of one input vector (per group): the covariance is n x n."""

    @property
    def signature(self) -> tuple:
        """What the statistics depend on besides the weight values (the fingerprint hashes it)."""

    def renamed(self, name: str) -> Layer: ...

    def input_vectors(self, x: np.ndarray, dtype=np.float64) -> np.ndarray:
        """The input vectors of a batch of the layer's input: `(group, n, vectors)` in `dtype`."""

    def output_vectors(self, y: np.ndarray, dtype=np.float64) -> np.ndarray:
        """The layer's output `y` (a batch) as `(out_channels, batch * positions)`, positions ordered as the
        input vectors are."""

    def statistics_graph(self, input_shape: Shape, opset: int, sampled: bool = True) -> tuple[list, list, GraphSums]:
        """Nodes and initializers that compute the layer's per-batch moment sums inside onnxruntime for an
        input of `input_shape` (batch 1), and how their outputs combine. `sampled`: the layer may sum a random
        sample of its input vectors (phases drawn from the graph input `POSITION_SEED`) instead of all."""

    def chain_nodes(
        self, node: onnx.NodeProto, stages: Sequence, method: str, bias: np.ndarray | None, taken: set[str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """The nodes replacing `node`: one per chain stage (`methods.Stage`), the last one writing the
        node's output; `bias` replaces the layer's own bias (None keeps it). New names avoid `taken`."""

    def timing_model(self, batch: int, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """A model of this layer alone (random weights) with an input of `batch` samples, to time it."""

    def timing_baseline(self, batch: int, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """A model of the same input that does next to nothing in the layout the layer runs in: its time is what
        a one-layer model pays besides the layer (the run call, layout conversions in and out), which the
        layer does not cost inside the whole model (`speed.LatencyTable` subtracts it)."""

    @property
    def timing_key(self) -> tuple:
        """What the layer's latency depends on: layers with the same key share their timings."""

    def describe(self) -> dict:
        """The layer as `inspect --json` lists it."""


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name_1`, `name_2`, ... : the first not in `taken` (which then holds it)."""
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def channel_gather(tensor: str, channels, axis: int, base: str, nodes: list, initializers: list, taken: set) -> str:
    """Appends a Gather of `channels` of `tensor` along `axis` (a pruned layer's input) to `nodes`; its output."""
    indices = unique_name(f"{base}.channels", taken)
    initializers.append(numpy_helper.from_array(np.asarray(channels, np.int64), indices))
    output = unique_name(f"{base}_channels", taken)
    nodes.append(helper.make_node("Gather", [tensor, indices], [output], name=output, axis=axis))
    return output


TIMING_IR_VERSION = 8  # of the one-layer timing models: what every supported onnxruntime loads


def one_layer_model(
    nodes: Sequence[onnx.NodeProto], initializers: Sequence[onnx.TensorProto], shape: Sequence, dtype, opset: int
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model of `nodes` from input "x" of `shape` to output "y", and a seeded random input for it."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = onnx.helper.make_graph(
        nodes,
        "layer",
        [onnx.helper.make_tensor_value_info("x", elem, list(shape))],
        [onnx.helper.make_tensor_value_info("y", elem, [None] * len(shape))],
        initializers,
    )
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=TIMING_IR_VERSION)
    return model, {"x": np.random.default_rng(0).standard_normal(shape).astype(dtype)}
