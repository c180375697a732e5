"""Covariance helpers: whitening with an eigenvalue floor, regularization, and the Sigma-norm error.

Late layers have more patch dimensions than independent samples, so `Sigma` is often rank-deficient and
badly scaled; everything here stays finite on such input (no bare Cholesky).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

DEFAULT_FLOOR = 1e-8  # about the float32 rounding level of the accumulated statistics


@dataclass(frozen=True, eq=False)
class Whitening:
    """`Sigma ~ L L^T` with `L = V diag(sqrt(lambda))`, eigenvalues floored at `floor * max(lambda)`."""

    eigenvalues: np.ndarray  # floored, ascending
    eigenvectors: np.ndarray

    @property
    def factor(self) -> np.ndarray:
        return self.eigenvectors * np.sqrt(self.eigenvalues)

    @property
    def inverse_factor(self) -> np.ndarray:
        """`L^-1` (rows: whitened coordinates)."""
        return (self.eigenvectors / np.sqrt(self.eigenvalues)).T

    @property
    def covariance(self) -> np.ndarray:
        return (self.eigenvectors * self.eigenvalues) @ self.eigenvectors.T


def whiten(sigma: np.ndarray, floor: float = DEFAULT_FLOOR) -> Whitening:
    """Eigendecomposition of the symmetric PSD `sigma` with a relative eigenvalue floor."""
    sigma = _symmetric(sigma)
    eigenvalues, eigenvectors = scipy.linalg.eigh(sigma)
    top = max(float(eigenvalues[-1]), 0.0)
    if top <= 0.0 or not np.isfinite(top):
        # a layer whose input is always zero: every direction is as good as any other
        return Whitening(np.ones_like(eigenvalues), eigenvectors)
    return Whitening(np.maximum(eigenvalues, floor * top), eigenvectors)


def regularize(sigma: np.ndarray, floor: float = DEFAULT_FLOOR) -> np.ndarray:
    """`sigma + shift * I` with `shift >= floor * lambda_max`: positive definite, so every ALS normal
    equation solves.

    A shift rather than an eigenvalue floor because it needs only the largest eigenvalue (a few Lanczos
    steps) instead of a full eigendecomposition of a 4608-square covariance. Statistics accumulated in
    float32 can have slightly negative eigenvalues; the shift grows until a Cholesky factorization passes.
    """
    sigma = _symmetric(sigma)
    top = largest_eigenvalue(sigma)
    if top <= 0.0:
        return np.eye(len(sigma))
    shift = max(floor, 1e-15) * top
    diagonal = np.diag_indices_from(sigma)
    base = sigma[diagonal].copy()
    while True:
        sigma[diagonal] = base + shift  # _symmetric returned a fresh array
        try:
            scipy.linalg.cho_factor(sigma, check_finite=False)
            return sigma
        except np.linalg.LinAlgError:
            shift *= 10


def largest_eigenvalue(sigma: np.ndarray) -> float:
    if len(sigma) <= 64:
        return float(np.linalg.eigvalsh(sigma)[-1])
    start = np.ones(len(sigma)) / np.sqrt(len(sigma))  # fixed start vector: deterministic
    return float(scipy.sparse.linalg.eigsh(sigma, k=1, which="LA", v0=start, return_eigenvectors=False)[0])


def sigma_error(weight: np.ndarray, approximation: np.ndarray, sigma: np.ndarray | None) -> float:
    """Relative output error `||(W1 - W1~) L||^2 / ||W1 L||^2` (Frobenius when `sigma` is None)."""
    weight = weight.reshape(weight.shape[0], -1)
    difference = weight - approximation.reshape(weight.shape)
    if sigma is None:
        return float(np.sum(difference**2) / np.sum(weight**2))
    return float(np.einsum("ij,ij->", difference @ sigma, difference) / np.einsum("ij,ij->", weight @ sigma, weight))


def solve_psd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """`matrix^-1 rhs` for a symmetric positive (semi)definite matrix: Cholesky (scipy's `solve` with
    assume_a="pos" also estimates the condition number, 2-3x slower), least squares if it is singular."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(matrix, check_finite=False), rhs, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return scipy.linalg.lstsq(matrix, rhs)[0]


def output_energy(weight: np.ndarray, sigma: np.ndarray | None) -> float:
    """`||W1 L||^2 = tr(W1 Sigma W1^T)`: the denominator of the relative error (Frobenius when None)."""
    matrix = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    if sigma is None:
        return float(np.sum(matrix**2))
    return float(np.einsum("ij,ij->", matrix @ np.asarray(sigma, np.float64), matrix))


def tap_major(sigma: np.ndarray, channels: int, taps: int) -> np.ndarray:
    """`Sigma[(s,d),(u,e)]` rearranged as `[d, s, e, u]` (contiguous), so that products with a channel
    factor on `u` are one large GEMM that leaves `(e, r)` adjacent."""
    return np.ascontiguousarray(sigma.reshape(channels, taps, channels, taps).transpose(1, 0, 3, 2))


def sandwich(blocks: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """`(U kron I)^T Sigma (U kron I)` as `[d, r, e, q]` from `tap_major` blocks: two large GEMMs.

    (A batched product over the many small per-tap slices would run far below the BLAS rate.)
    """
    taps, channels = blocks.shape[:2]
    rank = factor.shape[1]
    right = (blocks.reshape(-1, channels) @ factor).reshape(taps, channels, taps * rank)  # [d, s, (e,q)]
    return np.matmul(factor.T, right).reshape(taps, rank, taps, rank)


def _symmetric(sigma: np.ndarray) -> np.ndarray:
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"a covariance must be square, got shape {sigma.shape}")
    if not np.isfinite(sigma).all():
        raise ValueError("the covariance contains NaN or Inf")
    return symmetrized(sigma)


def symmetrized(matrix: np.ndarray) -> np.ndarray:
    """`(A + A^T) / 2` as a new array, with one temporary fewer than the expression (a 4608-square
    covariance is 170 MB)."""
    result = matrix + matrix.T
    result *= 0.5
    return result


def oas_shrinkage(sigma: np.ndarray, count: int) -> float:
    """The Oracle Approximating Shrinkage weight (Chen, Wiesel, Eldar and Hero, 2010) of a `count`-sample
    second-moment matrix towards `tr(Sigma)/p I`: near 0 with many samples per dimension, up to 1 with few."""
    p = len(sigma)
    if count <= 0 or p < 2:
        return 1.0 if count <= 0 else 0.0
    trace, trace_square = float(np.trace(sigma)), float(np.einsum("ij,ij->", sigma, sigma))
    denominator = (count + 1 - 2 / p) * (trace_square - trace**2 / p)
    if denominator <= 0:
        return 1.0
    return float(min(1.0, ((1 - 2 / p) * trace_square + trace**2) / denominator))


def shrunk_second_moment(sigma: np.ndarray, mean: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """The second moment `E[x x^T]` with its covariance part shrunk by the OAS weight, and the weight: the mean
    is estimated well from few samples, the covariance around it is not. (Shrinking the uncentered moment
    instead gives a far smaller weight, since its trace is dominated by the mean: measured on EfficientNet-Lite0's
    classifier from 500 images, weight 0.05 against 0.47, and the rank-448 DA-SVD's error on 500 other images
    0.295 against 0.229; the raw moment 0.314, the best fixed weight 0.219.)"""
    weight = oas_shrinkage(np.asarray(sigma, np.float64) - np.outer(mean, mean), count)
    return shrunk_about(sigma, mean, weight), weight


def shrunk_about(sigma: np.ndarray, mean: np.ndarray, weight: float) -> np.ndarray:
    """The second moment `sigma` with its covariance around `mean` shrunk by `weight` (the mean kept)."""
    outer = np.outer(mean, mean)
    return shrink(np.asarray(sigma, np.float64) - outer, weight) + outer


def shrink(sigma: np.ndarray, weight: float) -> np.ndarray:
    """`(1 - weight) Sigma + weight tr(Sigma)/p I`: the estimate between the samples' and a sphere's."""
    if weight <= 0:
        return sigma
    shrunk = (1 - weight) * np.asarray(sigma, np.float64)
    shrunk[np.diag_indices_from(shrunk)] += weight * float(np.trace(sigma)) / len(sigma)
    return shrunk
