"""Tucker-2 (docs/MATH.md): 1x1 conv S->R_S, kxk core R_S->R_T with the layer's geometry, 1x1 conv R_T->T.

A factor at full rank is folded into the core, so its 1x1 conv disappears (same function, less work).
"""

from __future__ import annotations

import math

import numpy as np

from ..decompose.factors import Tucker2Factors
from ..decompose.tucker2 import da_tucker2, tucker2_hooi, tucker2_rank_errors, weighted_input_factor
from ..geometry import Cost, LayerGeometry, original_cost
from .base import Method, Stage, axis_multiple, pointwise, rank_grid, saves
from .svd import _chain_cost


class Tucker2(Method):
    name = "tucker2"
    factors_type = Tucker2Factors
    rank_count = 2

    def applies(self, geometry: LayerGeometry) -> bool:
        return geometry.taps > 1

    def max_ranks(self, geometry: LayerGeometry):
        return (geometry.group_out, geometry.group_in)

    def cost(self, geometry: LayerGeometry, ranks) -> Cost:
        g, (rank_out, rank_in) = geometry, ranks
        inputs, outputs = math.prod(g.input_spatial), math.prod(g.output_spatial)
        layers = [(rank_out * rank_in * g.taps, outputs)]
        if rank_in < g.group_in:  # the input 1x1 conv runs at the input resolution (before the stride)
            layers.append((rank_in * g.group_in, inputs))
        if rank_out < g.group_out:
            layers.append((g.group_out * rank_out, outputs))
        return _chain_cost(g, layers)

    def grid(self, geometry: LayerGeometry, multiple: int):
        original = original_cost(geometry)
        limit_out, limit_in = self.max_ranks(geometry)
        outs = rank_grid(limit_out, axis_multiple(limit_out, multiple))
        ins = rank_grid(limit_in, axis_multiple(limit_in, multiple))
        pairs = [(r_out, r_in) for r_in in ins for r_out in outs]
        return [pair for pair in pairs if saves(self, geometry, pair, original)]

    def uniform_options(self, geometry: LayerGeometry, multiple: int):
        # ranks in proportion to the channels: R_T / T = R_S / S
        out_channels, in_channels = self.max_ranks(geometry)
        step_out, step_in = axis_multiple(out_channels, multiple), axis_multiple(in_channels, multiple)
        options = []
        for rank_out in range(step_out, out_channels + step_out, step_out):
            rank_out = min(rank_out, out_channels)
            proportional = int(round(rank_out * in_channels / out_channels / step_in)) * step_in
            rank_in = min(in_channels, max(step_in, proportional))
            options.append((rank_out, rank_in))
        return options

    def estimate(self, weight, sigma, ranks, seed):
        # for each R_S, U_S from the nested weighted input factor and the exact (U_T, core) regression give the
        # error of every R_T from one eigendecomposition
        ranks_in = sorted({r_in for _, r_in in ranks})
        table = tucker2_rank_errors(weight, sigma, weighted_input_factor(weight, sigma), ranks_in)
        row = {r_in: i for i, r_in in enumerate(ranks_in)}
        return [table[row[r_in], r_out - 1] for r_out, r_in in ranks]

    def solve(self, weight, sigma, ranks, *, max_iter, seed):
        if sigma is None:
            return tucker2_hooi(weight, ranks, max_iter=max_iter)
        start = weighted_input_factor(weight, sigma)[:, : ranks[1]]
        return da_tucker2(weight, sigma, ranks, init=start, max_iter=max_iter, seed=seed)

    def ranks_of(self, factors):
        return factors.ranks

    def normalize_ranks(self, ranks):
        return ranks * 2 if len(ranks) == 1 else ranks

    def stages(self, factors):
        first = factors[0]
        spatial = first.core.ndim - 2
        group = len(factors)
        fold_in = first.input_factor.shape[0] == first.input_factor.shape[1]
        fold_out = first.output_factor.shape[0] == first.output_factor.shape[1]
        cores = []
        for f in factors:
            core = np.einsum("oi...,si->os...", f.core, f.input_factor) if fold_in else f.core
            cores.append(np.einsum("tr,r...->t...", f.output_factor, core) if fold_out else core)
        stages = [Stage(np.concatenate(cores), group, tuple(range(spatial)))]
        if not fold_in:
            inputs = np.concatenate([f.input_factor.T for f in factors])
            stages.insert(0, Stage(pointwise(inputs, spatial), group, None))
        if not fold_out:
            outputs = np.concatenate([f.output_factor for f in factors])
            stages.append(Stage(pointwise(outputs, spatial), group, None))
        return stages

    def placeholder(self, shape, ranks, rng):
        out_channels, in_channels, *kernel = shape
        scale = 1 / math.sqrt(in_channels * math.prod(kernel))
        rank_out, rank_in = ranks
        return Tucker2Factors(
            rng.standard_normal((in_channels, rank_in)),
            rng.standard_normal((rank_out, rank_in, *kernel)) * scale,
            rng.standard_normal((out_channels, rank_out)),
        )
