"""Covariance helpers: whitening with an eigenvalue floor, regularization, and the Sigma-norm error.

Late layers have more patch dimensions than independent samples, so `Sigma` is often rank-deficient and
badly scaled; everything here stays finite on such input (no bare Cholesky).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

DEFAULT_FLOOR = 1e-6


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
    """`sigma + floor * lambda_max * I`: positive definite, so the ALS normal equations always solve.

    A shift rather than an eigenvalue floor because it needs only the largest eigenvalue (a few Lanczos
    steps) instead of a full eigendecomposition: the solvers call it on 4608-square covariances.
    """
    sigma = _symmetric(sigma)
    top = largest_eigenvalue(sigma)
    if top <= 0.0:
        return np.eye(len(sigma))
    return sigma + floor * top * np.eye(len(sigma))


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


def _symmetric(sigma: np.ndarray) -> np.ndarray:
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"a covariance must be square, got shape {sigma.shape}")
    if not np.isfinite(sigma).all():
        raise ValueError("the covariance contains NaN or Inf")
    return (sigma + sigma.T) / 2
