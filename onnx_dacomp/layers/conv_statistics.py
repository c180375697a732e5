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
- A 1x1 conv without padding has no taps: its (strided) positions are cut before the transpose, which then
  copies only them.

Large feature maps are sampled (`position_steps`): a 2-D layer sums the output positions of a regular grid
of step `g_y x g_x` (powers of two, keeping at least MIN_SAMPLED_ROWS rows of each axis), at a random phase
per run (from the graph input POSITION_SEED). Every position is in the sample with probability
1/(g_y g_x), so the sums are unbiased estimates of the all-position moments, at a fraction of the Gram's
cost: its products scale with the positions summed, the model's own convolutions do not. A sampled layer's
slices start at the phase, all its row blocks are full products, and its first moment and patch count are
graph outputs too (they depend on the phase).

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
from .base import POSITION_SEED
from .conv_patches import explicit_pads, output_spatial

# A 2-D layer sums a grid of output positions of step g per axis: the largest power of two up to
# MAX_POSITION_STEP that keeps MIN_SAMPLED_ROWS rows of the axis (ResNet-50 at 224x224: 56 -> 7 rows of step
# 8, 14 -> step 2, 7 -> all). Measured: its statistics graph cost 2.8 inference passes per image with 7 rows,
# 3.7 with 14 and 5.3 with every position, and 48 of the benchmark's 52 distribution-aware rows kept their
# top-1 within 0.1 points of the all-position statistics' (README, Results).
MIN_SAMPLED_ROWS = 7
MAX_POSITION_STEP = 8
# Row-block products per group above which a layer's Gram is one product of its stacked kernel rows instead:
# a kernel of kh rows has kh (kh + 1) / 2 blocks (stride > 1) or kh full blocks plus up to kh (kh - 1) thin
# strips (stride 1), each a node: an STFT front end (a 1-D kernel of 256 taps) had 33,000 Gemms, and
# onnxruntime spent minutes creating the session. The stacked Gram costs up to twice the arithmetic of the
# blocks, in one large Gemm. Up to 7x7 stride 2 (a ResNet stem: 28 blocks) keeps the blocks.
MAX_BLOCK_PRODUCTS = 32


def position_steps(output_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The step of the sampled grid of output positions along each spatial axis (1: every position)."""
    if len(output_shape) != 2:
        return (1,) * len(output_shape)
    steps = []
    for size in output_shape:
        step = 1
        while step < MAX_POSITION_STEP and -(-size // (2 * step)) >= MIN_SAMPLED_ROWS:
            step *= 2
        steps.append(step)
    return tuple(steps)


STACKED = "stacked"  # the key of a Gram computed in one product (see MAX_BLOCK_PRODUCTS)


def block_products(kernel_rows: int, stride: int) -> int:
    """Row-block products (Gemm nodes) per group of the shift-structured Gram, at most."""
    if stride != 1:
        return kernel_rows * (kernel_rows + 1) // 2
    return kernel_rows + kernel_rows * (kernel_rows - 1)


@dataclass(frozen=True)
class LayerOutputs:
    """The augmented outputs of one layer and how they combine into its patch sums.

    `blocks[g][(i, j)]` (i <= j, kernel rows) is a list of `(sign, output name)` terms, where a term may
    also name an earlier block as `(sign, (i', j'))`; a stacked layer has one entry `blocks[g][STACKED]`, the
    Gram of all kernel rows at once (rows ordered kernel row, channel, tap); `input_sum` is the batch sum of
    the layer input. A
    sampled layer has instead `row_sums[g][i]`, the sums of the sampled patches' kernel row `i`, and `count`,
    the number of patches summed.
    """

    layer: object  # the ConvLayer
    blocks: tuple[dict, ...]
    input_sum: str | None
    pads: tuple[int, ...]  # explicit (begins..., ends...)
    output_spatial: tuple[int, ...]
    group_rows: int  # rows of H per group: (channels per group) * (taps of the other axes)
    row_sums: tuple[tuple[str, ...], ...] = ()
    count: str | None = None

    @property
    def names(self) -> list[str]:
        terms = (name for blocks in self.blocks for block in blocks.values() for _, name in block)
        sampled = [name for rows in self.row_sums for name in rows] + [self.count] if self.count else []
        return list(dict.fromkeys(name for name in terms if isinstance(name, str))) + (sampled or [self.input_sum])

    def moments(self, sums: Mapping[str, np.ndarray], images: int) -> Moments:
        """The layer's patch sums from the outputs `sums`, summed over batches of `images` in all."""
        kh, n = self.layer.kernel_shape[0], self.group_rows
        kw = math.prod(self.layer.kernel_shape[1:])
        channels = n // kw
        # written straight into the (channel, kernel row, tap) patch order: no full-size temporaries
        second = np.empty((len(self.blocks), channels, kh, kw, channels, kh, kw))
        for group, blocks in enumerate(self.blocks):
            combined = {}
            if STACKED in blocks:
                full = np.asarray(sums[blocks[STACKED][0][1]], np.float64).reshape(kh, channels, kw, kh, channels, kw)
                second[group] = full.transpose(1, 0, 2, 4, 3, 5)
                continue
            for key, terms in blocks.items():  # insertion order: every referenced block comes first
                combined[key] = sum(
                    sign * (combined[name] if isinstance(name, tuple) else np.asarray(sums[name], np.float64))
                    for sign, name in terms
                )
            for (i, j), block in combined.items():
                second[group, :, i, :, :, j, :] = block.reshape(channels, kw, channels, kw)
                second[group, :, j, :, :, i, :] = block.T.reshape(channels, kw, channels, kw)
        if self.count:
            first = np.stack(
                [np.stack([sums[name] for name in rows], axis=1) for rows in self.row_sums]
            )  # (group, channels * kw, kh)
            first = first.reshape(len(self.blocks), channels, kw, kh).transpose(0, 1, 3, 2).astype(np.float64)
            count = int(round(np.asarray(sums[self.count], np.float64).reshape(-1)[0]))
        else:
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


def patch_sum_nodes(layer, spatial_in: tuple[int, ...], opset: int, sampled: bool = True):
    """The statistics nodes of `layer` for an input of spatial size `spatial_in`; `sampled`: sum the grid of
    `position_steps` (else every output position)."""
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

    def slice_(tensor: str, starts, ends, axes, steps, suffix: str, shift: str | None = None) -> str:
        """`tensor[starts:ends:steps]` along `axes`; `shift`: a tensor added to `starts` (the phase)."""
        args = [constant(f"{suffix}_{part}", values) for part, values in zip("seat", (starts, ends, axes, steps))]
        if shift is not None:
            args[0] = node("Add", [args[0], shift], f"{suffix}_start")
        return node("Slice", [tensor, *args], suffix)

    def reduce_sum(tensor: str, axis: int, suffix: str) -> str:
        if opset >= 13:
            return node("ReduceSum", [tensor, constant(f"axis_{axis}", [axis])], suffix, keepdims=0)
        return node("ReduceSum", [tensor], suffix, axes=[axis], keepdims=0)

    current = layer.input
    if layer.dtype != "float32":
        current = node("Cast", [current], "cast", to=TensorProto.FLOAT)
    pads = explicit_pads(layer, spatial_in)
    out = output_spatial(layer, spatial_in)
    padded = [size + pads[axis] + pads[axis + spatial] for axis, size in enumerate(spatial_in)]
    steps = position_steps(out) if sampled and opset >= 10 else (1,) * spatial  # Mod: opset 10
    sampling = any(step > 1 for step in steps)
    # slices step over sampled output positions; a sampled layer's slices start at its phase along each axis:
    # the seed's digits in base `step` (one axis after the other), times the layer's stride
    strides = [stride * step for stride, step in zip(layer.strides, steps)]
    shifts = [None] * spatial
    if sampling:
        seed = POSITION_SEED
        for axis, step in enumerate(steps):
            phase = node("Mod", [seed, constant(f"step_{axis}", [step])], f"phase_{axis}")
            seed = node("Div", [seed, constant(f"step_{axis}", [step])], f"seed_{axis}")
            shifts[axis] = node("Mul", [phase, constant(f"stride_{axis}", [layer.strides[axis]])], f"shift_{axis}")
    channels = layer.in_channels // layer.group
    input_sum = None if sampling else reduce_sum(current, 0, "input_sum")
    pointwise = all(size == 1 for size in layer.kernel_shape) and not any(pads)
    if pointwise:
        pointwise_rows = _pointwise_rows(layer, current, out, strides, shifts, node, slice_, constant)
        kh, kw, stride = 1, 1, 1
    else:
        kh, kw, stride = layer.kernel_shape[0], math.prod(layer.kernel_shape[1:]), strides[0]
        rows_tensor = _tap_rows_tensor(layer, current, pads, padded, out, strides, shifts, node, slice_, constant)
        row_shift = node("Concat", [constant("zero", [0]), shifts[0]], "row_shift", axis=0) if sampling else None
    group_rows = channels * kw
    dilation = layer.dilations[0]
    begin, end = pads[0], pads[0] + spatial_in[0]  # padded rows that hold data

    def matrix(first_row: int, last_row: int, step: int, suffix: str, group: int, shift: str | None = None) -> str:
        """Rows first_row, first_row + step, ... (up to last_row; all shifted by `shift`) of H for one group, as
        a (group_rows, -1) matrix."""
        part = slice_(
            rows_tensor,
            [group * group_rows, first_row],
            [(group + 1) * group_rows, last_row + 1],
            [0, 2],
            [1, step],
            suffix,
            shift,
        )
        return node("Reshape", [part, constant("matrix_shape", [group_rows, -1])], f"{suffix}_matrix")

    def holds_data(first_row: int, count: int) -> bool:
        return first_row < end and first_row + count > begin

    last_output_row = (out[0] - 1) * layer.strides[0]
    blocks_per_group, row_sums_per_group = [], []
    for group in range(layer.group):
        if pointwise:
            tap_rows = [pointwise_rows[group]]
        else:
            tap_rows = [
                matrix(i * dilation, i * dilation + last_output_row, stride, f"g{group}_row_{i}", group, row_shift)
                for i in range(kh)
            ]
        if sampling:
            sums = (reduce_sum(rows, 1, f"g{group}_row_{i}_sum") for i, rows in enumerate(tap_rows))
            row_sums_per_group.append(tuple(sums))
        blocks: dict = {}
        if block_products(kh, stride) > MAX_BLOCK_PRODUCTS:
            stacked = node("Concat", tap_rows, f"g{group}_stacked_rows", axis=0)
            blocks[STACKED] = [(1, node("Gemm", [stacked, stacked], f"g{group}_stacked_gram", transB=1))]
            blocks_per_group.append(blocks)
            continue
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
                        left = matrix(first, first + dilation - 1, 1, f"{suffix}_a", group)
                        right = matrix(first + shift, first + shift + dilation - 1, 1, f"{suffix}_b", group)
                        terms.append((sign, node("Gemm", [left, right], suffix, transB=1)))
                blocks[(i, j)] = terms
        blocks_per_group.append(blocks)
    count = None
    if sampling:  # the patches summed: the columns of a row matrix
        columns = node("Shape", [tap_rows[0]], "row_matrix_shape")
        columns = slice_(columns, [1], [2], [0], [1], "columns")
        count = node("Cast", [columns], "count", to=TensorProto.FLOAT)
    outputs = LayerOutputs(
        layer, tuple(blocks_per_group), input_sum, pads, out, group_rows, tuple(row_sums_per_group), count
    )
    return nodes, inits, outputs


def _pointwise_rows(layer, current: str, out, strides, shifts, node, slice_, constant) -> list[str]:
    """A 1x1 conv's patch matrix `(channels, vectors)` per group. A patch is one input position: the positions
    are cut (strided, sampled) before the transpose, which then copies only them."""
    spatial = len(out)
    if any(shift is not None for shift in shifts) or any(stride > 1 for stride in strides):
        shift = node("Concat", shifts, "shift", axis=0) if shifts[0] is not None else None
        ends = [(size - 1) * stride + 1 for size, stride in zip(out, layer.strides)]
        current = slice_(current, [0] * spatial, ends, list(range(2, 2 + spatial)), strides, "positions", shift)
    current = node("Transpose", [current], "channels_first", perm=[1, 0, *range(2, 2 + spatial)])
    channels = layer.in_channels // layer.group
    shape = constant("matrix_shape", [channels, -1])
    if layer.group == 1:
        return [node("Reshape", [current, shape], "g0_row_0_matrix")]
    rows = []
    for group in range(layer.group):
        part = slice_(current, [group * channels], [(group + 1) * channels], [0], [1], f"g{group}_channels")
        rows.append(node("Reshape", [part, shape], f"g{group}_row_0_matrix"))
    return rows


def _tap_rows_tensor(layer, current: str, pads, padded, out, strides, shifts, node, slice_, constant) -> str:
    """H: the padded input, channels first, cut at every tap of the axes after the first (sampled and strided
    there) and full along the first: `(C * kw, N, Hp, *out_x)`, rows ordered (channel, tap)."""
    spatial = len(out)
    if any(pads):
        full = [0, 0, *pads[:spatial], 0, 0, *pads[spatial:]]
        current = node("Pad", [current, constant("pads", full)], "pad", mode="constant")
    # channels first, so that concatenating tap slices on axis 1 yields rows ordered (channel, tap)
    current = node("Transpose", [current], "channels_first", perm=[1, 0, *range(2, 2 + spatial)])
    other_axes = list(range(3, 2 + spatial))
    column_shift = node("Concat", shifts[1:], "column_shift", axis=0) if other_axes and shifts[1] is not None else None
    taps = []
    for index, offsets in enumerate(np.ndindex(*layer.kernel_shape[1:])):
        starts = [o * d for o, d in zip(offsets, layer.dilations[1:])]
        ends = [s + (n - 1) * st + 1 for s, n, st in zip(starts, out[1:], layer.strides[1:])]
        taps.append(
            slice_(current, starts, ends, other_axes, strides[1:], f"tap_{index}", column_shift)
            if other_axes
            else current
        )
    rows_tensor = node("Concat", taps, "rows", axis=1) if len(taps) > 1 else taps[0]
    # (C * kw, N, Hp, *sampled out_x): the last axes keep their (phase-dependent) sizes
    shape = constant("rows_shape", [layer.in_channels * len(taps), -1, *padded[:1], *[0] * len(other_axes)])
    return node("Reshape", [rows_tensor, shape], "h")
