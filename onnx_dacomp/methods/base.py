"""What a decomposition method is: one object that ties its solver, its candidate-error estimate, its rank
limits, its cost formula and its chain together (pure numpy; the layer kinds turn a chain into graph nodes).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..decompose.factors import Factors
from ..decompose.result import Decomposition
from ..geometry import Cost, LayerGeometry, original_cost

GRID_POINTS = 48  # rank values per axis of a candidate table

Ranks = tuple[int, ...]  # per group: (R,) for svd/cp, (R_T, R_S) for tucker2


@dataclass(frozen=True, eq=False)
class Stage:
    """One layer of a chain, independent of the graph format.

    `weight`: all groups stacked along axis 0, in the ONNX Conv layout (out, in / group, *kernel); `group`:
    its group count; `axes`: the spatial axes along which it applies the original layer's stride, padding
    and dilation, or None for a pointwise stage (a 1x1 conv, or a matrix product for a dense layer).
    """

    weight: np.ndarray
    group: int
    axes: tuple[int, ...] | None
    channels: np.ndarray | None = None  # the input channels it reads (a Gather first), None: all of them


class Method(ABC):
    """One decomposition method. Weights are per group, `(T/G, S/G, *kernel)`; `sigma` is that group's input
    covariance, or None for the data-free (Frobenius) variant."""

    name: str
    factors_type: type
    rank_count: int  # entries of a rank tuple
    # another method whose fits this one realizes as a different chain (the same function, other nodes): not
    # in `auto`'s tables, but chosen for a planned layer where its chain is measured faster
    variant_of: str | None = None
    held_out_estimates: bool = False  # `estimate_held_out` in closed form (every rank at once)
    automatic: bool = True  # among the methods `auto` chooses from
    prunes_inputs: bool = False  # reads some of the layer's input channels: the layers computing them shrink too

    def applies(self, geometry: LayerGeometry) -> bool:
        """Whether the method is worth trying on the layer (a 1x1 conv is a matrix: SVD is optimal there)."""
        return True

    @abstractmethod
    def max_ranks(self, geometry: LayerGeometry) -> Ranks:
        """The largest rank(s) the method accepts for the layer."""

    @abstractmethod
    def cost(self, geometry: LayerGeometry, ranks: Ranks) -> Cost:
        """Parameters and MACs of the chain at per-group `ranks` (docs/MATH.md)."""

    @abstractmethod
    def grid(self, geometry: LayerGeometry, multiple: int) -> list[Ranks]:
        """Rank tuples worth estimating for a candidate table: those whose chain saves params or MACs."""

    @abstractmethod
    def uniform_options(self, geometry: LayerGeometry, multiple: int) -> list[Ranks]:
        """Rank tuples of growing size for uniform allocation (one ratio for every layer)."""

    @abstractmethod
    def estimate(self, weight: np.ndarray, sigma: np.ndarray | None, ranks: Sequence[Ranks], seed: int) -> list[float]:
        """Cheap relative errors at each rank tuple, upper bounds of what `solve` reaches there."""

    def estimate_held_out(
        self, weight: np.ndarray, sigma: np.ndarray | None, held_out: np.ndarray, ranks: Sequence[Ranks], seed: int
    ) -> list[float]:
        """Relative errors in `held_out` (the second moment of vectors the fit did not see) of the fits in
        `sigma` at each rank tuple, where the method has them in closed form (`held_out_estimates`)."""
        raise NotImplementedError(f"{self.name} has no closed-form held-out errors")

    @abstractmethod
    def solve(
        self, weight: np.ndarray, sigma: np.ndarray | None, ranks: Ranks, *, max_iter: int, seed: int
    ) -> Decomposition:
        """The full solver at `ranks`, started where `estimate` was computed."""

    def realize(self, factors: Factors) -> Factors:
        """A variant's factors of a fit of the method it realizes (`variant_of`): the same function, its chain."""
        raise NotImplementedError(f"{self.name} realizes no other method's fits")

    @abstractmethod
    def ranks_of(self, factors: Factors) -> Ranks:
        """The per-group ranks of a factors object of this method."""

    @abstractmethod
    def stages(self, factors: Sequence[Factors]) -> list[Stage]:
        """The chain of one layer from its per-group factors (all of this method and the same ranks)."""

    @abstractmethod
    def placeholder(self, shape: tuple[int, ...], ranks: Ranks, rng: np.random.Generator) -> Factors:
        """Random factors of the right shapes for a group weight of `shape` (to time a chain: values do not
        change its speed)."""

    def affordable_rank(self, geometry: LayerGeometry) -> int | None:
        """The largest rank worth a candidate given the solver's cost on this layer (None: no limit)."""
        return None

    def normalize_ranks(self, ranks: Ranks) -> Ranks:
        """Ranks as the user may write them (a single int for a two-rank method) -> the method's tuple."""
        return ranks


def axis_multiple(size: int, multiple: int) -> int:
    """The rank multiple for an axis of `size` channels: an axis narrower than the multiple (the runtime's
    channel block) never ran in the blocked layout, so its ranks need no rounding."""
    return multiple if size >= multiple else 1


def rank_grid(size: int, multiple: int = 1, points: int = GRID_POINTS, *, full: bool = True) -> list[int]:
    """Ranks up to `size` in steps that are multiples of `multiple`, about `points` of them, plus `size`
    itself when `full` (the full rank of an axis is always allowed)."""
    step = multiple * max(1, math.ceil(size / (multiple * points)))
    return sorted({*range(step, size + 1, step), *([size] if full else [])})


def saves(method: Method, geometry: LayerGeometry, ranks: Ranks, original: Cost) -> bool:
    cost = method.cost(geometry, ranks)
    return cost.params < original.params or cost.macs < original.macs


def pointwise(matrix: np.ndarray, spatial: int) -> np.ndarray:
    """A (out, in) matrix as a 1x1 conv weight (out, in, 1, ..., 1)."""
    return matrix.reshape(*matrix.shape, *([1] * spatial))


class SingleRankMethod(Method):
    """A method with one rank whose chain cost grows linearly with it (svd, cp)."""

    rank_count = 1
    grid_points: int | None = None  # None: every rank up to the largest useful one

    def grid(self, geometry: LayerGeometry, multiple: int) -> list[Ranks]:
        # the largest useful rank follows from one evaluation of the linear cost
        original = original_cost(geometry)
        limit = self.max_ranks(geometry)[0]
        bias = geometry.out_channels if geometry.bias else 0
        per_rank = self.cost(geometry, (1,))
        largest = max(
            (original.params - bias - 1) // max(per_rank.params - bias, 1),
            (original.macs - 1) // max(per_rank.macs, 1),
        )
        affordable = self.affordable_rank(geometry)
        largest = min(largest, limit, limit if affordable is None else affordable)
        if largest < 1:
            return []
        points = self.grid_points or largest
        grid = rank_grid(largest, axis_multiple(limit, multiple), points, full=largest == limit)
        return [(r,) for r in grid if saves(self, geometry, (r,), original)]

    def uniform_options(self, geometry: LayerGeometry, multiple: int) -> list[Ranks]:
        limit = self.max_ranks(geometry)[0]
        step = axis_multiple(limit, multiple)
        return [(min(r, limit),) for r in range(step, limit + step, step)]

    def ranks_of(self, factors: Factors) -> Ranks:
        return (factors.rank,)
