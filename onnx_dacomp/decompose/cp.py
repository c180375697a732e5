"""CP of a conv weight (docs/MATH.md): distribution-aware ALS (DA-CPD) and the Frobenius CP-ALS baseline.

Model: `W~[t, s, k1, k2] = sum_r U_T[t,r] U_S[s,r] U_1[k1,r] U_2[k2,r]`, i.e. `W1~ = U_T M^T` with the
Khatri-Rao product `M = U_S (.) U_1 (.) U_2`. One spatial factor per kernel axis (1-D convs have one).

Both solvers sweep U_S, the spatial factors, then U_T, normalize the columns of U_S and the spatial factors
(the scale lives in U_T), and add a small relative ridge to every normal equation against CP's degenerate,
diverging components. With `Sigma = I` and the same initialization the two produce the same iterates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.linalg

from .cg import conjugate_gradients
from .covariance import DEFAULT_FLOOR, regularize, sandwich, solve_psd, tap_major
from .factors import CPFactors
from .result import Decomposition, run_sweeps
from .svd import _top_eigenvectors

Callback = Callable[[int, float], None]
# the input-factor step solves its S*R normal equations directly up to this size, else by warm-started
# preconditioned CG: on ResNet-56 layers CG reached the same error (within 1e-5 relative) 10-26x faster
DIRECT_LIMIT = 256
DEFAULT_RIDGE = 1e-9
_AXES = "hwxyz"


def cp_als(
    weight: np.ndarray,
    rank: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-8,
    init: str = "svd",
    seed: int = 0,
    ridge: float = DEFAULT_RIDGE,
    callback: Callback | None = None,
) -> Decomposition:
    """Frobenius CP by alternating least squares (as tensorly's `parafac` computes it)."""
    tensor = np.asarray(weight, np.float64)
    _check(tensor, rank)
    total = float(np.sum(tensor**2))
    out_channels, in_channels, kernel = tensor.shape[0], tensor.shape[1], tensor.shape[2:]
    matrix = tensor.reshape(out_channels, in_channels, -1)  # W[t, s, d]
    input_factor, *spatial = _initial_factors(tensor, rank, init, seed)
    output_factor = _ridge_solve(_gram([input_factor, *spatial]), _mttkrp_output(matrix, input_factor, spatial).T).T
    history, converged, sweep = [], False, 0
    for sweep in range(1, max_iter + 1):
        # U_T is fixed until the end of the sweep: its contraction with W serves every other mode
        by_output = (matrix.reshape(out_channels, -1).T @ output_factor).reshape(in_channels, -1, rank)  # (S,D,R)
        taps = _khatri_rao(spatial)
        updated = np.einsum("sdr,dr->sr", by_output, taps)
        updated = _ridge_solve(_gram([output_factor, *spatial]), updated.T).T
        input_factor, norms = _normalized_columns(updated)
        output_factor, by_output = output_factor * norms, by_output * norms
        for axis in range(len(spatial)):
            reduced = np.einsum("sdr,sr->dr", by_output, input_factor).reshape(*kernel, rank)
            updated = _contract_others(reduced, spatial, axis)
            others = [output_factor, input_factor, *(f for a, f in enumerate(spatial) if a != axis)]
            updated = _ridge_solve(_gram(others), updated.T).T
            spatial[axis], norms = _normalized_columns(updated)
            output_factor, by_output = output_factor * norms, by_output * norms
        mttkrp = _mttkrp_output(matrix, input_factor, spatial)
        output_factor = _ridge_solve(_gram([input_factor, *spatial]), mttkrp.T).T
        gram = _gram([output_factor, input_factor, *spatial])
        fit = total - 2 * float(np.sum(output_factor * mttkrp)) + float(gram.sum())
        history.append(max(0.0, fit / total) if total > 0 else 0.0)
        if callback:
            callback(sweep, history[-1])
        if history[-1] <= 1e-15 or (len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]):
            converged = True
            break
    factors = CPFactors(input_factor, tuple(spatial), output_factor)
    return Decomposition(factors, history[-1] if history else 1.0, tuple(history), sweep, converged)


def _mttkrp_output(matrix: np.ndarray, input_factor: np.ndarray, spatial) -> np.ndarray:
    """`W_(T) (U_S (.) U_1 (.) ...)` by successive contractions: (T, S*D) @ KR without forming the
    Khatri-Rao product (memory T*D*R instead of S*D*R, one GEMM of T*S*D*R flops)."""
    out_channels, in_channels, taps = matrix.shape
    by_input = matrix.transpose(0, 2, 1).reshape(-1, in_channels) @ input_factor  # (T*D, R)
    return np.einsum("tdr,dr->tr", by_input.reshape(out_channels, taps, -1), _khatri_rao(spatial))


def _contract_others(reduced: np.ndarray, spatial, axis: int) -> np.ndarray:
    """`reduced[k_1, ..., k_n, r]` contracted with every spatial factor but the one of `axis`: (k_axis, R)."""
    letters = _AXES[: len(spatial)]
    others = [a for a in range(len(spatial)) if a != axis]
    spec = ",".join([f"{letters}r", *(f"{letters[a]}r" for a in others)]) + f"->{letters[axis]}r"
    return np.einsum(spec, reduced, *(spatial[a] for a in others))


def _gram(factors) -> np.ndarray:
    """Hadamard product of the factors' Gram matrices: the normal matrix of the remaining mode."""
    return np.prod([f.T @ f for f in factors], axis=0)


def da_cp(
    weight: np.ndarray,
    sigma: np.ndarray,
    rank: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: str | CPFactors = "frobenius",
    seed: int = 0,
    floor: float = DEFAULT_FLOOR,
    ridge: float = DEFAULT_RIDGE,
    direct_limit: int = DIRECT_LIMIT,
    cg_iter: int = 15,
    callback: Callback | None = None,
    prepared: CPProblem | None = None,
) -> Decomposition:
    """Distribution-aware CP: minimize `||(W1 - U_T M^T) L||^2` by alternating block updates.

    `init`: "frobenius" (CP-ALS first, so the result is never worse than it in the Sigma-norm), "svd",
    "random" (seeded), or a `CPFactors` to start from (for example a CP of a DA-Tucker-2 core expanded).
    U_S has S*R unknowns: direct solve while `S*R <= direct_limit`, else warm-started preconditioned CG
    (15 iterations stay within 0.5 % of exact solves on planted layers with badly conditioned Sigma, where
    6 lost up to 5 %; tests/test_solver_paths.py). `prepared`:
    `prepare_da_cp(weight, sigma)` computed once for several ranks of the same layer.
    """
    weight = np.asarray(weight, np.float64)
    _check(weight, rank)
    out_channels, _in_channels, _kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    if isinstance(init, CPFactors):
        start = [init.input_factor, *init.spatial_factors]
    elif init == "frobenius":
        # a short Frobenius run: the DA sweeps do the real work from there
        frob = cp_als(weight, rank, seed=seed, ridge=ridge, max_iter=20).factors
        start = [frob.input_factor, *frob.spatial_factors]
    else:
        start = _initial_factors(weight, rank, init, seed)
    problem = prepared if prepared is not None else prepare_da_cp(weight, sigma, floor=floor, ridge=ridge)
    input_factor, spatial = np.array(start[0], np.float64), [np.array(f, np.float64) for f in start[1:]]
    output_factor = np.zeros((out_channels, rank))
    input_factor, output_factor = _normalized(input_factor, output_factor)
    for axis in range(len(spatial)):
        spatial[axis], output_factor = _normalized(spatial[axis], output_factor)

    problem.set_input_factor(input_factor)
    output_factor, error = problem.output_step(spatial)

    def sweep() -> float:
        nonlocal input_factor, output_factor
        input_factor = problem.input_step(input_factor, spatial, output_factor, direct_limit, cg_iter)
        input_factor, output_factor = _normalized(input_factor, output_factor)
        problem.set_input_factor(input_factor)
        for axis in range(len(spatial)):
            spatial[axis] = problem.spatial_step(axis, spatial, output_factor)
            spatial[axis], output_factor = _normalized(spatial[axis], output_factor)
        output_factor, new_error = problem.output_step(spatial)
        return new_error

    history, sweeps, converged = run_sweeps(error, sweep, max_iter=max_iter, tol=tol, callback=callback)
    factors = CPFactors(input_factor, tuple(spatial), output_factor)
    return Decomposition(factors, history[-1], tuple(history), sweeps, converged)


def prepare_da_cp(
    weight: np.ndarray, sigma: np.ndarray, *, floor: float = DEFAULT_FLOOR, ridge: float = DEFAULT_RIDGE
) -> CPProblem:
    """The rank-independent data of DA-CPD fits of one layer (the regularized Sigma and its products)."""
    weight = np.asarray(weight, np.float64)
    out_channels, in_channels, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    return CPProblem(weight.reshape(out_channels, -1), regularize(sigma, floor), in_channels, kernel, ridge)


class CPProblem:
    """Fixed data of DA-CPD fits of one layer; caches `C = (U_S kron I)^T Sigma (U_S kron I)` for the
    current U_S (so one object serves one fit at a time)."""

    def __init__(self, matrix, sigma, in_channels, kernel, ridge):
        self.matrix, self.sigma, self.channels, self.kernel, self.ridge = matrix, sigma, in_channels, kernel, ridge
        self.taps = math.prod(kernel)
        self.weighted = (matrix @ sigma).reshape(len(matrix), in_channels, self.taps)  # W1 Sigma
        self.total = float(np.einsum("tsd,tsd->", self.weighted, matrix.reshape(self.weighted.shape), optimize=True))
        self.blocks = tap_major(sigma, in_channels, self.taps)
        blocks = sigma.reshape(in_channels, self.taps, in_channels, self.taps)
        self.channel_covariance = scipy.linalg.cho_factor(np.einsum("sdud->su", blocks, optimize=True))
        self.tap_covariance = np.einsum("sdse->de", blocks, optimize=True)

    def set_input_factor(self, input_factor):
        self.gram = sandwich(self.blocks, input_factor)  # C[d, r, e, q] = (P^T Sigma P)[(r,d),(q,e)]
        self.cross = np.einsum("tsd,sr->trd", self.weighted, input_factor, optimize=True)  # W1 Sigma (U_S kron I)

    def output_step(self, spatial):
        """Optimal U_T for the other factors, and the relative error it reaches."""
        taps_factor = _khatri_rao(spatial)  # V[d, r]
        cross = np.einsum("trd,dr->tr", self.cross, taps_factor, optimize=True)  # W1 Sigma M
        gram = np.einsum("dreq,dr,eq->rq", self.gram, taps_factor, taps_factor, optimize=True)  # M^T Sigma M
        output_factor = _ridge_solve(gram, cross.T, self.ridge).T
        fit = (
            self.total
            - 2 * float(np.sum(output_factor * cross))
            + float(np.sum((output_factor.T @ output_factor) * gram))
        )
        return output_factor, (max(0.0, fit / self.total) if self.total > 0 else 0.0)

    def spatial_step(self, axis, spatial, output_factor):
        """Optimal factor of one kernel axis for the others: a direct solve of size k_axis * R."""
        rank = output_factor.shape[1]
        coupling = output_factor.T @ output_factor
        letters = _AXES[: len(self.kernel)]
        upper = letters.upper()
        others = [a for a in range(len(self.kernel)) if a != axis]
        gram = self.gram.reshape(*self.kernel, rank, *self.kernel, rank)
        spec_in = ",".join([f"{letters}r{upper}q", *(f"{letters[a]}r,{upper[a]}q" for a in others)])
        operands = [gram] + [f for a in others for f in (spatial[a], spatial[a])]
        reduced = np.einsum(f"{spec_in}->{letters[axis]}r{upper[axis]}q", *operands, optimize=True)
        size = self.kernel[axis] * rank
        hessian = (reduced * coupling[None, :, None, :]).reshape(size, size)
        fitted = np.einsum("tr,trd->rd", output_factor, self.cross, optimize=True).reshape(rank, *self.kernel)
        spec_rhs = ",".join([f"r{letters}", *(f"{letters[a]}r" for a in others)])
        rhs = np.einsum(f"{spec_rhs}->{letters[axis]}r", fitted, *(spatial[a] for a in others), optimize=True)
        return _ridge_solve(hessian, rhs.reshape(-1, 1), self.ridge).reshape(self.kernel[axis], rank)

    def input_step(self, input_factor, spatial, output_factor, direct_limit, cg_iter):
        """Optimal U_S for the other factors: `H vec(U_S) = b`, H = K[r,q] sum_de V[d,r] Sigma V[e,q]."""
        channels, taps, rank = self.channels, self.taps, input_factor.shape[1]
        coupling = output_factor.T @ output_factor
        taps_factor = _khatri_rao(spatial)
        rhs = np.einsum("tr,tsd,dr->sr", output_factor, self.weighted, taps_factor, optimize=True)
        if channels * rank <= direct_limit:
            blocks = self.sigma.reshape(channels, taps, channels, taps)
            hessian = np.einsum("sdue,dr,eq->sruq", blocks, taps_factor, taps_factor, optimize=True)
            hessian = (hessian * coupling[None, :, None, :]).reshape(channels * rank, -1)
            return _ridge_solve(hessian, rhs.reshape(-1, 1), self.ridge).reshape(channels, rank)
        diagonal = np.einsum(
            "sdsd,dr,dr->sr",
            self.sigma.reshape(channels, taps, channels, taps),
            taps_factor,
            taps_factor,
            optimize=True,
        ) * np.diag(coupling)
        shift = self.ridge * float(diagonal.mean())

        def apply(x):
            spread = (x[:, None, :] * taps_factor[None, :, :]).reshape(channels * taps, rank)
            z = (self.sigma @ spread) @ coupling
            return np.einsum("sdr,dr->sr", z.reshape(channels, taps, rank), taps_factor, optimize=True) + shift * x

        tap_coupling = coupling * (taps_factor.T @ self.tap_covariance @ taps_factor)
        tap_coupling += 1e-12 * np.trace(tap_coupling) / rank * np.eye(rank)
        right = scipy.linalg.cho_factor(tap_coupling)

        def precondition(residual):
            return scipy.linalg.cho_solve(right, scipy.linalg.cho_solve(self.channel_covariance, residual).T).T

        solution, _ = conjugate_gradients(apply, rhs, input_factor, precondition, max_iter=cg_iter, tol=1e-10)
        return solution


def _khatri_rao(factors) -> np.ndarray:
    """Rows indexed by the kernel taps in C order, one column per component."""
    result = factors[0]
    for factor in factors[1:]:
        result = (result[:, None, :] * factor[None, :, :]).reshape(-1, factor.shape[1])
    return result


def _ridge_solve(gram: np.ndarray, rhs: np.ndarray, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """`(gram + ridge * mean(diag) I)^-1 rhs` for a symmetric PSD gram."""
    gram = (gram + gram.T) / 2
    diagonal = np.diag(gram)
    shift = ridge * float(np.mean(diagonal)) if np.any(diagonal > 0) else 1.0
    gram[np.diag_indices_from(gram)] += shift
    return solve_psd(gram, rhs)


def _normalized(factor: np.ndarray, output_factor: np.ndarray):
    """Unit-norm columns; the norms move into the output factor so the product is unchanged."""
    factor, norms = _normalized_columns(factor)
    return factor, output_factor * norms


def _normalized_columns(factor: np.ndarray):
    norms = np.linalg.norm(factor, axis=0)
    norms = np.where(norms > 0, norms, 1.0)
    return factor / norms, norms


def _check(weight: np.ndarray, rank: int) -> None:
    if weight.ndim < 3:
        raise ValueError(f"CP needs a conv weight (T, S, *kernel), got shape {weight.shape}")
    if rank < 1:
        raise ValueError(f"CP rank must be at least 1, got {rank}")


def _initial_factors(tensor: np.ndarray, rank: int, init: str, seed: int) -> list[np.ndarray]:
    """Factors for every mode but the output one: leading singular vectors padded with seeded noise."""
    rng = np.random.default_rng(seed)
    factors = []
    for mode in range(1, tensor.ndim):
        size = tensor.shape[mode]
        if init == "random":
            factors.append(rng.standard_normal((size, rank)))
            continue
        if init != "svd":
            raise ValueError(f"unknown init {init!r}: use 'frobenius', 'svd' or 'random'")
        unfolded = np.moveaxis(tensor, mode, 0).reshape(size, -1)
        known = min(rank, size)
        leading = _top_eigenvectors(unfolded @ unfolded.T, known)
        factors.append(np.hstack([leading, rng.standard_normal((size, rank - known))]) if rank > known else leading)
    return factors
