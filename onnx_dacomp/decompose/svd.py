"""Matrix case (docs/MATH.md): the closed-form distribution-aware SVD and plain truncated SVD.

Works on any weight `(T, ...)`: a dense layer, a 1x1 conv, or a kxk conv (the "output-channel" variant:
kxk conv S->R followed by 1x1 R->T).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .covariance import sigma_error
from .factors import SVDFactors
from .result import Decomposition


def da_svd(weight: np.ndarray, sigma: np.ndarray, rank: int) -> Decomposition:
    """Optimal rank-`rank` fit in the Sigma-norm: `W1~ = P P^T W1`, P = top eigenvectors of `W1 Sigma W1^T`."""
    matrix = _as_matrix(weight, rank)
    gram = matrix @ np.asarray(sigma, np.float64) @ matrix.T
    return _project(weight, matrix, _top_eigenvectors((gram + gram.T) / 2, rank), sigma)


def truncated_svd(weight: np.ndarray, rank: int) -> Decomposition:
    """The data-free baseline: the best rank-`rank` fit in the Frobenius norm."""
    matrix = _as_matrix(weight, rank)
    left, _, _ = scipy.linalg.svd(matrix, full_matrices=False)
    return _project(weight, matrix, _sign_fixed(left[:, :rank]), None)


def svd_rank_errors(weight: np.ndarray, sigma: np.ndarray | None) -> np.ndarray:
    """Relative Sigma-errors of `da_svd` (or `truncated_svd` when `sigma` is None) for every rank
    1..min(T, S*D): the tail sums of the eigenvalues of `W1 Sigma W1^T`, exact and all at once."""
    matrix = _as_matrix(weight, 1)
    gram = matrix @ matrix.T if sigma is None else matrix @ np.asarray(sigma, np.float64) @ matrix.T
    values = np.clip(scipy.linalg.eigvalsh((gram + gram.T) / 2)[::-1], 0.0, None)[: min(matrix.shape)]
    total = float(np.trace(gram))
    if total <= 0:
        return np.zeros(len(values))
    return np.clip((total - np.cumsum(values)) / total, 0.0, 1.0)


def svd_held_out_errors(weight: np.ndarray, sigma: np.ndarray | None, held_out: np.ndarray) -> np.ndarray:
    """Relative errors in the second moment `held_out` of the fits in `sigma` (`da_svd`, or `truncated_svd`
    when None) at every rank 1..min(T, S*D). The rank-r fit keeps the top r of the eigenvectors P of
    `W1 Sigma W1^T`, so its error is the tail sum of the diagonal of `P^T W1 Sigma_h W1^T P`."""
    matrix = _as_matrix(weight, 1)
    gram = matrix @ matrix.T if sigma is None else matrix @ np.asarray(sigma, np.float64) @ matrix.T
    _, vectors = scipy.linalg.eigh((gram + gram.T) / 2)
    vectors = vectors[:, ::-1][:, : min(matrix.shape)]
    projected = vectors.T @ matrix
    captured = np.einsum("ij,ij->i", projected @ np.asarray(held_out, np.float64), projected)
    total = float(np.einsum("ij,ij->", matrix @ np.asarray(held_out, np.float64), matrix))
    if total <= 0:
        return np.zeros(len(captured))
    return np.clip((total - np.cumsum(captured)) / total, 0.0, 1.0)


def _project(weight, matrix, basis, sigma) -> Decomposition:
    first = (basis.T @ matrix).reshape(basis.shape[1], *weight.shape[1:])
    factors = SVDFactors(first=first, last=basis)
    error = sigma_error(matrix, basis @ (basis.T @ matrix), sigma)
    return Decomposition(factors, error, (error,), iterations=1, converged=True)


def _as_matrix(weight: np.ndarray, rank: int) -> np.ndarray:
    matrix = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank {rank} is outside 1..{min(matrix.shape)} for a weight of shape {weight.shape}")
    return matrix


def _top_eigenvectors(symmetric: np.ndarray, count: int) -> np.ndarray:
    size = len(symmetric)
    _, vectors = scipy.linalg.eigh(symmetric, subset_by_index=[size - count, size - 1])
    return _sign_fixed(vectors[:, ::-1])


def _sign_fixed(vectors: np.ndarray) -> np.ndarray:
    """Eigen/singular vectors with the largest-magnitude entry positive: identical output across runs."""
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    return vectors * np.where(signs == 0, 1.0, signs)
