"""Bias refit (docs/MATH.md): absorb the mean part of the approximation error into the bias."""

from __future__ import annotations

import numpy as np


def centered_covariance(sigma: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """`Sigma - mu mu^T`: the covariance to fit in when the bias is refitted afterwards."""
    mean = np.asarray(mean, np.float64)
    return np.asarray(sigma, np.float64) - np.outer(mean, mean)


def refit_bias(bias: np.ndarray | None, weight: np.ndarray, approximation: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """`b~ = b + (W1 - W1~) mu`: the compressed layer then matches the original output on average."""
    weight = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    difference = weight - np.asarray(approximation, np.float64).reshape(weight.shape)
    base = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, np.float64)
    return base + difference @ np.asarray(mean, np.float64)
