"""Per-layer candidate tables (DESIGN.md 2.5): ranks -> cost and an estimate of the relative DA error.

The estimates are cheap and are upper bounds of what the full solvers reach, because the solvers start from
exactly the estimated point and never increase the error:
- svd: exact for every rank at once (eigenvalues of `W1 Sigma W1^T`);
- tucker2: for each R_S of a grid, U_S from `weighted_input_factor` and the exact (U_T, core) regression,
  which gives the error of every R_T from one eigendecomposition;
- cp: a short run of the solver (a few sweeps) at each rank of a coarser grid.
Weights and covariances come per group; errors are combined weighted by each group's output energy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..decompose.covariance import output_energy
from ..decompose.cp import cp_als, da_cp
from ..decompose.svd import svd_rank_errors
from ..decompose.tucker2 import tucker2_rank_errors, weighted_input_factor
from .costs import ConvGeometry, Cost, chain_cost, original_cost

GRID_POINTS = 48  # rank values per axis of a table
CP_GRID_POINTS = 8  # CP needs an iterative solve per rank: a coarser grid
CP_ESTIMATE_SWEEPS = 1  # after the Frobenius CP start: the estimate is cheap, the full solve refines it


@dataclass(frozen=True)
class Candidate:
    method: str
    ranks: tuple[int, ...]  # per group: (R,) for svd/cp, (R_T, R_S) for tucker2
    cost: Cost
    error: float  # estimated relative error, an upper bound of the full solver's


@dataclass(frozen=True)
class CandidateTable:
    name: str
    original: Cost
    candidates: tuple[Candidate, ...]  # only candidates that are cheaper than the original in some budget


def methods_for(method: str, geometry: ConvGeometry) -> tuple[str, ...]:
    """The methods tried on a layer: a 1x1 conv is a matrix, where the closed-form SVD is optimal."""
    if geometry.taps == 1:
        return ("svd",)
    return ("svd", "tucker2", "cp") if method == "auto" else (method,)


def axis_multiple(size: int, multiple: int) -> int:
    """The rank multiple for an axis of `size` channels: an axis narrower than the multiple (the runtime's
    channel block) never ran in the blocked layout, so its ranks need no rounding."""
    return multiple if size >= multiple else 1


def rank_grid(size: int, multiple: int = 1, points: int = GRID_POINTS, *, full: bool = True) -> list[int]:
    """Ranks up to `size` in steps that are multiples of `multiple`, about `points` of them, plus `size`
    itself when `full` (the full rank of an axis is always allowed)."""
    step = multiple * max(1, math.ceil(size / (multiple * points)))
    return sorted({*range(step, size + 1, step), *([size] if full else [])})


def estimate_errors(
    method: str,
    weights: Sequence[np.ndarray],
    sigmas: Sequence[np.ndarray] | None,
    ranks: Sequence[tuple[int, ...]],
    *,
    reference_sigmas: Sequence[np.ndarray] | None = None,
    seed: int = 0,
) -> list[float]:
    """Estimated relative error (see the module doc) of `method` at each per-group rank tuple in `ranks`.

    The error is relative to the output energy in `reference_sigmas` when given (the bias refit fits in the
    centered covariance but, like `fit.fit_layer`, measures against the uncentered output energy), else in
    `sigmas`: `sum_g ||(W_g - W~_g) L_g||^2 / sum_g ||W_g L_ref,g||^2`.
    """
    sigmas = sigmas if sigmas is not None else [None] * len(weights)
    references = reference_sigmas if reference_sigmas is not None else sigmas
    energies = np.array([output_energy(w, s) for w, s in zip(weights, sigmas)])
    total = sum(output_energy(w, s) for w, s in zip(weights, references))
    shares = energies / total if total > 0 else np.full(len(weights), 1 / len(weights))
    per_group = np.zeros((len(weights), len(ranks)))
    for g, (weight, sigma) in enumerate(zip(weights, sigmas)):
        if method == "svd":
            errors = svd_rank_errors(weight, sigma)
            per_group[g] = [errors[r - 1] for (r,) in ranks]
        elif method == "tucker2":
            ranks_in = sorted({r_in for _, r_in in ranks})
            table = tucker2_rank_errors(weight, sigma, weighted_input_factor(weight, sigma), ranks_in)
            row = {r_in: i for i, r_in in enumerate(ranks_in)}
            per_group[g] = [table[row[r_in], r_out - 1] for r_out, r_in in ranks]
        elif method == "cp":
            for i, (rank,) in enumerate(ranks):
                if sigma is None:
                    result = cp_als(weight, rank, seed=seed, max_iter=20)
                else:
                    result = da_cp(weight, sigma, rank, seed=seed, max_iter=CP_ESTIMATE_SWEEPS)
                per_group[g, i] = result.rel_error
        else:
            raise ValueError(f"unknown method {method!r}")
    return [float(v) for v in shares @ per_group]


def candidate_table(
    name: str,
    geometry: ConvGeometry,
    weights: Sequence[np.ndarray],
    sigmas: Sequence[np.ndarray] | None,
    method: str,
    *,
    reference_sigmas: Sequence[np.ndarray] | None = None,
    multiple: int = 1,
    seed: int = 0,
) -> CandidateTable:
    """Every candidate of the layer's methods on a rank grid that is cheaper than the original conv (errors
    relative to the output energy in `reference_sigmas` when given, see `estimate_errors`)."""
    original = original_cost(geometry)
    candidates = []
    for name_of_method in methods_for(method, geometry):
        ranks = _grid(name_of_method, geometry, original, multiple)
        if not ranks:
            continue
        errors = estimate_errors(name_of_method, weights, sigmas, ranks, reference_sigmas=reference_sigmas, seed=seed)
        for rank, error in zip(ranks, errors):
            candidates.append(Candidate(name_of_method, rank, chain_cost(geometry, name_of_method, rank), error))
    return CandidateTable(name, original, tuple(candidates))


def _grid(method: str, geometry: ConvGeometry, original: Cost, multiple: int) -> list[tuple[int, ...]]:
    """Rank tuples worth estimating: those whose chain is cheaper than the original in params or MACs."""
    limits = geometry.max_ranks[method]
    if method == "tucker2":
        outs = rank_grid(limits[0], axis_multiple(limits[0], multiple))
        ins = rank_grid(limits[1], axis_multiple(limits[1], multiple))
        pairs = [(r_out, r_in) for r_in in ins for r_out in outs]
        return [pair for pair in pairs if _saves(geometry, method, pair, original)]
    # svd and cp cost grows linearly with the rank: the largest useful rank follows from one evaluation
    bias = geometry.out_channels if geometry.bias else 0
    per_rank = chain_cost(geometry, method, (1,))
    largest = max(
        (original.params - bias - 1) // max(per_rank.params - bias, 1), (original.macs - 1) // max(per_rank.macs, 1)
    )
    largest = min(largest, limits[0])
    if largest < 1:
        return []
    points = CP_GRID_POINTS if method == "cp" else largest
    grid = rank_grid(largest, axis_multiple(limits[0], multiple), points, full=largest == limits[0])
    return [(r,) for r in grid if _saves(geometry, method, (r,), original)]


def _saves(geometry: ConvGeometry, method: str, ranks: tuple[int, ...], original: Cost) -> bool:
    cost = chain_cost(geometry, method, ranks)
    return cost.params < original.params or cost.macs < original.macs
