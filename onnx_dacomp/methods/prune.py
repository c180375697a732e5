"""Channel pruning (docs/MATH.md, "Channel pruning"): the layer reads R of its S input channels, its weight
refit on them by least squares in the input covariance. The chain is a Gather of those channels and the
layer's own conv (or matrix product) on them; `channels.shrink_producers` then removes the Gather where the
channels come from a layer through per-channel operations only (an activation, a depthwise conv, a bias),
which then computes only the channels read. Out of `auto`: the allocation counts the pruned layer's cost, not
its producer's, so it is asked for by name (`--method prune`)."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from ..decompose.channels import ChannelOrder, channel_order, held_out_errors, refit_on_channels
from ..decompose.factors import ChannelFactors
from ..decompose.result import Decomposition
from ..geometry import Cost, LayerGeometry
from .base import SingleRankMethod, Stage
from .svd import _chain_cost


class Prune(SingleRankMethod):
    name = "prune"
    factors_type = ChannelFactors
    automatic = False
    prunes_inputs = True
    held_out_estimates = True

    def applies(self, geometry: LayerGeometry) -> bool:
        return geometry.group == 1 and geometry.in_channels > 1

    def max_ranks(self, geometry: LayerGeometry):
        return (geometry.in_channels,)

    def cost(self, geometry: LayerGeometry, ranks) -> Cost:
        g, (rank,) = geometry, ranks
        return _chain_cost(g, [(g.out_channels * rank * g.taps, math.prod(g.output_spatial))])

    def estimate(self, weight, sigma, ranks, seed):
        errors = _order(weight, sigma).errors  # exact for every count at once (the greedy order is nested)
        return [float(errors[r - 1]) for (r,) in ranks]

    def estimate_held_out(self, weight, sigma, held_out, ranks, seed):
        weight = np.asarray(weight, np.float64)
        return held_out_errors(
            weight, _covariance(weight, sigma), held_out, [r for (r,) in ranks], _order(weight, sigma)
        )

    def solve(self, weight, sigma, ranks, *, max_iter, seed):
        order = _order(weight, sigma)
        channels = np.sort(order.channels[: ranks[0]])
        refit = refit_on_channels(weight, _covariance(weight, sigma), channels)
        error = float(order.errors[ranks[0] - 1])
        return Decomposition(ChannelFactors(channels, refit, weight.shape[1]), error, (error,), 1, True)

    def ranks_of(self, factors):
        return (factors.rank,)

    def stages(self, factors):
        (only,) = factors  # one group: `applies` takes no grouped conv
        return [Stage(only.weight, 1, tuple(range(only.weight.ndim - 2)), channels=only.channels)]

    def placeholder(self, shape, ranks, rng):
        out_channels, in_channels, *kernel = shape
        weight = rng.standard_normal((out_channels, ranks[0], *kernel)) / math.sqrt(in_channels * math.prod(kernel))
        return ChannelFactors(np.arange(ranks[0]), weight, in_channels)


def _covariance(weight: np.ndarray, sigma: np.ndarray | None) -> np.ndarray:
    return np.eye(math.prod(weight.shape[1:])) if sigma is None else sigma  # data-free: the Frobenius norm


# a layer's greedy order is asked for by its candidate table, its sensitivity probe and its fit, each time the
# same (0.8 s on a 1152-input projection of EfficientNet-Lite0): kept per process, keyed by the arrays' bytes
_ORDERS: dict[bytes, ChannelOrder] = {}
MAX_ORDERS = 256


def _order(weight, sigma) -> ChannelOrder:
    weight = np.ascontiguousarray(weight, np.float64)
    covariance = np.ascontiguousarray(_covariance(weight, sigma), np.float64)
    digest = hashlib.blake2b(repr((weight.shape, covariance.shape)).encode(), digest_size=16)
    digest.update(weight.data)
    digest.update(covariance.data)
    key = digest.digest()
    if key not in _ORDERS:
        if len(_ORDERS) >= MAX_ORDERS:
            del _ORDERS[next(iter(_ORDERS))]  # the oldest
        _ORDERS[key] = channel_order(weight, covariance)
    return _ORDERS[key]
