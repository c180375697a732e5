"""Stage 4: what each layer's fit minimizes, from arrays only (weight, bias, moments, geometry).

A `LayerProblem` is a self-contained, picklable unit of work: the candidate tables, the sensitivity probes
and the fits read nothing else, so they can run in any process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .decompose.bias import centered_covariance
from .decompose.covariance import (
    oas_shrinkage,
    output_energy,
    regularize,
    shrink,
    shrunk_about,
    shrunk_second_moment,
    solve_psd,
)
from .decompose.svd import svd_held_out_errors
from .geometry import LayerGeometry, solver_work
from .moments import Moments


@dataclass(frozen=True, eq=False)
class LayerProblem:
    """What one layer's fit minimizes, per group: `||(target - W~) L||^2` with `fit_sigmas = L L^T`.

    Plain: target = W1 and Sigma (centered, `Sigma - mu mu^T`, with the bias refit); `fit_sigmas` is None for
    the Frobenius norm. `reference_sigmas` (the uncentered Sigma of the original input) give the error's
    denominator `||W1 L||^2`; `residual` is error the fit cannot remove (nonzero only with propagation).
    """

    name: str
    geometry: LayerGeometry
    weights: list[np.ndarray]  # the original W per group (T/G, S/G, *k)
    targets: list[np.ndarray]  # what the chain should equal, same shapes
    fit_sigmas: list[np.ndarray] | None
    reference_sigmas: list[np.ndarray] | None
    bias: np.ndarray | None  # the original bias (T,)
    bias_shift: list[np.ndarray] | None = None  # per group: b~ = b + shift - W~ mu~ (the refit), else None
    fit_means: list[np.ndarray] | None = None  # mu~ per group (the chain's input mean)
    residual: float = 0.0  # per-layer constant part of the error numerator
    shrinkage: float = 0.0  # the largest weight its covariances were shrunk by (few calibration vectors)
    # few calibration vectors and held-out data: errors are measured on the held-out vectors (`held_out_moments`)
    held_out_sigmas: list[np.ndarray] | None = None  # the error's second moment there (about the fit's mean)
    held_out_references: list[np.ndarray] | None = None  # the uncentered one there: the error's denominator

    @property
    def nbytes(self) -> int:
        """The size of its arrays (each counted once: the plain problem's two Sigma lists are one)."""
        arrays = {id(array): array for part in self._parts() for array in part or [] if array is not None}
        return sum(array.nbytes for array in arrays.values())

    def digest(self, *settings) -> str:
        """A digest of everything a result computed from this problem depends on, and of `settings`."""
        hasher = hashlib.sha256(repr((self.name, self.geometry, self.residual, settings)).encode())
        hasher.update(self._arrays_digest)
        return hasher.hexdigest()[:40]

    @cached_property
    def _arrays_digest(self) -> bytes:
        """The arrays' part of `digest`, hashed once per problem (a layer's table, probe and fits each ask; a
        ResNet-50-sized layer's covariances are tens of MB: 6 s of hashing per run before)."""
        hasher = hashlib.sha256()
        for part in self._parts():
            for array in part or []:
                hasher.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
        return hasher.digest()

    def _parts(self) -> tuple:
        return (self.weights, self.targets, self.fit_sigmas, self.reference_sigmas, [self.bias], self.bias_shift,
                self.fit_means, self.held_out_sigmas, self.held_out_references)  # fmt: skip

    @property
    def held_out(self) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        """(error second moments, reference second moments) on held-out vectors, or None."""
        return None if self.held_out_sigmas is None else (self.held_out_sigmas, self.held_out_references)

    @classmethod
    def plain(
        cls,
        name: str,
        geometry: LayerGeometry,
        weight: np.ndarray,
        bias: np.ndarray | None,
        moments: Moments | None,
        *,
        bias_refit: bool = False,
        held_out: Moments | None = None,
        shrinkage_weights: Sequence[float] | None = None,
    ) -> LayerProblem:
        """The layer's own fit: in its input covariance (`moments`), or in the Frobenius norm (None).
        `held_out`: the moments of its input on held-out data, where a layer fitted from few vectors (a shrunk
        covariance) has its errors measured; `shrinkage_weights`: its groups' covariances are shrunk by these
        (`held_out_shrinkage`) instead of the OAS weights."""
        weights = per_group(weight, geometry)
        if moments is None:
            return cls(name, geometry, weights, weights, None, None, bias)
        sigmas, means, shrunk = list(moments.covariance), list(moments.mean), 0.0
        checked: dict = {}
        if needs_shrinkage(moments):
            if shrinkage_weights is None:
                pairs = [shrunk_second_moment(sigma, mean, moments.count) for sigma, mean in zip(sigmas, means)]
            else:
                pairs = [(shrunk_about(sigma, mean, w), w) for sigma, mean, w in zip(sigmas, means, shrinkage_weights)]
            sigmas, shrunk = [sigma for sigma, _ in pairs], max(weight for _, weight in pairs)
            if held_out is not None:
                checked = held_out_fields(held_out, means if bias_refit else None)
        if not bias_refit:
            return cls(name, geometry, weights, weights, sigmas, sigmas, bias, shrinkage=shrunk, **checked)
        centered = [centered_covariance(s, m) for s, m in zip(sigmas, means)]
        shifts = [w.reshape(len(w), -1) @ m for w, m in zip(weights, means)]  # W1 mu
        return cls(name, geometry, weights, weights, centered, sigmas, bias, shifts, means, shrinkage=shrunk, **checked)

    @classmethod
    def propagated(cls, plain: LayerProblem, original: Moments, perturbed: Moments, bias_refit: bool) -> LayerProblem:
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
            plain.name,
            plain.geometry,
            plain.weights,
            targets,
            fit_sigmas,
            list(sigmas),
            plain.bias,
            shifts if bias_refit else None,
            list(perturbed_means) if bias_refit else None,
            max(residual, 0.0),
        )


def per_group(weight: np.ndarray, geometry: LayerGeometry) -> list[np.ndarray]:
    """The weight of each group (float64), `(T/G, S/G, *k)`."""
    weight, size = np.asarray(weight, np.float64), geometry.group_out
    return [weight[g * size : (g + 1) * size] for g in range(geometry.group)]


def held_out_fields(held_out: Moments, fit_means: Sequence[np.ndarray] | None) -> dict[str, list[np.ndarray]]:
    """The `LayerProblem` fields of held-out moments: the second moment of the error's input there, about the
    calibration mean `fit_means` where the bias refit removes the error's mean on calibration data
    (`E[(x - mu)(x - mu)^T]`), and the uncentered one (the output energy's)."""
    references = [np.asarray(sigma, np.float64) for sigma in held_out.covariance]
    if fit_means is None:
        return {"held_out_sigmas": references, "held_out_references": references}
    errors = []
    for sigma, mean, fit_mean in zip(references, held_out.mean, fit_means):
        cross = np.outer(mean, fit_mean)
        errors.append(sigma - cross - cross.T + np.outer(fit_mean, fit_mean))
    return {"held_out_sigmas": errors, "held_out_references": references}


# A layer with fewer calibration vectors than this many per input dimension gets the covariance part of its
# second moment shrunk towards a sphere by the OAS weight (`decompose.covariance.shrunk_second_moment`): a
# conv sees thousands of patches per image, a dense layer after pooling (a classifier, a squeeze-and-excitation
# conv) one vector per image, whose empirical moment from 400 images in 1280 dims is singular.
SHRINK_BELOW_VECTORS_PER_DIMENSION = 4


def needs_shrinkage(moments: Moments) -> bool:
    return moments.count < SHRINK_BELOW_VECTORS_PER_DIMENSION * moments.second.shape[-1]


def shrinkage(moments: Moments) -> list[float]:
    """The shrinkage weight of each group's covariance (`shrunk_second_moment`): OAS where the vectors are
    few, else 0."""
    if not needs_shrinkage(moments):
        return [0.0] * len(moments.second)
    return [shrunk_second_moment(s, m, moments.count)[1] for s, m in zip(moments.covariance, moments.mean)]


# The weights a layer with held-out vectors may be shrunk by besides its OAS weight. OAS is optimal for
# Gaussian vectors; a classifier's pooled features are not: on EfficientNet-Lite0's (400 images, 1280 dims) OAS
# gives 0.51, where the rank-320 DA-SVD errs 0.111 on 500 other images; the best weight there is 0.8 (0.101;
# rank 200: 0.232 -> 0.210), and the 100 held-out images of a default run choose 0.9 (0.103).
SHRINKAGE_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def held_out_shrinkage(
    weights: Sequence[np.ndarray], moments: Moments, held_out: Moments, bias_refit: bool
) -> list[float]:
    """Per group, the shrinkage weight (OAS's or one of `SHRINKAGE_GRID`) whose DA-SVD fits of the weight
    matrix have the least held-out error averaged over every rank (`svd_held_out_errors`, closed form): the
    layers measured on held-out vectors are the matrix ones, whose candidates are all such fits. OAS wins ties."""
    errors = held_out_fields(held_out, list(moments.mean) if bias_refit else None)["held_out_sigmas"]
    chosen = []
    for weight, sigma, mean, error in zip(weights, moments.covariance, moments.mean, errors):
        matrix = weight.reshape(len(weight), -1)
        covariance = np.asarray(sigma, np.float64) - np.outer(mean, mean)

        def held_out_error(rho: float) -> float:
            fit = shrink(covariance, rho) if bias_refit else shrunk_about(sigma, mean, rho)
            return float(np.mean(svd_held_out_errors(matrix, fit, error)))

        chosen.append(min((oas_shrinkage(covariance, moments.count), *SHRINKAGE_GRID), key=held_out_error))
    return chosen


class Problems(Mapping):
    """The plain problem of each layer (in order), built when it is looked up: a problem holds its own copy of
    the layer's covariance (a ResNet-50 has 0.9 GB of them), so the stages, which take one layer at a time,
    hold one copy at a time instead of one per layer. `held_out`: the held-out moments of layers fitted from
    few vectors (`LayerProblem.plain`)."""

    def __init__(
        self, layers, weights, biases, statistics, bias_refit: bool, names: Sequence[str] | None = None,
        held_out: Mapping[str, Moments] | None = None,
    ):  # fmt: skip
        self.layers = {layer.name: layer for layer in layers}
        self.weights, self.biases, self.statistics, self.bias_refit = weights, biases, statistics, bias_refit
        self.names = list(self.layers) if names is None else list(names)
        self.held_out = dict(held_out or {})
        self._shrinkage: dict[str, list[float]] = {}  # chosen on held-out vectors once per layer, kept

    def __getitem__(self, name: str) -> LayerProblem:
        if name not in self.names:
            raise KeyError(name)
        return LayerProblem.plain(
            name,
            self.layers[name].geometry,
            self.weights[name],
            self.biases[name],
            None if self.statistics is None else self.statistics[name],
            bias_refit=self.bias_refit,
            held_out=self.held_out.get(name),
            shrinkage_weights=self.shrinkage_weights(name),
        )

    def shrinkage_weights(self, name: str) -> list[float] | None:
        """The layer's shrinkage weights chosen on its held-out vectors (`held_out_shrinkage`), or None where
        it has none (OAS, or no shrinkage)."""
        held_out = self.held_out.get(name)
        if held_out is None or self.statistics is None or not needs_shrinkage(self.statistics[name]):
            return None
        if name not in self._shrinkage:
            groups = per_group(self.weights[name], self.layers[name].geometry)
            self._shrinkage[name] = held_out_shrinkage(groups, self.statistics[name], held_out, self.bias_refit)
        return self._shrinkage[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def restricted(self, names: Sequence[str]) -> Problems:
        restricted = Problems(
            self.layers.values(), self.weights, self.biases, self.statistics, self.bias_refit, names, self.held_out
        )
        restricted._shrinkage = self._shrinkage  # one choice per layer, whichever view asks first
        return restricted

    def geometry(self, name: str) -> LayerGeometry:
        """The layer's geometry, without building its problem."""
        return self.layers[name].geometry

    def sampling(self, name: str) -> tuple[int, int, float, int | None] | None:
        """(calibration vectors, input dims, largest shrinkage weight of its groups, held-out vectors its errors
        are measured on or None) of a layer, without building its problem; None without statistics."""
        if self.statistics is None:
            return None
        moments, held_out = self.statistics[name], self.held_out.get(name)
        counted = held_out.count if held_out is not None and needs_shrinkage(moments) else None
        weights = self.shrinkage_weights(name) or shrinkage(moments)
        return moments.count, moments.second.shape[-1], max(weights), counted


def solver_works(problems: Mapping[str, LayerProblem]) -> dict[str, int]:
    """The solver work (`geometry.solver_work`) of each of `problems`, without building them."""
    geometry = problems.geometry if isinstance(problems, Problems) else (lambda name: problems[name].geometry)
    return {name: solver_work(geometry(name)) for name in problems}


def largest_first(problems: Mapping[str, LayerProblem]) -> list[str]:
    """The names of `problems` by decreasing solver work (ties in their order): long units start first, so
    a pool does not wait on one late large layer."""
    works = solver_works(problems)
    return sorted(works, key=lambda name: -works[name])


def build_problems(
    layers: Sequence,
    weights: Mapping[str, np.ndarray],
    biases: Mapping[str, np.ndarray | None],
    statistics: Mapping[str, Moments] | None,
    *,
    bias_refit: bool = False,
    held_out: Mapping[str, Moments] | None = None,
) -> Problems:
    """The plain problem of each layer, in order (`statistics` None: the Frobenius norm; `held_out`: moments
    on held-out data of the layers fitted from few vectors, where their errors are measured)."""
    return Problems(layers, weights, biases, statistics, bias_refit, held_out=held_out)
