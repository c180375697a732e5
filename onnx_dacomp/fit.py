"""Stage 6: the full solver of each layer at its planned ranks, for every group, the refitted bias and the
relative error. Work units are picklable (`FitTask`); `fit_all` runs them through any `map`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from .decompose.covariance import output_energy
from .decompose.factors import Factors, reconstruct
from .log import progress
from .methods import get
from .problems import LayerProblem
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


def run_task(task: FitTask) -> LayerFit:
    return fit_layer(task.problem, task.choice, task.settings)


Map = Callable[[Callable, Iterable], Iterable]


def fit_all(
    problems: Mapping[str, LayerProblem],
    choices: Mapping[str, Candidate | None],
    settings: FitSettings,
    *,
    map: Map = map,
    cache: MutableMapping[tuple, LayerFit] | None = None,
    show_progress: bool = True,
) -> dict[str, LayerFit]:
    """Fits of every problem with a planned choice, in the order of `problems`. `map` runs the tasks (the
    builtin map, or a process pool's or cluster's); `cache` holds fits by (layer, method, ranks) across
    calls (the ratio search revisits the same choices)."""
    cache = {} if cache is None else cache
    keys = {name: (name, choice.method, choice.ranks) for name in problems if (choice := choices.get(name)) is not None}
    missing = [name for name, key in keys.items() if key not in cache]
    tasks = (FitTask(problems[name], choices[name], settings) for name in missing)  # built as they run
    with progress(len(keys), "decomposing", "layer", enabled=show_progress) as bar:
        bar.update(len(keys) - len(missing))
        for name, fit in zip(missing, map(run_task, tasks)):
            cache[keys[name]] = fit
            bar.update()
    return {name: cache[key] for name, key in keys.items()}
