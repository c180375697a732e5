"""The dense kind: `Gemm` with a constant weight, and `MatMul` by a constant `[K, N]` matrix on activations of
any rank `[..., K]` (with a following constant `Add` as its bias). The input vectors are the activation
rows, over every leading position (a sequence's tokens, a feature map's pixels); the chain is two matrix
products through rank R (docs/MATH.md: the matrix case, closed-form DA-SVD).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..geometry import LayerGeometry
from ..moments import Moments
from .base import NON_FINITE_WEIGHT, channel_gather, one_layer_model, unique_name
from .constants import ConstantResolver

OP_TYPES = ("Gemm", "MatMul")
SUPPORTED_DTYPES = ("float32", "float16")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class DenseLayer:
    """One Gemm or MatMul (+ Add) node. The weight is read as `(N, K)` (outputs, inputs): `transposed` says
    the stored matrix is `(K, N)`; `scale` is Gemm's alpha, `bias_scale` its beta."""

    name: str
    op_type: str
    output: str  # the layer's output: the Add's when a MatMul's bias Add is absorbed
    input: str
    weight: str | None = None
    bias: str | None = None
    dtype: str | None = None
    out_features: int | None = None
    in_features: int | None = None
    transposed: bool = False
    scale: float = 1.0
    bias_scale: float = 1.0
    absorbed: tuple[str, ...] = ()  # outputs of further nodes the chain replaces (the MatMul before its Add)
    input_shape: Shape | None = None  # with batch 1
    output_shape: Shape | None = None
    skip_reason: str | None = None

    kind = "dense"

    @property
    def decomposable(self) -> bool:
        return self.skip_reason is None

    @property
    def refittable(self) -> bool:
        return self.skip_reason is None

    @property
    def positions(self) -> int:
        """Rows per sample: the leading dims of the activations after the batch."""
        return math.prod(self.input_shape[1:-1]) if self.input_shape and len(self.input_shape) > 2 else 1

    @property
    def params(self) -> int | None:
        if self.out_features is None or self.in_features is None:
            return None
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    @property
    def macs(self) -> int | None:
        if self.params is None or self.input_shape is None:
            return None
        return self.out_features * self.in_features * self.positions

    @property
    def geometry(self) -> LayerGeometry | None:
        if self.params is None:
            return None
        positions = (self.positions,)
        return LayerGeometry(self.out_features, self.in_features, 1, (), positions, positions, bool(self.bias))

    @property
    def vector_length(self) -> int:
        return self.in_features

    @property
    def signature(self) -> tuple:
        return (self.op_type, self.out_features, self.in_features, self.transposed, self.scale)

    @property
    def timing_key(self) -> tuple:
        return (*self.signature, tuple(self.input_shape[1:]), self.dtype, self.bias is not None)

    def renamed(self, name: str) -> DenseLayer:
        return replace(self, name=name)

    def weight_matrix(self, raw: np.ndarray) -> np.ndarray:
        matrix = raw.T if self.transposed else raw
        return matrix * self.scale if self.scale != 1.0 else matrix

    def bias_vector(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw, np.float64).reshape(-1) * self.bias_scale * np.ones(self.out_features)

    def input_vectors(self, x: np.ndarray, dtype=np.float64) -> np.ndarray:
        return np.asarray(x, dtype).reshape(-1, self.in_features).T[None]

    def output_vectors(self, y: np.ndarray, dtype=np.float64) -> np.ndarray:
        return np.asarray(y, dtype).reshape(-1, self.out_features).T

    def statistics_graph(self, input_shape: Shape, opset: int, sampled: bool = True):
        prefix = f"{self.output}/dacomp_stats"
        shape, axis = f"{prefix}/rows_shape", f"{prefix}/batch_axis"
        initializers = [
            numpy_helper.from_array(np.array([-1, self.in_features], np.int64), shape),
            numpy_helper.from_array(np.array([0], np.int64), axis),
        ]
        current, nodes = self.input, []
        if self.dtype != "float32":
            nodes.append(helper.make_node("Cast", [current], [f"{prefix}/cast"], to=TensorProto.FLOAT))
            current = f"{prefix}/cast"
        rows, gram, total = f"{prefix}/rows", f"{prefix}/gram", f"{prefix}/sum"
        nodes.append(helper.make_node("Reshape", [current, shape], [rows]))
        nodes.append(helper.make_node("Gemm", [rows, rows], [gram], transA=1))
        if opset >= 13:
            nodes.append(helper.make_node("ReduceSum", [rows, axis], [total], keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceSum", [rows], [total], axes=[0], keepdims=0))
        return nodes, initializers, _RowSums(gram, total, self.positions)

    def chain_nodes(self, node, stages, method, bias, taken):
        dtype = np.dtype(self.dtype)
        base = f"{node.name or node.output[0]}/dacomp_{method}"
        with_bias = bias is not None or self.bias is not None
        nodes, initializers, current = [], [], self.input
        for index, stage in enumerate(stages):
            if stage.channels is not None:  # features lie on the last axis
                axis = len(self.input_shape) - 1
                current = channel_gather(current, stage.channels, axis, f"{base}_{index}", nodes, initializers, taken)
            matrix = stage.weight.reshape(len(stage.weight), -1).T  # (in, out): rows @ matrix
            weight_name = unique_name(f"{base}_{index}.weight", taken)
            initializers.append(numpy_helper.from_array(matrix.astype(dtype), weight_name))
            last = index == len(stages) - 1 and not with_bias
            output = self.output if last else unique_name(f"{base}_{index}_output", taken)
            nodes.append(
                helper.make_node("MatMul", [current, weight_name], [output], name=unique_name(f"{base}_{index}", taken))
            )
            current = output
        if bias is not None:  # a refitted bias
            bias_name = unique_name(f"{base}.bias", taken)
            initializers.append(numpy_helper.from_array(np.asarray(bias).astype(dtype), bias_name))
        elif self.bias is not None and self.bias_scale != 1.0:  # Gemm's beta applies to C
            scale, bias_name = unique_name(f"{base}.beta", taken), unique_name(f"{base}.bias", taken)
            initializers.append(numpy_helper.from_array(np.array(self.bias_scale, dtype), scale))
            nodes.append(
                helper.make_node("Mul", [self.bias, scale], [bias_name], name=unique_name(f"{base}_beta", taken))
            )
        else:
            bias_name = self.bias
        if with_bias:
            add = helper.make_node("Add", [current, bias_name], [self.output], name=unique_name(f"{base}_bias", taken))
            nodes.append(add)
        return nodes, initializers

    def timing_model(self, batch: int, opset: int):
        rng = np.random.default_rng(0)
        dtype = np.dtype(self.dtype)
        weight = rng.standard_normal((self.in_features, self.out_features)).astype(dtype)
        initializers = [numpy_helper.from_array(weight, "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if self.bias else "y"])]
        if self.bias:
            initializers.append(numpy_helper.from_array(rng.standard_normal(self.out_features).astype(dtype), "B"))
            nodes.append(helper.make_node("Add", ["m", "B"], ["y"]))
        return one_layer_model(nodes, initializers, [batch, *self.input_shape[1:]], dtype, opset)

    def timing_baseline(self, batch: int, opset: int):
        # one elementwise pass over the input: the run call and the copies, no layout conversion
        dtype = np.dtype(self.dtype)
        one = numpy_helper.from_array(np.ones((), dtype), "one")
        node = helper.make_node("Mul", ["x", "one"], ["y"], name="baseline")
        return one_layer_model([node], [one], [batch, *self.input_shape[1:]], dtype, opset)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type + ("+Add" if self.absorbed else ""),
            "kernel": [],
            "in_channels": self.in_features,
            "out_channels": self.out_features,
            "stride": [],
            "dilation": [],
            "group": 1,
            "dtype": self.dtype,
            "params": self.params,
            "macs": self.macs,
            "decomposable": self.decomposable,
            "reason": self.skip_reason,
        }


@dataclass(frozen=True)
class _RowSums:
    gram: str
    total: str
    positions: int

    @property
    def names(self) -> list[str]:
        return [self.gram, self.total]

    def moments(self, sums: Mapping[str, np.ndarray], images: int) -> Moments:
        second = np.asarray(sums[self.gram], np.float64)[None]
        first = np.asarray(sums[self.total], np.float64)[None]
        return Moments(second, first, images * self.positions)


def shape_names(node: onnx.NodeProto) -> list[str]:
    return [node.input[0], node.output[0]]


def skipped(node: onnx.NodeProto, reason: str) -> DenseLayer:
    return DenseLayer(node.name or node.output[0], node.op_type, node.output[0], node.input[0], skip_reason=reason)


def discover(
    node: onnx.NodeProto, resolver: ConstantResolver, shapes: Mapping[str, Shape | None], consumers: Mapping
) -> DenseLayer | None:
    """The layer of a Gemm or MatMul node, or None for a product of two activations (attention scores and
    the like are not weights: nothing to list)."""
    first, second = node.input[0], node.input[1]
    if resolver.source(second) is not None:
        if resolver.source(first) is None:
            return skipped(node, "the constant is the left operand (W @ x): not supported")
        return None
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    raw = resolver.value(second)
    name = node.name or node.output[0]
    common = dict(name=name, op_type=node.op_type, output=node.output[0], input=first, weight=second)
    common |= dict(input_shape=shapes.get(first), output_shape=shapes.get(node.output[0]))
    if raw.ndim != 2:
        return DenseLayer(**common, skip_reason=f"batched weight of rank {raw.ndim} (a [K, N] matrix is supported)")
    transposed = node.op_type == "MatMul" or not attrs.get("transB", 0)
    out_features, in_features = (raw.shape[1], raw.shape[0]) if transposed else raw.shape
    common |= dict(dtype=str(raw.dtype), out_features=int(out_features), in_features=int(in_features))
    common |= dict(transposed=transposed, scale=float(attrs.get("alpha", 1.0)))
    bias, bias_scale, absorbed, reason = None, 1.0, (), None
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            reason = "transA=1 (transposed activations) is not supported"
        elif len(node.input) > 2 and node.input[2]:
            bias, bias_scale = node.input[2], float(attrs.get("beta", 1.0))
    else:
        follower = _bias_add(node, resolver, consumers, out_features)
        if follower is not None:
            bias = follower.input[1] if follower.input[0] == node.output[0] else follower.input[0]
            absorbed = (node.output[0],)
            common |= dict(output=follower.output[0])  # same shape as the MatMul's
    if reason is None and bias is not None:
        if resolver.source(bias) is not None:
            reason = "bias is not a constant"
        elif resolver.value(bias).size not in (1, out_features):
            reason = f"bias of shape {list(resolver.value(bias).shape)} is not one value per output"
    if reason is None and str(raw.dtype) not in SUPPORTED_DTYPES:
        reason = f"weight dtype {raw.dtype} is not supported (float32 and float16 are)"
    if reason is None and not np.isfinite(raw).all():
        reason = NON_FINITE_WEIGHT
    if reason is None and common["input_shape"] is not None and len(common["input_shape"]) < 2:
        reason = "1-D activations (no batch axis)"
    return DenseLayer(**common, bias=bias, bias_scale=bias_scale, absorbed=absorbed, skip_reason=reason)


def _bias_add(node, resolver: ConstantResolver, consumers, out_features: int):
    """The Add that follows a MatMul with a constant per-output vector, when it is the MatMul's only reader."""
    readers = consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if resolver.source(other) is not None:
        return None
    shape = resolver.value(other).shape
    return add if math.prod(shape) == out_features and shape[-1:] == (out_features,) else None
