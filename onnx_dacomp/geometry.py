"""What a layer's cost depends on, and the cost itself: plain integers, no ONNX (the rank math uses them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple


class Cost(NamedTuple):
    params: int
    macs: int  # per sample
    latency: float = 0.0  # ms, measured on the execution provider (filled in by the caller; 0 if unmeasured)

    def of(self, budget: str) -> float:
        return {"params": self.params, "macs": self.macs, "latency": self.latency}[budget]


@dataclass(frozen=True)
class LayerGeometry:
    """A decomposable layer as the cost formulas see it. Channels are totals; ranks are per group (every group
    gets the same). A dense layer has no kernel (`kernel == ()`) and its positions as one spatial axis."""

    out_channels: int
    in_channels: int
    group: int
    kernel: tuple[int, ...]
    input_spatial: tuple[int, ...]
    output_spatial: tuple[int, ...]
    bias: bool

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    @property
    def group_out(self) -> int:
        return self.out_channels // self.group

    @property
    def group_in(self) -> int:
        return self.in_channels // self.group

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight of one group: (T/G, S/G, *kernel)."""
        return (self.group_out, self.group_in, *self.kernel)


def original_cost(geometry: LayerGeometry) -> Cost:
    g = geometry
    weights = g.out_channels * g.group_in * g.taps
    return Cost(weights + (g.out_channels if g.bias else 0), weights * math.prod(g.output_spatial))


def solver_work(geometry: LayerGeometry) -> int:
    """A layer's solver cost in arbitrary units (eigen- and least-squares problems of the group's fan-in),
    to schedule the largest units first and to judge whether a stage is worth a process pool."""
    g = geometry
    fan_in = g.group_in * g.taps
    return g.group * (fan_in**3 + g.group_out * fan_in**2)
