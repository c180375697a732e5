"""Exact per-layer ranks (`--ranks`): validated against the layers and turned into plan choices."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..errors import UserError
from ..geometry import Cost, LayerGeometry
from ..methods import METHODS, Ranks, get, method_for_ranks, methods_for
from ..problems import LayerProblem
from .candidates import Candidate, problem_errors


def check_names(specs: Mapping[str, object], layers: Sequence) -> None:
    """Every layer named in `specs` exists and can be decomposed."""
    names = {layer.name for layer in layers}
    unknown = sorted(set(specs) - names)
    if unknown:
        raise UserError(f"--ranks names unknown layers {unknown}; `onnx-dacomp inspect` lists the layer names")
    for layer in layers:
        if layer.name in specs and not layer.decomposable:
            raise UserError(f"--ranks names layer {layer.name}, which cannot be decomposed: {layer.skip_reason}")


def check_sliced(choices: Mapping[str, Candidate], coupled: Mapping[str, Sequence[str]]) -> None:
    """No layer named in --ranks computes the input channels of a layer that --ranks prunes: pruning slices it."""
    for consumer, producers in coupled.items():
        choice = choices.get(consumer)
        named = [producer for producer in producers if producer in choices]
        if choice is not None and get(choice.method).prunes_inputs and named:
            raise UserError(
                f"--ranks prunes the input channels of {consumer}, which {named[0]} computes: leave {named[0]} out "
                f"of --ranks (it then computes only the channels {consumer} keeps)"
            )


def parse(name: str, spec, default_method: str, geometry: LayerGeometry) -> tuple[str, Ranks]:
    """(method, per-group ranks) from a --ranks entry: int, [R_T, R_S], or {"method": ..., "ranks": ...}."""
    method = None
    if isinstance(spec, Mapping):
        method, spec = spec.get("method"), spec.get("ranks")
    if isinstance(spec, bool) or not (
        isinstance(spec, int) or (isinstance(spec, (list, tuple)) and all(isinstance(r, int) for r in spec))
    ):
        raise UserError(f"--ranks entry for {name}: expected an int, [R_T, R_S] or {{method, ranks}}, got {spec!r}")
    ranks = (spec,) if isinstance(spec, int) else tuple(spec)
    if method is None:
        method = method_for_ranks(len(ranks), methods_for(default_method, geometry)[0])
    if method not in METHODS:
        raise UserError(f"--ranks entry for {name}: unknown method {method!r} ({', '.join(METHODS)})")
    solver = get(method)
    ranks = solver.normalize_ranks(ranks)
    limits = solver.max_ranks(geometry)
    if len(ranks) != len(limits) or not all(1 <= r <= limit for r, limit in zip(ranks, limits)):
        raise UserError(
            f"--ranks entry for {name}: {method} ranks {list(ranks)} do not fit the layer "
            f"(each between 1 and {list(limits)} per group)"
        )
    return method, ranks


def override_choices(
    problems: Mapping[str, LayerProblem],
    specs: Mapping[str, object],
    default_method: str,
    cost: Callable[[str, str, Ranks], Cost],
    seed: int,
) -> dict[str, Candidate]:
    """The plan choices of the layers named in `specs`, with their cost (`cost(name, method, ranks)`) and
    estimated error, in the order of `problems`."""
    choices = {}
    for name, problem in problems.items():
        if name in specs:
            method, ranks = parse(name, specs[name], default_method, problem.geometry)
            choices[name] = Candidate(method, ranks, cost(name, method, ranks), estimate(problem, method, ranks, seed))
    return choices


def estimate(problem: LayerProblem, method: str, ranks: Ranks, seed: int) -> float:
    """The estimated relative error of one choice (as in the candidate tables)."""
    return problem_errors(problem, method, [ranks], seed)[0]
