"""The one result type every solver returns."""

from __future__ import annotations

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
