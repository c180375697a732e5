"""CP (docs/MATH.md): 1x1 conv S->R, one depthwise kxk conv (group R) whose kernels are the rank-one outer
products of the spatial factors, 1x1 conv R->T.

The depthwise part could also run as one 1-D depthwise conv per kernel axis (fewer MACs: 3 + 3 instead of 9
per position for 3x3); one fused conv is exactly the same function and measured faster end to end, since
every node costs a pass over the feature map: ResNet-56 with 52 CP layers (--method auto --speedup 1.3),
fused against separable, latency ratio 0.931 [0.916, 0.943] at batch 1 and 0.891 [0.865, 0.905] at batch 32
(2 cores, onnxruntime CPU)."""

from __future__ import annotations

import math

import numpy as np

from ..decompose.cp import cp_als, da_cp, prepare_da_cp
from ..decompose.factors import CPFactors
from ..geometry import Cost, LayerGeometry
from .base import SingleRankMethod, Stage, pointwise
from .svd import _chain_cost

GRID_POINTS = 8  # CP needs an iterative solve per rank: a coarser grid
# DA-CPD's input step multiplies Sigma ((S*D)^2) by an (S*D) x R matrix per CG iteration and holds a
# (D*R)^2 Gram: candidates stop at the rank where one such product reaches WORK_LIMIT flops (rank 94 on a
# 512-channel 3x3 layer, no limit up to 128 channels); Tucker-2 and SVD cover the larger ranks there
WORK_LIMIT = 2e9
ESTIMATE_SWEEPS = 1  # after the Frobenius CP start: the estimate is cheap, the full solve refines it
FROBENIUS_ESTIMATE_SWEEPS = 20


class CP(SingleRankMethod):
    name = "cp"
    factors_type = CPFactors
    grid_points = GRID_POINTS

    def applies(self, geometry: LayerGeometry) -> bool:
        return geometry.taps > 1

    def max_ranks(self, geometry: LayerGeometry):
        return (geometry.group_out * geometry.group_in * geometry.taps,)

    def cost(self, geometry: LayerGeometry, ranks) -> Cost:
        g, (rank,) = geometry, ranks
        layers = [
            (rank * g.group_in, math.prod(g.input_spatial)),
            (rank * math.prod(g.kernel), math.prod(g.output_spatial)),  # the fused depthwise conv
            (g.group_out * rank, math.prod(g.output_spatial)),
        ]
        return _chain_cost(g, layers)

    def affordable_rank(self, geometry: LayerGeometry) -> int:
        return int(WORK_LIMIT // (geometry.group_in * geometry.taps) ** 2)

    def estimate(self, weight, sigma, ranks, seed):
        # a short run of the solver at each rank, on one regularized Sigma for all of them
        prepared = None if sigma is None else prepare_da_cp(weight, sigma)
        errors = []
        for (rank,) in ranks:
            if sigma is None:
                result = cp_als(weight, rank, seed=seed, max_iter=FROBENIUS_ESTIMATE_SWEEPS)
            else:
                result = da_cp(weight, sigma, rank, seed=seed, max_iter=ESTIMATE_SWEEPS, prepared=prepared)
            errors.append(result.rel_error)
        return errors

    def solve(self, weight, sigma, ranks, *, max_iter, seed):
        if sigma is None:
            return cp_als(weight, ranks[0], max_iter=max_iter, seed=seed)
        return da_cp(weight, sigma, ranks[0], max_iter=max_iter, seed=seed)

    def stages(self, factors):
        first = factors[0]
        spatial, group, rank = len(first.spatial_factors), len(factors), first.rank
        stages = [Stage(pointwise(np.concatenate([f.input_factor.T for f in factors]), spatial), group, None)]
        # one depthwise conv: kernel r of group g is the outer product of the spatial factors' column r
        kernels = []
        for f in factors:
            kernel = f.spatial_factors[0].T  # (R, k_0)
            for axis_factor in f.spatial_factors[1:]:
                kernel = kernel[..., None] * axis_factor.T.reshape(rank, *[1] * (kernel.ndim - 1), -1)
            kernels.append(kernel)
        weight = np.concatenate(kernels)[:, None]  # (group*R, 1, k_0, ..., k_n)
        stages.append(Stage(weight, group * rank, tuple(range(spatial))))
        stages.append(Stage(pointwise(np.concatenate([f.output_factor for f in factors]), spatial), group, None))
        return stages

    def placeholder(self, shape, ranks, rng):
        out_channels, in_channels, *kernel = shape
        scale = 1 / math.sqrt(in_channels * math.prod(kernel))
        rank = ranks[0]
        spatial = tuple(rng.standard_normal((size, rank)) for size in kernel)
        return CPFactors(
            rng.standard_normal((in_channels, rank)) * scale, spatial, rng.standard_normal((out_channels, rank))
        )
