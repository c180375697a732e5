"""Tucker-2 of a conv weight (DESIGN.md 2.2): distribution-aware ALS and the Frobenius HOSVD/HOOI baseline.

Weight `W` (T, S, *kernel), `D = prod(kernel)`, `W1 = W.reshape(T, S*D)`, `Sigma` (S*D, S*D) in the same
`(s, kernel)` order. Model: `W1~ = U_T G1 (U_S kron I_D)^T`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.linalg

from .cg import conjugate_gradients
from .covariance import DEFAULT_FLOOR, regularize, sandwich, tap_major
from .factors import Tucker2Factors
from .result import Decomposition, run_sweeps
from .svd import _sign_fixed, _top_eigenvectors

Callback = Callable[[int, float], None]


def tucker2_hooi(
    weight: np.ndarray,
    ranks: tuple[int, int],
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: str = "hosvd",
    seed: int = 0,
) -> Decomposition:
    """Frobenius Tucker-2 over the output and input channel modes (what tensorly's partial_tucker gives).

    `ranks = (R_T, R_S)`. HOSVD initialization (`init="hosvd"`, `max_iter=0` gives plain HOSVD), then HOOI.
    """
    weight = np.asarray(weight, np.float64)
    out_channels, in_channels, kernel, rank_out, rank_in = _dims(weight, ranks)
    tensor = weight.reshape(out_channels, in_channels, -1)
    total = float(np.sum(tensor**2))
    input_factor = _initial_input_factor(tensor, rank_in, init, seed)
    output_factor = _top_left(tensor.reshape(out_channels, -1), rank_out)
    history, converged, iteration = [], False, 0
    for iteration in range(1, max_iter + 1):
        projected = np.einsum("tsd,sr->trd", tensor, input_factor, optimize=True)
        output_factor = _top_left(projected.reshape(out_channels, -1), rank_out)
        projected = np.einsum("tsd,tr->srd", tensor, output_factor, optimize=True)
        input_factor = _top_left(projected.reshape(in_channels, -1), rank_in)
        core = np.einsum("tsd,ta,sb->abd", tensor, output_factor, input_factor, optimize=True)
        history.append(max(0.0, 1.0 - float(np.sum(core**2)) / total) if total > 0 else 0.0)
        if len(history) > 1 and history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            converged = True
            break
    core = np.einsum("tsd,ta,sb->abd", tensor, output_factor, input_factor, optimize=True)
    error = max(0.0, 1.0 - float(np.sum(core**2)) / total) if total > 0 else 0.0
    factors = Tucker2Factors(input_factor, core.reshape(rank_out, rank_in, *kernel), output_factor)
    return Decomposition(factors, error, tuple(history) or (error,), iteration, converged or max_iter == 0)


def da_tucker2(
    weight: np.ndarray,
    sigma: np.ndarray,
    ranks: tuple[int, int],
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: str = "hooi",
    seed: int = 0,
    floor: float = DEFAULT_FLOOR,
    direct_limit: int = 3072,
    cg_iter: int = 8,
    callback: Callback | None = None,
) -> Decomposition:
    """Distribution-aware Tucker-2: minimize `||(W1 - W1~) L||^2` by alternating exact steps.

    Each sweep: the input factor U_S from its normal equations (direct solve while `S*R_S <= direct_limit`,
    else preconditioned CG warm-started at the current U_S), re-orthonormalized; then (U_T, core) jointly
    by reduced-rank regression. The error never increases. `init`: "hooi" (the Frobenius solution, so the
    result is never worse than it in the Sigma-norm), "hosvd" or "random" (seeded). Stops when a sweep
    lowers the relative error by less than `tol` times itself. `callback(sweep, rel_error)` after each sweep.
    """
    weight = np.asarray(weight, np.float64)
    out_channels, in_channels, kernel, rank_out, rank_in = _dims(weight, ranks)
    taps = math.prod(kernel)
    problem = _Problem(weight.reshape(out_channels, -1), regularize(sigma, floor), in_channels, taps)
    tensor = weight.reshape(out_channels, in_channels, taps)
    if init == "hooi":
        input_factor = tucker2_hooi(weight, ranks).factors.input_factor
    else:
        input_factor = _initial_input_factor(tensor, rank_in, init, seed)

    output_factor, core, error = problem.output_step(input_factor, rank_out)

    def sweep() -> float:
        nonlocal input_factor, output_factor, core
        solved = problem.input_step(input_factor, output_factor, core, direct_limit, cg_iter)
        input_factor = _orthonormal(solved)
        output_factor, core, new_error = problem.output_step(input_factor, rank_out)
        return new_error

    history, sweeps, converged = run_sweeps(error, sweep, max_iter=max_iter, tol=tol, callback=callback)
    factors = Tucker2Factors(input_factor, core.reshape(rank_out, rank_in, *kernel), output_factor)
    return Decomposition(factors, history[-1], tuple(history), sweeps, converged)


class _Problem:
    """The fixed data of one DA-Tucker-2 fit and its two exact steps."""

    def __init__(self, matrix: np.ndarray, sigma: np.ndarray, in_channels: int, taps: int):
        self.matrix, self.sigma, self.channels, self.taps = matrix, sigma, in_channels, taps
        self.weighted = matrix @ sigma  # W1 Sigma, (T, n)
        self.total = float(np.einsum("ij,ij->", self.weighted, matrix, optimize=True))
        self.blocks = tap_major(sigma, in_channels, taps)
        blocks = sigma.reshape(in_channels, taps, in_channels, taps)
        self.channel_covariance = np.einsum("sdud->su", blocks, optimize=True)  # Kronecker preconditioner factors
        self.tap_covariance = np.einsum("sdse->de", blocks, optimize=True)

    def output_step(self, input_factor: np.ndarray, rank_out: int):
        """Optimal (U_T, G1) for the given U_S: reduced-rank regression. Returns them and the rel. error."""
        channels, taps, rank = self.channels, self.taps, input_factor.shape[1]
        gram = sandwich(self.blocks, input_factor).transpose(1, 0, 3, 2).reshape(rank * taps, -1)
        gram = (gram + gram.T) / 2  # A = P^T Sigma P
        cross = np.einsum("tsd,sr->trd", self.weighted.reshape(-1, channels, taps), input_factor, optimize=True)
        cross = cross.reshape(len(self.matrix), -1)  # W1 Sigma P
        regression = scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram), cross.T).T  # M = W1 Sigma P A^-1
        explained = regression @ cross.T  # M A M^T
        explained = (explained + explained.T) / 2
        size = len(explained)
        values, vectors = scipy.linalg.eigh(explained, subset_by_index=[size - rank_out, size - 1])
        output_factor = _sign_fixed(vectors[:, ::-1])
        core = output_factor.T @ regression
        error = max(0.0, (self.total - float(values.sum())) / self.total) if self.total > 0 else 0.0
        return output_factor, core, error

    def input_step(self, input_factor, output_factor, core, direct_limit: int, cg_iter: int) -> np.ndarray:
        """Optimal U_S for the given (U_T, G1): normal equations `H vec(U_S) = b`."""
        channels, taps, rank = self.channels, self.taps, input_factor.shape[1]
        coupling = core.T @ core  # K = G1^T U_T^T U_T G1, U_T orthonormal; [(r,d),(q,e)]
        fitted = (output_factor @ core).reshape(-1, rank, taps)
        rhs = np.einsum("tsd,trd->sr", self.weighted.reshape(-1, channels, taps), fitted, optimize=True)
        coupling4 = coupling.reshape(rank, taps, rank, taps)
        if channels * rank <= direct_limit:
            blocks = self.sigma.reshape(channels, taps, channels, taps)
            hessian = np.einsum("sdue,rdqe->sruq", blocks, coupling4, optimize=True).reshape(channels * rank, -1)
            solution = scipy.linalg.solve((hessian + hessian.T) / 2, rhs.reshape(-1), assume_a="pos")
            return solution.reshape(channels, rank)
        by_tap = np.ascontiguousarray(coupling4.transpose(1, 3, 2, 0)).reshape(taps, taps * rank, rank)

        def apply(x: np.ndarray) -> np.ndarray:
            spread = (self.blocks.reshape(-1, channels) @ x).reshape(taps, channels, taps * rank)  # [d, s, (e,q)]
            return np.matmul(spread, by_tap).sum(axis=0)  # sum_(d,e,q) Sigma[(s,d),(u,e)] K[(r,d),(q,e)] X[u,q]

        tap_coupling = np.einsum("de,rdqe->rq", self.tap_covariance, coupling4, optimize=True)
        tap_coupling += 1e-12 * np.trace(tap_coupling) / rank * np.eye(rank)
        left = scipy.linalg.cho_factor(self.channel_covariance)
        right = scipy.linalg.cho_factor(tap_coupling)

        def precondition(residual: np.ndarray) -> np.ndarray:
            return scipy.linalg.cho_solve(right, scipy.linalg.cho_solve(left, residual).T).T

        solution, _ = conjugate_gradients(apply, rhs, input_factor, precondition, max_iter=cg_iter, tol=1e-10)
        return solution


def _dims(weight: np.ndarray, ranks: tuple[int, int]):
    if weight.ndim < 3:
        raise ValueError(f"Tucker-2 needs a conv weight (T, S, *kernel), got shape {weight.shape}")
    out_channels, in_channels, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    rank_out, rank_in = (int(r) for r in ranks)
    if not (1 <= rank_out <= out_channels and 1 <= rank_in <= in_channels):
        raise ValueError(
            f"Tucker-2 ranks {ranks} must lie in 1..{out_channels} x 1..{in_channels} "
            f"for a weight of shape {weight.shape}"
        )
    return out_channels, in_channels, kernel, rank_out, rank_in


def _top_left(matrix: np.ndarray, count: int) -> np.ndarray:
    """Top `count` left singular vectors (eigenvectors of the smaller Gram matrix)."""
    return _top_eigenvectors(matrix @ matrix.T, count)


def _initial_input_factor(tensor: np.ndarray, rank: int, init: str, seed: int) -> np.ndarray:
    if init == "hosvd":
        return _top_left(tensor.transpose(1, 0, 2).reshape(tensor.shape[1], -1), rank)
    if init == "random":
        return _orthonormal(np.random.default_rng(seed).standard_normal((tensor.shape[1], rank)))
    raise ValueError(f"unknown init {init!r}: use 'hooi', 'hosvd' or 'random'")


def _orthonormal(matrix: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(matrix)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)
