"""Next-layer compensation (docs/MATH.md): a kept layer's weight and bias refit in closed form so that it maps
the input it gets in the compressed model (x~) to what it gave on the original input (x).

Per group, with `Cc = E[(x - mu)(x~ - mu~)^T]` and `Sc = E[(x~ - mu~)(x~ - mu~)^T]`, the ridge toward the
original weight `W`:

    W' = W + D,  D = argmin E||W (x - mu) - (W + D)(x~ - mu~)||^2 + lambda ||D||^2 = W (Cc - Sc)(Sc + lambda I)^-1
    b' = b + W mu - W' mu~

so an unperturbed input (x~ = x) keeps the layer as it is at any lambda, and lambda -> 0 is the affine least
squares fit of the layer's original output from x~. `refit_loss` measures a refit on other samples' moments,
which is how lambda is chosen.
"""

from __future__ import annotations

import numpy as np

from .covariance import solve_psd


def ridge_refit(
    weight: np.ndarray,
    bias: np.ndarray | None,
    reference_mean: np.ndarray,
    cross: np.ndarray,
    second: np.ndarray,
    mean: np.ndarray,
    ridge: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The refit `(W', b')` of one group: `weight` (T, n) (any trailing shape, flattened to n), `bias` (T,) or
    None for none, the original input's mean `reference_mean` (n,), `cross = E[x x~^T]`, `second = E[x~ x~^T]`
    and `mean = E[x~]`; `ridge` is lambda relative to the mean eigenvalue of Sc. Groups stacked on a leading
    axis (`weight` (G, T, ...), `bias` (G, T), `reference_mean` (G, n), ...) are refit each on its own."""
    stacked = np.ndim(reference_mean) == 2
    matrix, base, *moments = _stack(stacked, weight, bias, reference_mean, cross, second, mean)
    reference_mean, cross, second, mean = moments
    centered_cross = cross - reference_mean[:, :, None] * mean[:, None, :]
    centered = second - mean[:, :, None] * mean[:, None, :]
    centered = (centered + centered.transpose(0, 2, 1)) / 2
    size = centered.shape[-1]
    shift = ridge * np.maximum(np.trace(centered, axis1=1, axis2=2) / size, np.finfo(float).tiny)
    system = centered + shift[:, None, None] * np.eye(size)
    rhs = (centered_cross - centered).transpose(0, 2, 1) @ matrix.transpose(0, 2, 1)  # (G, n, T)
    refitted = matrix + _solve_stack(system, rhs).transpose(0, 2, 1)
    refit_bias = base + np.einsum("gtn,gn->gt", matrix, reference_mean) - np.einsum("gtn,gn->gt", refitted, mean)
    if not stacked:
        return refitted[0].reshape(weight.shape), refit_bias[0]
    return refitted.reshape(weight.shape), refit_bias


def refit_loss(
    weight: np.ndarray,
    bias: np.ndarray | None,
    refit: tuple[np.ndarray, np.ndarray],
    reference_mean: np.ndarray,
    cross: np.ndarray,
    second: np.ndarray,
    mean: np.ndarray,
) -> float:
    """`E||W x + b - (W' x~ + b')||^2 - E||W x + b||^2` under the moments given (as for `ridge_refit`, one
    group or stacked groups, summed): the refit's error up to a constant that does not depend on it, so refits
    compare by it."""
    stacked = np.ndim(reference_mean) == 2
    matrix, base, *moments = _stack(stacked, weight, bias, reference_mean, cross, second, mean)
    reference_mean, cross, second, mean = moments
    refitted = np.asarray(refit[0], np.float64).reshape(matrix.shape)
    refit_bias = np.asarray(refit[1], np.float64).reshape(base.shape)
    refit_mean = np.einsum("gtn,gn->gt", refitted, mean)
    shared = (
        np.sum((matrix @ cross) * refitted)
        + np.sum(base * refit_mean)
        + np.sum(refit_bias * np.einsum("gtn,gn->gt", matrix, reference_mean))
    )
    predicted = np.sum((refitted @ second) * refitted) + 2 * np.sum(refit_bias * refit_mean) + np.sum(refit_bias**2)
    return float(predicted - 2 * (shared + np.sum(base * refit_bias)))


def _stack(stacked: bool, weight, bias, *moments) -> tuple[np.ndarray, ...]:
    """(weight (G, T, n), bias (G, T), moments...) in float64 with the group axis (one group: a stack of one)."""
    arrays = [None if array is None else np.asarray(array, np.float64) for array in (weight, bias, *moments)]
    if not stacked:
        arrays = [None if array is None else array[None] for array in arrays]
    weight, bias, *moments = arrays
    matrix = weight.reshape(len(weight), -1, moments[0].shape[-1])
    return (matrix, np.zeros(matrix.shape[:2]) if bias is None else bias.reshape(matrix.shape[:2]), *moments)


def _solve_stack(systems: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """`systems[g]^-1 rhs[g]` for symmetric positive (semi)definite systems: one Cholesky solve for a single
    system, a batched solve for many (each group alone where one is singular)."""
    if len(systems) == 1:
        return solve_psd(systems[0], rhs[0])[None]
    try:
        return np.linalg.solve(systems, rhs)
    except np.linalg.LinAlgError:
        return np.stack([solve_psd(system, part) for system, part in zip(systems, rhs)])
