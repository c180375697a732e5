"""CP (docs/MATH.md): 1x1 conv S->R, one depthwise conv per kernel axis (group R, the layer's geometry along
that axis only), 1x1 conv R->T; and `cp-fused`, the same fit with one depthwise kxk conv (kernel r: the
outer product of the spatial factors' column r) instead of the 1-D ones.

The fused chain has more MACs (9 instead of 3 + 3 per rank and position for 3x3) but one node fewer, and
every node costs a pass over the feature map: on ResNet-56 with 52 CP layers (--method auto --speedup 1.3,
2 cores, onnxruntime CPU) the fused chains ran the whole model at 0.931 [0.916, 0.943] of the separable
ones' latency at batch 1 and 0.891 [0.865, 0.905] at batch 32. So the budgets that count parameters or MACs
plan the separable chain, and where the target is time the planned CP layers of each kernel shape get the
realization that runs the whole model faster (`speed.faster_realizations`). Either is fitted as CP, once."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import numpy as np

from ..decompose.cp import cp_als, da_cp, prepare_da_cp
from ..decompose.factors import CPFactors, FusedCPFactors
from ..geometry import Cost, LayerGeometry
from .base import SingleRankMethod, Stage, pointwise
from .svd import _chain_cost

GRID_POINTS = 8  # CP needs an iterative solve per rank: a coarser grid
# DA-CPD's input step multiplies Sigma ((S*D)^2) by an (S*D) x R matrix per CG iteration and holds a
# (D*R)^2 Gram: candidates stop at the rank where one such product reaches WORK_LIMIT flops (rank 94 on a
# 512-channel 3x3 layer, no limit up to 128 channels); Tucker-2 and SVD cover the larger ranks there
WORK_LIMIT = 2e9
# ... and the Gram's (D*R)^2 float64 entries at most this many (256 MiB): a 256-tap 1-D conv (an STFT front
# end) stops at rank 22 instead of asking for tens of GiB
GRAM_LIMIT = 2**25
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
        layers = [(rank * g.group_in, math.prod(g.input_spatial))]
        for axis, size in enumerate(g.kernel):
            # the depthwise conv along `axis` leaves axes after it at the input resolution
            spatial = g.output_spatial[: axis + 1] + g.input_spatial[axis + 1 :]
            layers.append((rank * size, math.prod(spatial)))
        layers.append((g.group_out * rank, math.prod(g.output_spatial)))
        return _chain_cost(g, layers)

    def affordable_rank(self, geometry: LayerGeometry) -> int:
        by_work = WORK_LIMIT // (geometry.group_in * geometry.taps) ** 2
        return int(min(by_work, math.isqrt(GRAM_LIMIT) // geometry.taps))

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
        for axis in range(spatial):
            # depthwise along one axis: kernel k_i on that axis, 1 elsewhere; weight (group*R, 1, ..., k_i, ...)
            taps = np.concatenate([f.spatial_factors[axis].T for f in factors])  # (group*R, k_i)
            size = first.spatial_factors[axis].shape[0]
            shape = [group * rank, 1] + [size if a == axis else 1 for a in range(spatial)]
            stages.append(Stage(taps.reshape(shape), group * rank, (axis,)))
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


class FusedCP(CP):
    name = "cp-fused"
    factors_type = FusedCPFactors
    variant_of = "cp"

    def applies(self, geometry: LayerGeometry) -> bool:
        return sum(size > 1 for size in geometry.kernel) > 1  # one axis: the two chains are the same nodes

    def cost(self, geometry: LayerGeometry, ranks) -> Cost:
        g, (rank,) = geometry, ranks
        layers = [
            (rank * g.group_in, math.prod(g.input_spatial)),
            (rank * math.prod(g.kernel), math.prod(g.output_spatial)),  # the fused depthwise conv
            (g.group_out * rank, math.prod(g.output_spatial)),
        ]
        return _chain_cost(g, layers)

    def solve(self, weight, sigma, ranks, *, max_iter, seed):
        result = super().solve(weight, sigma, ranks, max_iter=max_iter, seed=seed)
        return replace(result, factors=self.realize(result.factors))

    def realize(self, factors: CPFactors) -> FusedCPFactors:
        return FusedCPFactors(**{field.name: getattr(factors, field.name) for field in fields(factors)})

    def stages(self, factors):
        first = factors[0]
        spatial, group, rank = len(first.spatial_factors), len(factors), first.rank
        kernels = []
        for f in factors:
            kernel = f.spatial_factors[0].T  # (R, k_0), then one axis more per spatial factor
            for axis_factor in f.spatial_factors[1:]:
                kernel = kernel[..., None] * axis_factor.T.reshape(rank, *[1] * (kernel.ndim - 1), -1)
            kernels.append(kernel)
        return [
            Stage(pointwise(np.concatenate([f.input_factor.T for f in factors]), spatial), group, None),
            Stage(np.concatenate(kernels)[:, None], group * rank, tuple(range(spatial))),  # (group*R, 1, *k)
            Stage(pointwise(np.concatenate([f.output_factor for f in factors]), spatial), group, None),
        ]

    def placeholder(self, shape, ranks, rng):
        return self.realize(super().placeholder(shape, ranks, rng))
