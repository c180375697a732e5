"""Layer kinds: what can be decomposed. One module per kind; `KINDS` maps each ONNX op type to the module
that discovers such nodes (`discover(node, resolver, shapes, consumers) -> Layer | None`,
`shape_names(node)`, `skipped(node, reason) -> Layer`).

To add a kind: a module like conv.py whose layers implement `base.Layer`, and its op types in `KINDS`.
"""

from __future__ import annotations

from types import ModuleType

from . import conv, dense
from .base import NON_FINITE_WEIGHT, POSITION_SEED, GraphSums, Layer, one_layer_model, unique_name
from .constants import ConstantResolver

KINDS: dict[str, ModuleType] = {op_type: kind for kind in (conv, dense) for op_type in kind.OP_TYPES}

__all__ = [
    "KINDS",
    "NON_FINITE_WEIGHT",
    "POSITION_SEED",
    "ConstantResolver",
    "GraphSums",
    "Layer",
    "one_layer_model",
    "unique_name",
]
