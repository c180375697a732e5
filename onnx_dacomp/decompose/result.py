"""The one result type every solver returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .factors import Factors


@dataclass(frozen=True, eq=False)
class Decomposition:
    """Factors of one weight and how well they fit it.

    `rel_error` is `||(W1 - W1~) L||^2 / ||W1 L||^2` in the covariance the solver was given (the plain
    Frobenius error for the data-free solvers); `history` holds it after every sweep (one entry for the
    closed-form solvers).
    """

    factors: Factors
    rel_error: float
    history: tuple[float, ...]
    iterations: int
    converged: bool


def run_sweeps(
    error: float,
    sweep: Callable[[], float],
    *,
    max_iter: int,
    tol: float,
    callback: Callable[[int, float], None] | None,
) -> tuple[list[float], int, bool]:
    """The outer ALS loop: call `sweep()` (one pass over all factors, returning the new relative error)
    until the error is ~0, a sweep lowers it by at most `tol` times itself, or `max_iter` sweeps ran.

    `error` is the error of the initialization. Returns (history, sweeps run, converged).
    """
    history = [error]
    if callback:
        callback(0, error)
    for iteration in range(1, max_iter + 1):
        if error <= 1e-15:
            return history, iteration - 1, True
        new_error = sweep()
        history.append(new_error)
        if callback:
            callback(iteration, new_error)
        decrease, error = error - new_error, new_error
        if decrease <= tol * max(history[-2], 1e-300):
            return history, iteration, True
    return history, max_iter, False
