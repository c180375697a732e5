"""Per-layer candidate tables (docs/MATH.md): ranks -> cost and an estimate of the relative DA error.

The estimates are cheap and are upper bounds of what the full solvers reach, because the solvers start from
exactly the estimated point and never increase the error (each method's `estimate` says how it gets there).
Weights and covariances come per group; errors are combined weighted by each group's output energy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..decompose.covariance import output_energy
from ..geometry import Cost, original_cost
from ..log import progress
from ..methods import Ranks, get, methods_for
from ..problems import LayerProblem, largest_first, solver_works


@dataclass(frozen=True)
class Candidate:
    method: str
    ranks: Ranks  # per group: (R,) for svd/cp, (R_T, R_S) for tucker2
    cost: Cost
    error: float  # estimated relative error, an upper bound of the full solver's


@dataclass(frozen=True)
class CandidateTable:
    name: str
    original: Cost
    candidates: tuple[Candidate, ...]  # only candidates that are cheaper than the original in some budget


def merged(table: CandidateTable, other: CandidateTable | None) -> CandidateTable:
    """`table` with the candidates of `other` (the same layer's, of other methods) added."""
    return table if other is None else replace(table, candidates=table.candidates + other.candidates)


def estimate_errors(
    method: str,
    weights: Sequence[np.ndarray],
    sigmas: Sequence[np.ndarray] | None,
    ranks: Sequence[Ranks],
    *,
    reference_sigmas: Sequence[np.ndarray] | None = None,
    held_out: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    seed: int = 0,
) -> list[float]:
    """Estimated relative error of `method` at each per-group rank tuple in `ranks`.

    The error is relative to the output energy in `reference_sigmas` when given (the bias refit fits in the
    centered covariance but, like `fit.fit_layer`, measures against the uncentered output energy), else in
    `sigmas`: `sum_g ||(W_g - W~_g) L_g||^2 / sum_g ||W_g L_ref,g||^2`. `held_out`: (error, reference)
    second moments on held-out vectors, where the fits in `sigmas` are measured instead
    (`LayerProblem.held_out`).
    """
    solver = get(method)
    sigmas = sigmas if sigmas is not None else [None] * len(weights)
    measured, references = held_out or (sigmas, reference_sigmas if reference_sigmas is not None else sigmas)
    energies = np.array([output_energy(w, s) for w, s in zip(weights, measured)])
    total = sum(output_energy(w, s) for w, s in zip(weights, references))
    shares = energies / total if total > 0 else np.full(len(weights), 1 / len(weights))
    per_group = np.zeros((len(weights), len(ranks)))
    for g, (weight, sigma, check) in enumerate(zip(weights, sigmas, measured)):
        if held_out is None:
            per_group[g] = solver.estimate(weight, sigma, ranks, seed)
        else:
            per_group[g] = solver.estimate_held_out(weight, sigma, check, ranks, seed)
    return [float(v) for v in shares @ per_group]


def problem_errors(problem: LayerProblem, method: str, ranks: Sequence[Ranks], seed: int) -> list[float]:
    """`estimate_errors` of a layer's problem (on its held-out vectors where it has them)."""
    return estimate_errors(
        method, problem.targets, problem.fit_sigmas, ranks, reference_sigmas=problem.reference_sigmas,
        held_out=problem.held_out, seed=seed,
    )  # fmt: skip


def candidate_table(problem: LayerProblem, method: str, *, multiple: int = 1, seed: int = 0) -> CandidateTable:
    """Every candidate of the layer's methods (`method` may be `auto`) on a rank grid that is cheaper than
    the original layer, with its estimated error (`problem_errors`)."""
    candidates, geometry = [], problem.geometry
    for name_of_method in methods_for(method, geometry):
        solver = get(name_of_method)
        ranks = solver.grid(geometry, multiple)
        if not ranks:
            continue
        errors = problem_errors(problem, name_of_method, ranks, seed)
        for rank, error in zip(ranks, errors):
            candidates.append(Candidate(name_of_method, rank, solver.cost(geometry, rank), error))
    return CandidateTable(problem.name, original_cost(geometry), tuple(candidates))


@dataclass(frozen=True, eq=False)
class TableTask:
    """One layer's candidate table as a picklable unit of work."""

    problem: LayerProblem
    method: str
    multiple: int
    seed: int

    @property
    def nbytes(self) -> int:  # what the task carries (workers.Workers.map bounds the bytes in flight)
        return self.problem.nbytes

    def run(self) -> CandidateTable:
        return candidate_table(self.problem, self.method, multiple=self.multiple, seed=self.seed)


def candidate_tables(
    problems: Mapping[str, LayerProblem],
    method: str,
    *,
    multiple: int,
    seed: int,
    show_progress: bool = True,
    map: Callable = map,
    cache=None,
) -> dict[str, CandidateTable]:
    """The candidate table of every problem (`method` may be `auto`), in the order of `problems`. `map` runs
    the units, largest first (the builtin map, or a `workers.Workers` map); `cache` (a `cache.Cache`) keeps
    them on disk. Problems are built as the units are handed out, not all at once."""
    tables, keys, works = {}, {}, solver_works(problems)
    with progress(len(problems), "rank candidates", "layer", work=sum(works.values()), enabled=show_progress) as bar:

        def pending():
            for name in largest_first(problems):
                problem = problems[name]
                if cache is not None:
                    keys[name] = problem.digest("table", method, multiple, seed)
                    found = cache.table(keys[name])
                    if found is not None:
                        tables[name] = found
                        bar.update(work=works[name], reused=True)
                        continue
                yield TableTask(problem, method, multiple, seed)

        for table in map(_run, pending()):
            tables[table.name] = table
            if cache is not None:
                cache.put_table(keys[table.name], table)
            bar.update(work=works[table.name])
    return {name: tables[name] for name in problems}


def _run(task: TableTask) -> CandidateTable:
    return task.run()
