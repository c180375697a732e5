"""The one statistics accumulator: float64 sums over input vectors that merge exactly.

For a layer with G groups and input vectors of length n (a conv's patches, a dense layer's rows), per group:
`second = sum x x^T` (n x n), `first = sum x`, over `count` vectors. For error propagation (docs/MATH.md)
the vectors are those of the partially compressed model (x~) and `cross = sum x x~^T` pairs them with the
original model's x on the same samples, and `reference_first = sum x` is the original's first moment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Moments:
    second: np.ndarray  # (G, n, n) float64
    first: np.ndarray  # (G, n) float64
    count: int
    cross: np.ndarray | None = None  # (G, n, n): sum of x x~^T, only for cross moments
    reference_first: np.ndarray | None = None  # (G, n): sum of x, only for cross moments

    @property
    def covariance(self) -> np.ndarray:
        """`Sigma = E[x x^T]` per group (uncentered)."""
        return self.second / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        """`mu = E[x]` per group."""
        return self.first / max(self.count, 1)

    @property
    def cross_moment(self) -> np.ndarray:
        """`C = E[x x~^T]` per group."""
        if self.cross is None:
            raise ValueError("these moments hold no cross term")
        return self.cross / max(self.count, 1)

    @property
    def reference_mean(self) -> np.ndarray:
        """`mu = E[x]` of the original model's input per group (cross moments only)."""
        if self.reference_first is None:
            raise ValueError("these moments hold no reference mean")
        return self.reference_first / max(self.count, 1)

    def is_finite(self) -> bool:
        parts = [part for part in (self.second, self.first, self.cross, self.reference_first) if part is not None]
        return all(np.isfinite(part).all() for part in parts)

    def __add__(self, other: Moments) -> Moments:
        if self.second.shape != other.second.shape:
            raise ValueError(f"cannot merge statistics of shapes {self.second.shape} and {other.second.shape}")
        if (self.cross is None) != (other.cross is None):
            raise ValueError("cannot merge plain and cross moments")
        cross = None if self.cross is None else self.cross + other.cross
        reference = None if self.reference_first is None else self.reference_first + other.reference_first
        return Moments(self.second + other.second, self.first + other.first, self.count + other.count, cross, reference)


def vector_sums(vectors: np.ndarray) -> Moments:
    """Float64 sums of `x x^T` and `x` over input vectors `(group, n, count)`."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by the caller, per layer
        second = np.matmul(vectors, vectors.transpose(0, 2, 1))
    return Moments(second, vectors.sum(axis=2), vectors.shape[2])
