"""Patch geometry of a Conv layer, and its patches cut in numpy (the fallback statistics path).

A patch is what one output position of the layer sees: the zero-padded input under the kernel window, with
the layer's stride and dilation, ordered `(channel, kernel taps)` like the rows of `W.reshape(T, -1)`.
"""

from __future__ import annotations

import math

import numpy as np


def explicit_pads(layer, input_spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The layer's padding as `(begins..., ends...)`, with `auto_pad` resolved for this input size."""
    spatial = len(layer.kernel_shape)
    if layer.auto_pad in ("NOTSET", ""):
        return tuple(layer.pads) if layer.pads else (0,) * 2 * spatial
    if layer.auto_pad == "VALID":
        return (0,) * 2 * spatial
    begins, ends = [], []
    for size, kernel, stride, dilation in zip(input_spatial, layer.kernel_shape, layer.strides, layer.dilations):
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if layer.auto_pad == "SAME_UPPER" else (large, small)
        begins.append(begin)
        ends.append(end)
    return (*begins, *ends)


def output_spatial(layer, input_spatial: tuple[int, ...]) -> tuple[int, ...]:
    pads = explicit_pads(layer, input_spatial)
    spatial = len(input_spatial)
    return tuple(
        (size + pads[axis] + pads[axis + spatial] - (layer.kernel_shape[axis] - 1) * layer.dilations[axis] - 1)
        // layer.strides[axis]
        + 1
        for axis, size in enumerate(input_spatial)
    )


def patches(x: np.ndarray, layer, dtype=np.float64) -> np.ndarray:
    """All patches of a batch: `(group, n, batch * positions)` in `dtype`, each tap's window copied once
    straight to its place (stacking the taps and then moving the group axis first copied every patch twice:
    53 s of EfficientNet-Lite0's compensation went to that second copy)."""
    x = np.asarray(x)
    spatial_in = x.shape[2:]
    pads = explicit_pads(layer, spatial_in)
    spatial = len(spatial_in)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[a], pads[a + spatial]) for a in range(spatial)])
    out = output_spatial(layer, spatial_in)
    batch, channels = x.shape[:2]
    group, taps = layer.group, math.prod(layer.kernel_shape)
    result = np.empty((group, channels // group, taps, batch, math.prod(out)), dtype)
    for tap, offsets in enumerate(np.ndindex(*layer.kernel_shape)):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in zip(offsets, layer.dilations, out, layer.strides)
        )
        values = padded[(slice(None), slice(None), *window)].reshape(batch, group, channels // group, -1)
        result[:, :, tap] = values.transpose(1, 2, 0, 3)
    return result.reshape(group, channels // group * taps, -1)
