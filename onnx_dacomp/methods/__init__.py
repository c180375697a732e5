"""The method registry: one entry per decomposition method (`base.Method`); the rest of the package looks
methods up here by name and never compares method names itself.

To add a method: a module with a `Method` subclass next to these, and one line in `METHODS`.
"""

from __future__ import annotations

from ..decompose.factors import Factors
from ..geometry import Cost, LayerGeometry
from .base import Method, Ranks, Stage
from .cp import CP, FusedCP
from .prune import Prune
from .svd import SVD
from .tucker2 import Tucker2

METHODS: dict[str, Method] = {method.name: method for method in (SVD(), Tucker2(), CP(), FusedCP(), Prune())}
AUTO = "auto"  # every automatic method that applies, chosen per layer by the allocation
CHOICES = (*METHODS, AUTO)

__all__ = [
    "AUTO", "CHOICES", "METHODS", "Method", "Ranks", "Stage", "chain_cost", "get", "method_of", "methods_for",
    "pruning_method", "realizations",
]  # fmt: skip


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None


def methods_for(choice: str, geometry: LayerGeometry) -> tuple[str, ...]:
    """The methods tried on a layer for the configured `choice` (a method name or `auto`, which leaves out the
    variants and the methods not `automatic`). A method that does not apply (Tucker-2 and CP on a 1x1 conv, which
    is a matrix) gives way to those that do; a variant first to the method it realizes (`cp-fused` on a 1-D kernel:
    `cp`)."""
    applicable = tuple(name for name, method in METHODS.items() if method.applies(geometry))
    if choice == AUTO:
        return tuple(name for name in applicable if METHODS[name].variant_of is None and METHODS[name].automatic)
    method = get(choice)
    if method.applies(geometry):
        return (choice,)
    if method.variant_of is not None and get(method.variant_of).applies(geometry):
        return (method.variant_of,)  # a variant gives way to the method it realizes
    return applicable[:1]


def pruning_method(geometry: LayerGeometry) -> str | None:
    """The method that prunes the layer's input channels, where one applies: `auto` offers it for layers whose
    input channels other layers compute, together with those (`ranks.allocate.Joint`)."""
    return next((n for n, m in METHODS.items() if m.prunes_inputs and m.applies(geometry)), None)


def realizations(name: str, geometry: LayerGeometry) -> tuple[str, ...]:
    """The methods that realize the fits of method `name` on the layer as different chains (`name` first)."""
    family = METHODS[name].variant_of or name
    others = [n for n, m in METHODS.items() if n != name and (m.variant_of or n) == family and m.applies(geometry)]
    return (name, *others)


def method_for_ranks(count: int, default: str) -> str:
    """The method a rank tuple of `count` entries implies: the only one taking that many, else `default`."""
    taking = [name for name, method in METHODS.items() if method.rank_count == count]
    return taking[0] if len(taking) == 1 else default


def method_of(factors: Factors) -> Method:
    for method in METHODS.values():
        if type(factors) is method.factors_type:
            return method
    raise TypeError(f"not a factor container: {type(factors).__name__}")


def chain_cost(geometry: LayerGeometry, name: str, ranks: Ranks) -> Cost:
    return get(name).cost(geometry, ranks)
