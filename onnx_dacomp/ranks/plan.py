"""The rank plan: each fitted layer's method and ranks, from exact overrides and a global budget (allocated
across layers from the candidate tables, or uniform)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..geometry import Cost
from ..log import logger
from ..methods import get, methods_for
from ..problems import LayerProblem
from .allocate import Choice, allocate, uniform
from .candidates import CandidateTable
from .overrides import estimate


@dataclass(frozen=True)
class Budget:
    """What the plan must meet: `ratio` of the summed `unit` (params, macs, latency) of the counted layers."""

    unit: str
    ratio: float | None
    allocation: str  # allocated | uniform
    method: str  # the configured method choice (uniform allocation picks among its methods)
    multiple: int  # rank multiple on channel axes at least this wide
    seed: int


@dataclass(frozen=True)
class RankPlan:
    """`choices[name]`: the candidate a layer gets, or None where it stays as it is (layers not listed are
    not fitted at all)."""

    choices: Mapping[str, Choice]
    ratio: float | None

    def get(self, name: str) -> Choice:
        return self.choices.get(name)

    def without(self, names) -> RankPlan:
        """The plan with `names` kept as they are."""
        return RankPlan({name: None if name in names else c for name, c in self.choices.items()}, self.ratio)


def sliced(choices: Mapping[str, Choice], groups: Mapping[str, tuple[str, ...]] | None) -> set[str]:
    """The layers that compute only the channels a pruned layer of `groups` reads: their cost is in its choice's."""
    return {
        producer for consumer, producers in (groups or {}).items()
        if (choice := choices.get(consumer)) is not None and get(choice.method).prunes_inputs for producer in producers
    }  # fmt: skip


def plan(
    problems: Mapping[str, LayerProblem],
    tables: Mapping[str, CandidateTable],
    budget: Budget,
    *,
    original_costs: Mapping[str, Cost],
    overrides: Mapping[str, Choice] | None = None,
    weights: Mapping[str, float] | None = None,
    groups: Mapping[str, tuple[str, ...]] | None = None,
    pruned_weights: Mapping[str, float] | None = None,
    warn: bool = True,
) -> RankPlan:
    """The method and ranks of every fitted layer (`problems`): `overrides` first, then the budget for the
    rest. `original_costs` holds the cost of every layer the budget counts (fitted or not, in graph order);
    `tables` the candidates of the fitted layers (allocated budgets); `weights` their sensitivities; `groups`
    the layers allocated together (`allocate`), `pruned_weights` their pruned layers' sensitivities; `warn`:
    log a warning when the budget cannot be reached."""
    choices = {name: overrides[name] for name in problems if overrides and name in overrides}
    # the layers computing only the channels a fixed pruned layer reads: their cost is in its choice
    held = sliced(choices, groups)
    choices.update(dict.fromkeys(held & set(problems) - set(choices)))
    managed = [name for name in problems if name not in choices]
    if budget.ratio is None or not managed:
        return RankPlan(choices, budget.ratio)
    unit, managed_names = budget.unit, set(managed)

    def cost(name: str) -> float:
        choice = choices.get(name)
        return choice.cost.of(unit) if choice else original_costs[name].of(unit)

    before = sum(original.of(unit) for original in original_costs.values())
    fixed = sum(cost(name) for name in original_costs if name not in managed_names | held)
    target = budget.ratio * before
    if budget.allocation == "uniform":

        def choose(name, options):
            return options[int(np.argmin([estimate(problems[name], m, r, budget.seed) for m, r in options]))]

        chosen = uniform(
            {name: problems[name].geometry for name in managed},
            {name: methods_for(budget.method, problems[name].geometry) for name in managed},
            unit,
            target,
            fixed,
            budget.multiple,
            choose,
        )
    else:
        chosen = allocate([tables[name] for name in managed], unit, target, fixed, weights, groups, pruned_weights)
    choices.update(chosen)
    reached = fixed + sum(cost(name) for name in managed if name not in sliced(choices, groups))
    if reached > target * 1.0001 and warn:
        logger.warning(
            "the target %s ratio %.3g cannot be reached: the smallest ranks give %.3g (layers that are "
            "skipped or excluded keep their size)",
            unit,
            budget.ratio,
            reached / before,
        )
    return RankPlan(choices, budget.ratio)
