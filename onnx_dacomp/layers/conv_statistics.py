"""The statistics-graph nodes of a Conv layer: its per-batch patch sums, computed inside onnxruntime, so
activations never leave the runtime: only small matrices come back. The patch Gram uses the shift structure
of convolution patches instead of a full im2col:

- `H` holds the input cut along every spatial axis but the first (one strided Slice per tap of the other
  axes, concatenated), so a row of `H` is a full padded input row of those taps: `(C * kw, N, Hp, out_x)`.
- `P_i` is `H` restricted to the input rows that kernel row `i` reads, and the Gram block of kernel rows
  `(i, j)` is `P_i P_j^T`. Only the blocks `(0, j)` are full products: for stride 1 along the first axis,
  block `(i, j)` is block `(i - 1, j - 1)` shifted by `d` input rows, i.e. minus the `d` rows it no longer
  reads and plus the `d` rows it newly reads (thin products, skipped where they are all padding). A 3x3
  layer thus costs 3 of the 9 row-block products of the full Gram, plus thin strips.
- The first moment comes from the batch sum of the layer input (one image), cut per tap in numpy.

The outputs are sums over the batch, so they are accumulated as they are over all batches; only then are
blocks combined and reordered to the `(channel, kernel taps)` patch order, in float64, in numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..moments import Moments
from .conv_patches import explicit_pads, output_spatial


@dataclass(frozen=True)
class LayerOutputs:
    """The augmented outputs of one layer and how they combine into its patch sums.

    `blocks[g][(i, j)]` (i <= j, kernel rows) is a list of `(sign, output name)` terms, where a term may
    also name an earlier block as `(sign, (i', j'))`; `input_sum` is the batch sum of the layer input.
    """

    layer: object  # the ConvLayer
    blocks: tuple[dict, ...]
    input_sum: str
    pads: tuple[int, ...]  # explicit (begins..., ends...)
    output_spatial: tuple[int, ...]
    group_rows: int  # rows of H per group: (channels per group) * (taps of the other axes)

    @property
    def names(self) -> list[str]:
        terms = (name for blocks in self.blocks for block in blocks.values() for _, name in block)
        return list(dict.fromkeys(name for name in terms if isinstance(name, str))) + [self.input_sum]

    def moments(self, sums: Mapping[str, np.ndarray], images: int) -> Moments:
        """The layer's patch sums from the outputs `sums`, summed over batches of `images` in all."""
        kh, n = self.layer.kernel_shape[0], self.group_rows
        kw = math.prod(self.layer.kernel_shape[1:])
        channels = n // kw
        # written straight into the (channel, kernel row, tap) patch order: no full-size temporaries
        second = np.empty((len(self.blocks), channels, kh, kw, channels, kh, kw))
        for group, blocks in enumerate(self.blocks):
            combined = {}
            for key, terms in blocks.items():  # insertion order: every referenced block comes first
                combined[key] = sum(
                    sign * (combined[name] if isinstance(name, tuple) else np.asarray(sums[name], np.float64))
                    for sign, name in terms
                )
            for (i, j), block in combined.items():
                second[group, :, i, :, :, j, :] = block.reshape(channels, kw, channels, kw)
                second[group, :, j, :, :, i, :] = block.T.reshape(channels, kw, channels, kw)
        first = self._first(np.asarray(sums[self.input_sum], np.float64))
        count = images * math.prod(self.output_spatial)
        size = channels * kh * kw
        return Moments(second.reshape(len(self.blocks), size, size), first.reshape(self.layer.group, -1), count)

    def _first(self, input_sum: np.ndarray) -> np.ndarray:
        """Sum of the patches from the input summed over images: one window of it per kernel tap."""
        layer, spatial = self.layer, input_sum.ndim - 1
        padded = np.pad(input_sum, [(0, 0)] + [(self.pads[a], self.pads[a + spatial]) for a in range(spatial)])
        taps = []
        for offsets in np.ndindex(*layer.kernel_shape):
            window = tuple(
                slice(o * d, o * d + (m - 1) * s + 1, s)
                for o, d, m, s in zip(offsets, layer.dilations, self.output_spatial, layer.strides)
            )
            taps.append(padded[(slice(None), *window)].reshape(len(padded), -1).sum(axis=1))
        return np.stack(taps, axis=1)  # (channels, taps): the (channel, tap) patch order


def patch_sum_nodes(layer, spatial_in: tuple[int, ...], opset: int):
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

    def slice_(tensor: str, starts, ends, axes, steps, suffix: str) -> str:
        args = [constant(f"{suffix}_{part}", values) for part, values in zip("seat", (starts, ends, axes, steps))]
        return node("Slice", [tensor, *args], suffix)

    current = layer.input
    if layer.dtype != "float32":
        current = node("Cast", [current], "cast", to=TensorProto.FLOAT)
    unpadded = current
    pads = explicit_pads(layer, spatial_in)
    if any(pads):
        full = [0, 0, *pads[:spatial], 0, 0, *pads[spatial:]]
        current = node("Pad", [current, constant("pads", full)], "pad", mode="constant")
    # channels first, so that concatenating tap slices on axis 1 yields rows ordered (channel, tap)
    current = node("Transpose", [current], "channels_first", perm=[1, 0, *range(2, 2 + spatial)])
    out = output_spatial(layer, spatial_in)
    padded = [size + pads[axis] + pads[axis + spatial] for axis, size in enumerate(spatial_in)]

    # H: every tap of the axes after the first, full padded extent along the first axis
    other_axes = list(range(3, 2 + spatial))
    taps = []
    for index, offsets in enumerate(np.ndindex(*layer.kernel_shape[1:])):
        starts = [o * d for o, d in zip(offsets, layer.dilations[1:])]
        ends = [s + (n - 1) * st + 1 for s, n, st in zip(starts, out[1:], layer.strides[1:])]
        taps.append(
            slice_(current, starts, ends, other_axes, layer.strides[1:], f"tap_{index}") if other_axes else current
        )
    rows_tensor = node("Concat", taps, "rows", axis=1) if len(taps) > 1 else taps[0]
    kw = len(taps)
    channels = layer.in_channels // layer.group
    group_rows = channels * kw
    # (C * kw, N, Hp, *out_x)
    shape = constant("rows_shape", [layer.in_channels * kw, -1, *padded[:1], *out[1:]])
    rows_tensor = node("Reshape", [rows_tensor, shape], "h")
    if opset >= 13:
        input_sum = node("ReduceSum", [unpadded, constant("batch_axis", [0])], "input_sum", keepdims=0)
    else:
        input_sum = node("ReduceSum", [unpadded], "input_sum", axes=[0], keepdims=0)

    kh, dilation, stride = layer.kernel_shape[0], layer.dilations[0], layer.strides[0]
    begin, end = pads[0], pads[0] + spatial_in[0]  # padded rows that hold data

    def matrix(first_row: int, count: int, step: int, suffix: str, group: int) -> str:
        """Rows [first_row, first_row + (count-1)*step] of H for one group, as a (group_rows, -1) matrix."""
        part = slice_(
            rows_tensor,
            [group * group_rows, first_row],
            [(group + 1) * group_rows, first_row + (count - 1) * step + 1],
            [0, 2],
            [1, step],
            suffix,
        )
        return node("Reshape", [part, constant("matrix_shape", [group_rows, -1])], f"{suffix}_matrix")

    def holds_data(first_row: int, count: int) -> bool:
        return first_row < end and first_row + count > begin

    blocks_per_group = []
    for group in range(layer.group):
        tap_rows = [matrix(i * dilation, out[0], stride, f"g{group}_row_{i}", group) for i in range(kh)]
        blocks: dict = {}
        for i in range(kh):
            for j in range(i, kh):
                if i == 0 or stride != 1:
                    blocks[(i, j)] = [
                        (1, node("Gemm", [tap_rows[i], tap_rows[j]], f"g{group}_block_{i}_{j}", transB=1))
                    ]
                    continue
                # block (i, j) = block (i-1, j-1) - rows it no longer reads + rows it newly reads
                terms = [(1, (i - 1, j - 1))]
                shift = (j - i) * dilation
                for sign, first in ((-1, (i - 1) * dilation), (1, out[0] + (i - 1) * dilation)):
                    if holds_data(first, dilation) and holds_data(first + shift, dilation):
                        suffix = f"g{group}_strip_{i}_{j}_{'minus' if sign < 0 else 'plus'}"
                        left = matrix(first, dilation, 1, f"{suffix}_a", group)
                        right = matrix(first + shift, dilation, 1, f"{suffix}_b", group)
                        terms.append((sign, node("Gemm", [left, right], suffix, transB=1)))
                blocks[(i, j)] = terms
        blocks_per_group.append(blocks)
    outputs = LayerOutputs(layer, tuple(blocks_per_group), input_sum, pads, out, group_rows)
    return nodes, inits, outputs
