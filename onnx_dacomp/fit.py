"""Stage 4 applied to layers: what one layer's fit minimizes (plain or propagated, with or without the bias
refit), the full solver at the chosen ranks for every group, the refitted bias and the relative error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibrate.cross import CrossStatistics
from .calibrate.statistics import LayerStatistics, Statistics
from .config import CompressConfig
from .decompose.bias import centered_covariance
from .decompose.covariance import output_energy, regularize, solve_psd
from .decompose.cp import cp_als, da_cp
from .decompose.factors import Factors, reconstruct
from .decompose.result import Decomposition
from .decompose.svd import da_svd, truncated_svd
from .decompose.tucker2 import da_tucker2, tucker2_hooi, weighted_input_factor
from .ranks.candidates import Candidate
from .targets import ConvLayer


@dataclass(frozen=True, eq=False)
class LayerProblem:
    """What one layer's fit minimizes, per group: `||(target - W~) L||^2` with `fit_sigmas = L L^T`.

    Plain: target = W1 and Sigma (centered, `Sigma - mu mu^T`, with the bias refit); `fit_sigmas` is None for
    the Frobenius norm. `reference_sigmas` (the uncentered Sigma of the original input) give the error's
    denominator `||W1 L||^2`; `residual` is error the fit cannot remove (nonzero only with propagation).
    """

    weights: list[np.ndarray]  # the original W per group (T/G, S/G, *k)
    targets: list[np.ndarray]  # what the chain should equal, same shapes
    fit_sigmas: list[np.ndarray] | None
    reference_sigmas: list[np.ndarray] | None
    bias: np.ndarray | None  # the original bias (T,)
    bias_shift: list[np.ndarray] | None = None  # per group: b~ = b + shift - W~ mu~ (the refit), else None
    fit_means: list[np.ndarray] | None = None  # mu~ per group (the chain's input mean)
    residual: float = 0.0  # per-layer constant part of the error numerator

    @classmethod
    def plain(cls, layer: ConvLayer, weight, bias, statistics: Statistics | None, config: CompressConfig):
        weight = np.asarray(weight, np.float64)
        per_group = layer.out_channels // layer.group
        weights = [weight[g * per_group : (g + 1) * per_group] for g in range(layer.group)]
        if statistics is None or config.norm == "frobenius":
            return cls(weights, weights, None, None, bias)
        layer_statistics = statistics.layers[layer.name]
        sigmas, means = list(layer_statistics.covariance), list(layer_statistics.mean)
        if not config.bias_refit:
            return cls(weights, weights, sigmas, sigmas, bias)
        centered = [centered_covariance(s, m) for s, m in zip(sigmas, means)]
        shifts = [w.reshape(len(w), -1) @ m for w, m in zip(weights, means)]  # W1 mu
        return cls(weights, weights, centered, sigmas, bias, shifts, means)

    @classmethod
    def propagated(cls, plain: LayerProblem, original: LayerStatistics, perturbed: CrossStatistics, bias_refit: bool):
        """Fit `W1 x` from the perturbed input x~: target `W' = W1 C Sigma~^-1` in the Sigma~ norm (centered
        with the bias refit), plus the residual error no chain on x~ can remove."""
        targets, fit_sigmas, shifts, residual = [], [], [], 0.0
        sigmas, means = original.covariance, original.mean
        cross, perturbed_sigmas, perturbed_means = perturbed.cross_moment, perturbed.covariance, perturbed.mean
        for g, weight in enumerate(plain.weights):
            matrix = weight.reshape(len(weight), -1)
            sigma, cross_g, sigma_fit = sigmas[g], cross[g], perturbed_sigmas[g]
            if bias_refit:
                sigma = centered_covariance(sigma, means[g])
                cross_g = cross_g - np.outer(means[g], perturbed_means[g])
                sigma_fit = centered_covariance(sigma_fit, perturbed_means[g])
                shifts.append(matrix @ means[g])
            regularized = regularize(sigma_fit)
            target = solve_psd(regularized, cross_g.T @ matrix.T).T  # W1 C Sigma~^-1
            residual += output_energy(matrix, sigma) - float(np.einsum("ij,ij->", target @ regularized, target))
            targets.append(target.reshape(weight.shape))
            fit_sigmas.append(regularized)
        return cls(
            plain.weights,
            targets,
            fit_sigmas,
            list(sigmas),
            plain.bias,
            shifts if bias_refit else None,
            list(perturbed_means) if bias_refit else None,
            max(residual, 0.0),
        )


@dataclass(frozen=True, eq=False)
class LayerFit:
    factors: list[Factors]
    bias: np.ndarray | None  # a refitted bias, or None to keep the layer's own
    rel_error: float
    sweeps: int


def fit_layer(problem: LayerProblem, choice: Candidate, config: CompressConfig) -> LayerFit:
    """The full solver at the chosen ranks for every group, the refitted bias, and the relative error."""
    fit_sigmas = problem.fit_sigmas or [None] * len(problem.targets)
    results = [solve(choice.method, t, s, choice.ranks, config) for t, s in zip(problem.targets, fit_sigmas)]
    factors = [result.factors for result in results]
    approximations = [reconstruct(f).reshape(len(t), -1) for f, t in zip(factors, problem.targets)]
    numerator, denominator = problem.residual, 0.0
    reference = problem.reference_sigmas or fit_sigmas
    for target, approximation, weight, fit_sigma, sigma in zip(
        problem.targets, approximations, problem.weights, fit_sigmas, reference
    ):
        difference = target.reshape(len(target), -1) - approximation
        numerator += output_energy(difference, fit_sigma)
        denominator += output_energy(weight, sigma)
    bias = None
    if problem.bias_shift is not None:
        base = problem.bias if problem.bias is not None else np.zeros(sum(len(w) for w in problem.weights))
        corrections = [s - a @ m for s, a, m in zip(problem.bias_shift, approximations, problem.fit_means)]
        bias = base + np.concatenate(corrections)
    error = numerator / denominator if denominator > 0 else 0.0
    return LayerFit(factors, bias, float(error), max(result.iterations for result in results))


def solve(method: str, weight: np.ndarray, sigma: np.ndarray | None, ranks, config: CompressConfig) -> Decomposition:
    """The full solver at the chosen ranks, started where the candidate estimate was computed."""
    if method == "svd":
        return truncated_svd(weight, ranks[0]) if sigma is None else da_svd(weight, sigma, ranks[0])
    if method == "tucker2":
        if sigma is None:
            return tucker2_hooi(weight, ranks, max_iter=config.max_iter)
        start = weighted_input_factor(weight, sigma)[:, : ranks[1]]
        return da_tucker2(weight, sigma, ranks, init=start, max_iter=config.max_iter, seed=config.seed)
    if sigma is None:
        return cp_als(weight, ranks[0], max_iter=config.max_iter, seed=config.seed)
    return da_cp(weight, sigma, ranks[0], max_iter=config.max_iter, seed=config.seed)
