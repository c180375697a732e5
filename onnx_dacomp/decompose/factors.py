"""Factor containers for the chain realizations (docs/MATH.md), and their reconstructions.

Pure numpy. Weights follow the ONNX Conv layout `(T, S, *kernel)`; each container holds the factors of one
group (a grouped conv has one container per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class SVDFactors:
    """`W ~ last @ first`: a conv S->R with the original kernel (`first`, (R, S, *k)), then 1x1 R->T."""

    first: np.ndarray  # (R, S, *kernel)
    last: np.ndarray  # (T, R)

    @property
    def rank(self) -> int:
        return self.first.shape[0]


@dataclass(frozen=True, eq=False)
class Tucker2Factors:
    """`W ~ core x_0 output_factor x_1 input_factor`: 1x1 S->R_S, core R_S->R_T with the kernel, 1x1 R_T->T."""

    input_factor: np.ndarray  # U_S, (S, R_S)
    core: np.ndarray  # G, (R_T, R_S, *kernel)
    output_factor: np.ndarray  # U_T, (T, R_T)

    @property
    def ranks(self) -> tuple[int, int]:
        """(R_T, R_S), in the order of the weight axes."""
        return self.core.shape[0], self.core.shape[1]


@dataclass(frozen=True, eq=False)
class CPFactors:
    """`W[t,s,h,w] ~ sum_r U_T[t,r] U_S[s,r] U_H[h,r] U_W[w,r]` (one spatial factor per kernel axis)."""

    input_factor: np.ndarray  # U_S, (S, R)
    spatial_factors: tuple[np.ndarray, ...]  # U_H, U_W: (k_i, R) each
    output_factor: np.ndarray  # U_T, (T, R)

    @property
    def rank(self) -> int:
        return self.input_factor.shape[1]


class FusedCPFactors(CPFactors):
    """CP factors whose chain runs the spatial part as one depthwise kxk conv (kernel r: the outer product of
    the spatial factors' column r) instead of one 1-D depthwise conv per axis: the same function."""


@dataclass(frozen=True, eq=False)
class ChannelFactors:
    """`W ~ weight` on the input `channels` only (zero on the others): a pruned layer's refit weight."""

    channels: np.ndarray  # (R,) sorted input channel indices
    weight: np.ndarray  # (T, R, *kernel)
    in_channels: int  # S

    @property
    def rank(self) -> int:
        return len(self.channels)


Factors = SVDFactors | Tucker2Factors | CPFactors | ChannelFactors


def reconstruct(factors: Factors) -> np.ndarray:
    """The weight `(T, S, *kernel)` that the factors represent."""
    if isinstance(factors, SVDFactors):
        return np.tensordot(factors.last, factors.first, axes=(1, 0))
    if isinstance(factors, Tucker2Factors):
        weight = np.tensordot(factors.output_factor, factors.core, axes=(1, 0))  # (T, R_S, *k)
        weight = np.tensordot(factors.input_factor, weight, axes=(1, 1))  # (S, T, *k)
        return np.swapaxes(weight, 0, 1)
    if isinstance(factors, CPFactors):
        letters = "hwdefg"[: len(factors.spatial_factors)]
        operands = [factors.output_factor, factors.input_factor, *factors.spatial_factors]
        spec = "tr,sr," + ",".join(f"{axis}r" for axis in letters) + "->ts" + letters
        return np.einsum(spec, *operands, optimize=True)
    if isinstance(factors, ChannelFactors):
        weight = np.zeros((len(factors.weight), factors.in_channels, *factors.weight.shape[2:]))
        weight[:, factors.channels] = factors.weight
        return weight
    raise TypeError(f"not a factor container: {type(factors).__name__}")


def weight_shape(factors: Factors) -> tuple[int, ...]:
    """The shape of `reconstruct(factors)`, from the factors' shapes alone (the rewrite checks every chain's, each
    time it writes a model); ValueError where their inner dimensions do not match."""
    if isinstance(factors, SVDFactors):
        (rank, inputs, *kernel), (outputs, inner) = factors.first.shape, factors.last.shape
        inners = {rank, inner}
    elif isinstance(factors, Tucker2Factors):
        (inputs, input_rank), (output_rank, core_inputs, *kernel) = factors.input_factor.shape, factors.core.shape
        outputs, inner = factors.output_factor.shape
        if input_rank != core_inputs:
            raise ValueError(f"Tucker-2 factors: an input factor of rank {input_rank}, a core of {core_inputs} inputs")
        inners = {output_rank, inner}
    elif isinstance(factors, CPFactors):
        (inputs, rank), (outputs, inner) = factors.input_factor.shape, factors.output_factor.shape
        kernel = [len(spatial) for spatial in factors.spatial_factors]
        inners = {rank, inner, *(spatial.shape[1] for spatial in factors.spatial_factors)}
    elif isinstance(factors, ChannelFactors):
        outputs, kept, *kernel = factors.weight.shape
        inputs, inners = factors.in_channels, {kept, len(factors.channels)}
    else:
        raise TypeError(f"not a factor container: {type(factors).__name__}")
    if len(inners) != 1:
        raise ValueError(f"{type(factors).__name__}: inner dimensions {sorted(inners)} do not match")
    return (outputs, inputs, *kernel)
