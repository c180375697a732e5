"""SVD (docs/MATH.md): a kxk conv S->R with the layer's geometry, then a 1x1 conv R->T. Closed form."""

from __future__ import annotations

import math

import numpy as np

from ..decompose.factors import SVDFactors
from ..decompose.svd import da_svd, svd_held_out_errors, svd_rank_errors, truncated_svd
from ..geometry import Cost, LayerGeometry
from .base import SingleRankMethod, Stage, pointwise


class SVD(SingleRankMethod):
    name = "svd"
    factors_type = SVDFactors
    held_out_estimates = True

    def max_ranks(self, geometry: LayerGeometry):
        return (min(geometry.group_out, geometry.group_in * geometry.taps),)

    def cost(self, geometry: LayerGeometry, ranks) -> Cost:
        g, (rank,) = geometry, ranks
        outputs = math.prod(g.output_spatial)
        layers = [(rank * g.group_in * g.taps, outputs), (g.group_out * rank, outputs)]
        return _chain_cost(g, layers)

    def estimate(self, weight, sigma, ranks, seed):
        errors = svd_rank_errors(weight, sigma)  # exact for every rank at once
        return [errors[r - 1] for (r,) in ranks]

    def estimate_held_out(self, weight, sigma, held_out, ranks, seed):
        errors = svd_held_out_errors(weight, sigma, held_out)  # exact for every rank at once
        return [errors[r - 1] for (r,) in ranks]

    def solve(self, weight, sigma, ranks, *, max_iter, seed):
        return truncated_svd(weight, ranks[0]) if sigma is None else da_svd(weight, sigma, ranks[0])

    def stages(self, factors):
        spatial = factors[0].first.ndim - 2
        group = len(factors)
        return [
            Stage(np.concatenate([f.first for f in factors]), group, tuple(range(spatial))),
            Stage(pointwise(np.concatenate([f.last for f in factors]), spatial), group, None),
        ]

    def placeholder(self, shape, ranks, rng):
        out_channels, in_channels, *kernel = shape
        scale = 1 / math.sqrt(in_channels * math.prod(kernel))
        rank = ranks[0]
        return SVDFactors(
            rng.standard_normal((rank, in_channels, *kernel)) * scale, rng.standard_normal((out_channels, rank))
        )


def _chain_cost(geometry: LayerGeometry, layers: list[tuple[int, int]]) -> Cost:
    """Cost of a chain given per group as (weights, output positions) per stage, plus the bias."""
    g = geometry
    params = g.group * sum(weights for weights, _ in layers)
    macs = g.group * sum(weights * positions for weights, positions in layers)
    return Cost(params + (g.out_channels if g.bias else 0), macs)
