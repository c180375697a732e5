"""95 % intervals of the verification figures (numpy only): Wilson's score interval for a proportion (top-1,
agreement), a seeded percentile bootstrap over samples for a relative error, the paired top-1 drop and the paired
difference of two models' output errors.
Held-out sets are small (100-500 samples): the interval says how far the figure can be from the one on other
data of the same kind."""

from __future__ import annotations

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
BOOTSTRAP_DRAWS = 2000


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion (well behaved near 0 and 1 and for few trials)."""
    if trials <= 0:
        return 0.0, 1.0
    share = successes / trials
    denominator = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * np.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _resamples(count: int, seed: int) -> np.ndarray:
    """Bootstrap draws of sample indices, `[BOOTSTRAP_DRAWS, count]`, from a fixed seed."""
    return np.random.default_rng(seed).integers(0, count, size=(BOOTSTRAP_DRAWS, count))


def relative_error_interval(errors, energies, seed: int = 0) -> tuple[float, float]:
    """The 95 % interval of sqrt(sum errors / sum energies) over the samples (per-sample error and reference
    energies), by resampling the samples."""
    return _ratio_of_sums_interval(errors, energies, seed, np.sqrt)


def paired_difference_interval(first, second, seed: int = 0) -> tuple[float, float]:
    """The 95 % interval of mean(first) - mean(second) for paired per-sample values (top-1 hits of the
    original and the compressed model on the same samples), by resampling the samples."""
    difference = np.asarray(first, np.float64) - np.asarray(second, np.float64)
    if len(difference) < 2:
        value = float(difference.mean()) if len(difference) else 0.0
        return value, value
    means = difference[_resamples(len(difference), seed)].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def relative_difference_interval(first, second, energies, seed: int = 0) -> tuple[float, float]:
    """The 95 % interval of (sum first - sum second) / sum energies for paired per-sample squared errors of two
    models and the reference energies (the difference of their relative output error energies), by resampling
    the samples."""
    return _ratio_of_sums_interval(np.asarray(first, np.float64) - np.asarray(second, np.float64), energies, seed)


def _ratio_of_sums_interval(numerators, energies, seed: int, transform=None) -> tuple[float, float]:
    """The 95 % interval of `transform(sum numerators / sum energies)` (0 where no energy), by resampling the
    samples."""
    numerators, energies = np.asarray(numerators, np.float64), np.asarray(energies, np.float64)
    transform = transform or (lambda ratio: ratio)
    if len(numerators) < 2:
        value = float(transform(numerators.sum() / energies.sum())) if energies.sum() > 0 else 0.0
        return value, value
    draws = _resamples(len(numerators), seed)
    totals = energies[draws].sum(axis=1)
    ratios = transform(np.where(totals > 0, numerators[draws].sum(axis=1) / np.where(totals > 0, totals, 1), 0.0))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)
