"""Choosing ranks for a global budget (docs/MATH.md): allocated across layers, or uniform per layer.

Allocated: minimize the sum of the layers' relative errors, each weighted by the layer's sensitivity (how much
of it reaches the model output; 1 without weights), subject to the total cost. Each layer's
candidates are reduced to the lower convex hull of (cost, error), starting at the original layer (its
cost, error 0); moves along the hulls are taken greedily, cheapest error per saved unit first, until the
budget is met (the Lagrangian solution). The last move is then refined to the least-error candidate of that
layer that still meets the budget.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..geometry import Cost, LayerGeometry, original_cost
from ..methods import get
from .candidates import Candidate, CandidateTable

Choice = Candidate | None  # None: keep the original layer

# A chain (3-4 nodes for a kxk conv, 2 for a matrix) runs more memory passes than the one layer it replaces,
# so one that keeps most of the layer's MACs is slower than the layer however few parameters it has (ResNet-56:
# CP at three times the channels, 0.79 of the MACs, ran 1.9x slower than its 3x3 conv at batch 32). The
# allocated budgets only consider candidates that save at least this share of the layer's MACs: ResNet-56
# `auto --ratio 0.5` went from 0.97x / 1.05x the original's time (batch 1 / 32) to 0.87x / 0.88x, top-1
# 82.59 % -> 82.77 %. Where the target cannot be met so (layers too small for any such rank), all are considered.
MAX_CHAIN_MACS = 0.7


@dataclass(frozen=True)
class Joint:
    """One option of a group allocated together: a layer whose input channels can be pruned and the layers
    computing them (`channels.input_producers`). Either it is pruned and they compute only the channels it
    reads (they keep their weights), or each member gets a chain of its own or is kept."""

    choices: tuple[tuple[str, Choice], ...]
    cost: Cost
    error: float  # the members' errors, each times its weight


def allocate(
    tables: Sequence[CandidateTable],
    budget: str,
    target: float,
    fixed: float,
    weights: Mapping[str, float] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    pruned_weights: Mapping[str, float] | None = None,
) -> dict[str, Choice]:
    """Pick at most one candidate per layer so that `fixed + sum(costs) <= target` with the least total
    weighted error `sum(weights[layer] * error)`, among the candidates that save enough MACs
    (`MAX_CHAIN_MACS`), or among all of them where those cannot meet the target (layers too small to have any).

    `fixed`: the cost of everything not in `tables`. When the target cannot be reached every layer gets its
    cheapest candidate (the caller reports the ratio reached). `groups` (layer -> the layers computing its
    input channels): each such layer and those are allocated together (`Joint`): the layer's pruned candidates
    (their costs count the producers' sliced costs, their errors weighted by `pruned_weights`, else by
    `weights`) against every combination of the members' own chains.
    """
    weights, pruned_weights = weights or {}, pruned_weights or weights or {}
    groups = {name: (producers, pruned_weights.get(name, 1.0)) for name, producers in (groups or {}).items()}
    choices, total = _allocated(tables, budget, target, fixed, weights, _admissible, groups)
    if total > target:
        choices, total = _allocated(tables, budget, target, fixed, weights, lambda t: t.candidates, groups)
    return choices


def _units(tables, budget, weights, candidates, groups) -> dict[str, tuple[float, list, float, tuple[str, ...]]]:
    """What the allocation moves along: unit -> (original cost, options, weight, layers). A layer is a unit of
    its own, a group one unit named after its pruned layer, with `Joint` options whose errors are weighted."""
    by_name = {table.name: table for table in tables}
    members_of = {consumer: (consumer, *producers) for consumer, (producers, _) in groups.items()}
    grouped = {name: members for name, members in members_of.items() if all(m in by_name for m in members)}
    inside = {name for members in grouped.values() for name in members}
    units = {
        table.name: (table.original.of(budget), list(candidates(table)), weights.get(table.name, 1.0), (table.name,))
        for table in tables if table.name not in inside
    }  # fmt: skip
    for consumer, members in grouped.items():
        original = Cost(*(sum(values) for values in zip(*(by_name[name].original for name in members))))
        options = []
        own = [[p for p in candidates(by_name[name]) if not get(p.method).prunes_inputs] for name in members]
        hulls = [_hull(by_name[name].original.of(budget), points, budget) for name, points in zip(members, own)]
        for points in itertools.product(*hulls):  # the lower hull of a sum is made of sums of hull points
            if all(not isinstance(point, Candidate) for point in points):
                continue  # every member kept: the group's original
            chosen = [point if isinstance(point, Candidate) else None for point in points]
            costs = [c.cost if c else by_name[name].original for name, c in zip(members, chosen)]
            error = sum(weights.get(name, 1.0) * c.error for name, c in zip(members, chosen) if c)
            options.append(Joint(tuple(zip(members, chosen)), Cost(*(sum(v) for v in zip(*costs))), error))
        for pruned in candidates(by_name[consumer]):
            if get(pruned.method).prunes_inputs:
                kept = tuple((name, None) for name in members[1:])  # they compute only the channels it reads
                options.append(Joint(((consumer, pruned), *kept), pruned.cost, groups[consumer][1] * pruned.error))
        units[consumer] = (original.of(budget), options, 1.0, members)
    return units


def _allocated(tables, budget, target, fixed, weights, candidates, groups) -> tuple[dict[str, Choice], float]:
    """The greedy Lagrangian allocation over `candidates(table)` of each table (groups allocated together),
    and the total it reaches."""
    units = _units(tables, budget, weights, candidates, groups)
    hulls = {name: _hull(start, options, budget) for name, (start, options, *_) in units.items()}
    position = {name: 0 for name in hulls}
    total = fixed + sum(start for start, *_ in units.values())

    def slope(name: str, index: int) -> float:  # a positive weight scales a hull without changing it
        return units[name][2] * _slope(hulls[name], index, budget)

    moves = [(slope(name, 0), name) for name, hull in hulls.items() if len(hull) > 1]
    heapq.heapify(moves)
    last = None
    while total > target and moves:
        _, name = heapq.heappop(moves)
        hull, index = hulls[name], position[name]
        total -= _cost(hull[index], budget) - _cost(hull[index + 1], budget)
        position[name] = index + 1
        last = name
        if index + 2 < len(hull):
            heapq.heappush(moves, (slope(name, index + 1), name))
    chosen = {name: hulls[name][position[name]] for name in hulls}
    if last is not None and total <= target:
        room = target - (total - _cost(chosen[last], budget))
        fitting = [c for c in units[last][1] if c.cost.of(budget) <= room]
        if fitting:
            best = min(fitting, key=lambda c: (c.error, c.cost.of(budget)))
            if best.error < chosen[last].error:
                total += best.cost.of(budget) - _cost(chosen[last], budget)
                chosen[last] = best
    choices = {}
    for name, point in chosen.items():  # a group left at its original: every member kept
        members = units[name][3]
        choices.update(point.choices if isinstance(point, Joint) else {member: _choice(point) for member in members})
    return choices, total


def uniform(
    geometries: Mapping[str, LayerGeometry],
    methods: Mapping[str, Sequence[str]],
    budget: str,
    target: float,
    fixed: float,
    multiple: int = 1,
    choose: Callable[[str, list[tuple[str, tuple[int, ...]]]], tuple[str, tuple[int, ...]]] | None = None,
) -> dict[str, Choice]:
    """The same size ratio for every layer (what most tools do), chosen so the total meets `target`.

    Ranks follow the ratio with a fixed proportion (tucker2: R_T/T = R_S/S). The per-layer ratio is found by
    bisection. With several methods per layer, `choose(name, options)` picks one of the (method, ranks)
    options (by default the first method).
    """

    def plan(ratio: float) -> dict[str, tuple[str, tuple[int, ...]] | None]:
        result = {}
        for name, geometry in geometries.items():
            options = [(m, r) for m in methods[name] if (r := uniform_ranks(geometry, m, ratio, budget, multiple))]
            result[name] = (choose(name, options) if choose and len(options) > 1 else options[0]) if options else None
        return result

    def total(chosen) -> float:
        return fixed + sum(
            get(c[0]).cost(geometries[n], c[1]).of(budget) if c else original_cost(geometries[n]).of(budget)
            for n, c in chosen.items()
        )

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if total(plan(middle)) <= target else (low, middle)
    chosen = plan(low)
    return {
        name: Candidate(c[0], c[1], get(c[0]).cost(geometries[name], c[1]), float("nan")) if c else None
        for name, c in chosen.items()
    }


def uniform_ranks(
    geometry: LayerGeometry, method: str, ratio: float, budget: str, multiple: int = 1
) -> tuple[int, ...] | None:
    """The largest ranks of `method` whose chain costs at most `ratio` times the layer; the smallest ranks
    if none does but they still save; None if no ranks save anything."""
    original = original_cost(geometry).of(budget)
    solver = get(method)
    options = [r for r in solver.uniform_options(geometry, multiple) if solver.cost(geometry, r).of(budget) < original]
    if not options:
        return None
    fitting = [r for r in options if solver.cost(geometry, r).of(budget) <= ratio * original]
    return fitting[-1] if fitting else options[0]


def _choice(point) -> Choice:
    return point if isinstance(point, Candidate) else None


def _cost(point, budget: str) -> float:
    """A hull point's cost: a candidate's (or a group's option's), or the original's, which the point is."""
    return point.cost.of(budget) if isinstance(point, Candidate | Joint) else point


def _hull(start: float, candidates: Sequence, budget: str) -> list:
    """Lower convex hull of (cost, error) from the original (first entry: its cost `start`, a number) down to
    the cheapest of `candidates`; costs strictly decrease and errors strictly increase along it."""
    front, best = [], float("inf")
    for candidate in sorted(candidates, key=lambda c: (c.cost.of(budget), c.error)):
        if candidate.cost.of(budget) < start and candidate.error < best:  # Pareto-optimal
            front.append(candidate)
            best = candidate.error
    hull: list = []
    for point in [*front, start]:  # Andrew's monotone chain, costs ascending
        while len(hull) > 1 and _cross(hull[-2], hull[-1], point, budget) <= 0:
            hull.pop()
        hull.append(point)
    return hull[::-1]


def _admissible(table: CandidateTable) -> list[Candidate]:
    """The candidates that save at least 1 - MAX_CHAIN_MACS of the layer's MACs and, where the chains were
    timed (the latency budget), run faster than the layer: a chain that saves MACs but not time only costs accuracy
    (ResNet-56 at batch 32: CP at rank 64 on the 32-channel layers, half their MACs, 0.652 ms against 0.567).
    A pruned layer is the layer itself on fewer channels, no chain of extra passes: any saving counts."""
    original = table.original
    return [
        c for c in table.candidates
        if (c.cost.macs <= MAX_CHAIN_MACS * original.macs or get(c.method).prunes_inputs)
        and not (c.cost.latency and original.latency and c.cost.latency >= original.latency)
    ]  # fmt: skip


def _error(point) -> float:
    return point.error if isinstance(point, Candidate | Joint) else 0.0


def _slope(hull: list, index: int, budget: str) -> float:
    """Error added per unit of cost saved by the move from hull[index] to hull[index + 1]."""
    saved = _cost(hull[index], budget) - _cost(hull[index + 1], budget)
    return (_error(hull[index + 1]) - _error(hull[index])) / max(saved, 1e-300)


def _cross(o, a, b, budget: str) -> float:
    ox, ax, bx = _cost(o, budget), _cost(a, budget), _cost(b, budget)
    oy, ay, by = _error(o), _error(a), _error(b)
    return (ax - ox) * (by - oy) - (ay - oy) * (bx - ox)
