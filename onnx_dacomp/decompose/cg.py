"""Preconditioned conjugate gradients for symmetric positive definite systems on matrix-shaped unknowns.

The ALS solvers use it for the input-factor step of large layers, where the normal equations have
S*R unknowns and are only available as a matrix-free product. Every iterate lowers the quadratic
objective, so a warm-started, truncated solve never undoes the previous sweep.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def conjugate_gradients(
    apply: Callable[[np.ndarray], np.ndarray],
    rhs: np.ndarray,
    start: np.ndarray,
    precondition: Callable[[np.ndarray], np.ndarray] | None = None,
    max_iter: int = 50,
    tol: float = 1e-8,
) -> tuple[np.ndarray, int]:
    """Solve `apply(X) = rhs` from `start`; stop when `||residual|| <= tol * ||rhs||`. Returns (X, iterations)."""
    precondition = precondition or (lambda r: r)
    x = start.copy()
    residual = rhs - apply(x)
    target = tol * float(np.linalg.norm(rhs))
    z = precondition(residual)
    direction = z.copy()
    rz = float(np.vdot(residual, z))
    for iteration in range(max_iter):
        if float(np.linalg.norm(residual)) <= target or rz <= 0.0:
            return x, iteration
        applied = apply(direction)
        curvature = float(np.vdot(direction, applied))
        if curvature <= 0.0:
            return x, iteration
        step = rz / curvature
        x += step * direction
        residual -= step * applied
        z = precondition(residual)
        rz, rz_old = float(np.vdot(residual, z)), rz
        direction = z + (rz / rz_old) * direction
    return x, max_iter
