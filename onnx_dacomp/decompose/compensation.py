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
    and `mean = E[x~]`; `ridge` is lambda relative to the mean eigenvalue of Sc."""
    matrix = np.asarray(weight, np.float64).reshape(len(weight), -1)
    centered_cross = cross - np.outer(reference_mean, mean)
    centered = second - np.outer(mean, mean)
    centered = (centered + centered.T) / 2
    shift = ridge * max(float(np.trace(centered)) / len(centered), np.finfo(float).tiny)
    step = solve_psd(centered + shift * np.eye(len(centered)), (centered_cross - centered).T @ matrix.T).T
    refitted = matrix + step
    base = np.zeros(len(matrix)) if bias is None else np.asarray(bias, np.float64)
    return refitted.reshape(weight.shape), base + matrix @ reference_mean - refitted @ mean


def refit_loss(
    weight: np.ndarray,
    bias: np.ndarray | None,
    refit: tuple[np.ndarray, np.ndarray],
    reference_mean: np.ndarray,
    cross: np.ndarray,
    second: np.ndarray,
    mean: np.ndarray,
) -> float:
    """`E||W x + b - (W' x~ + b')||^2 - E||W x + b||^2` of one group under the moments given (as for
    `ridge_refit`): the refit's error up to a constant that does not depend on it, so refits compare by it."""
    matrix = np.asarray(weight, np.float64).reshape(len(weight), -1)
    refitted, refit_bias = refit[0].reshape(len(matrix), -1), refit[1]
    base = np.zeros(len(matrix)) if bias is None else np.asarray(bias, np.float64)
    shared = (
        np.einsum("ij,ij->", matrix @ cross, refitted)
        + base @ (refitted @ mean)
        + refit_bias @ (matrix @ reference_mean)
    )
    predicted = (
        np.einsum("ij,ij->", refitted @ second, refitted) + 2 * refit_bias @ (refitted @ mean) + refit_bias @ refit_bias
    )
    return float(predicted - 2 * (shared + base @ refit_bias))
