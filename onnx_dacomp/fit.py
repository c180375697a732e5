"""Stage 6: the full solver of each layer at its planned ranks, for every group, the refitted bias and the
relative error. Work units are picklable (`FitTask`); `fit_all` runs them through any `map`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace

import numpy as np

from .decompose.covariance import output_energy
from .decompose.factors import Factors, reconstruct
from .log import progress
from .methods import get
from .problems import LayerProblem, largest_first, solver_works
from .ranks.candidates import Candidate


@dataclass(frozen=True)
class FitSettings:
    """What a solver needs besides its problem."""

    max_iter: int
    seed: int

    @classmethod
    def of(cls, config) -> FitSettings:
        """The settings a `CompressConfig` gives."""
        return cls(config.fit.max_iter, config.runtime.seed)


@dataclass(frozen=True, eq=False)
class LayerFit:
    factors: list[Factors]
    bias: np.ndarray | None  # a refitted bias, or None to keep the layer's own
    rel_error: float
    sweeps: int


@dataclass(frozen=True, eq=False)
class FitTask:
    problem: LayerProblem
    choice: Candidate
    settings: FitSettings

    @property
    def nbytes(self) -> int:  # what the task carries (workers.Workers.map bounds the bytes in flight)
        return self.problem.nbytes


def fit_layer(problem: LayerProblem, choice: Candidate, settings: FitSettings) -> LayerFit:
    """The full solver at the chosen ranks for every group, the refitted bias, and the relative error."""
    solver = get(choice.method)
    fit_sigmas = problem.fit_sigmas or [None] * len(problem.targets)
    results = [
        solver.solve(t, s, choice.ranks, max_iter=settings.max_iter, seed=settings.seed)
        for t, s in zip(problem.targets, fit_sigmas)
    ]
    factors = [result.factors for result in results]
    approximations = [reconstruct(f).reshape(len(t), -1) for f, t in zip(factors, problem.targets)]
    numerator, denominator = problem.residual, 0.0
    # the error in the fit's norm, or on held-out vectors where the layer has them (few calibration vectors)
    measured, reference = problem.held_out or (fit_sigmas, problem.reference_sigmas or fit_sigmas)
    for target, approximation, weight, error_sigma, sigma in zip(
        problem.targets, approximations, problem.weights, measured, reference
    ):
        difference = target.reshape(len(target), -1) - approximation
        numerator += output_energy(difference, error_sigma)
        denominator += output_energy(weight, sigma)
    bias = None
    if problem.bias_shift is not None:
        base = problem.bias if problem.bias is not None else np.zeros(sum(len(w) for w in problem.weights))
        corrections = [s - a @ m for s, a, m in zip(problem.bias_shift, approximations, problem.fit_means)]
        bias = base + np.concatenate(corrections)
    error = numerator / denominator if denominator > 0 else 0.0
    return LayerFit(factors, bias, float(error), max(result.iterations for result in results))


def run_task(task: FitTask) -> tuple[str, LayerFit]:
    return task.problem.name, fit_layer(task.problem, task.choice, task.settings)


Map = Callable[[Callable, Iterable], Iterable]


def fit_all(
    problems: Mapping[str, LayerProblem],
    choices: Mapping[str, Candidate | None],
    settings: FitSettings,
    *,
    map: Map = map,
    cache: MutableMapping[tuple, LayerFit] | None = None,
    store=None,
    show_progress: bool = True,
) -> dict[str, LayerFit]:
    """Fits of every problem with a planned choice, in the order of `problems`. `map` runs the units, largest
    first (the builtin map, a `workers.Workers` map, any other executor's); `cache` holds fits by (layer,
    method, ranks) across calls (the ratio search revisits the same choices); `store` (a `cache.Cache`) keeps
    them on disk."""
    cache = {} if cache is None else cache
    # a variant's fit is the fit of the method it realizes, in its chain: fitted (and kept) once for both
    fitted = {name: _realized_method(choice) for name in problems if (choice := choices.get(name)) is not None}
    keys = {name: (name, choice.method, choice.ranks) for name, choice in fitted.items()}
    stored, works = {}, solver_works(problems)
    work = sum(works[name] for name in keys)
    with progress(len(keys), "decomposing", "layer", work=work, enabled=show_progress) as bar:

        def pending():
            for name in largest_first(problems):
                if name not in keys or keys[name] in cache:
                    continue
                problem = problems[name]
                if store is not None:
                    stored[name] = problem.digest("fit", fitted[name].method, fitted[name].ranks, settings)
                    found = store.fit(stored[name])
                    if found is not None:
                        cache[keys[name]] = found
                        bar.update(work=works[name], reused=True)
                        continue
                yield FitTask(problem, fitted[name], settings)

        done = [name for name, key in keys.items() if key in cache]
        bar.update(len(done), work=sum(works[name] for name in done), reused=True)
        for name, fit in map(run_task, pending()):
            cache[keys[name]] = fit
            if store is not None:
                store.put_fit(stored[name], fit)
            bar.update(work=works[name])
    return {name: _realized_fit(cache[key], choices[name].method) for name, key in keys.items()}


def _realized_method(choice: Candidate) -> Candidate:
    family = get(choice.method).variant_of
    return choice if family is None else replace(choice, method=family)


def _realized_fit(fit: LayerFit, method: str) -> LayerFit:
    solver = get(method)
    return fit if solver.variant_of is None else replace(fit, factors=[solver.realize(f) for f in fit.factors])
