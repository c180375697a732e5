"""Parameters and multiply-accumulates of a conv and of each chain that can replace it (plain integers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple


class Cost(NamedTuple):
    params: int
    macs: int  # per image
    latency: float = 0.0  # ms, measured on the execution provider (filled in by the caller; 0 if unmeasured)

    def of(self, budget: str) -> float:
        return {"params": self.params, "macs": self.macs, "latency": self.latency}[budget]


@dataclass(frozen=True)
class ConvGeometry:
    """What the costs depend on. Channels are totals; ranks are per group (every group gets the same)."""

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
    def max_ranks(self) -> dict[str, tuple[int, ...]]:
        """The largest rank(s) each method accepts for this layer."""
        return {
            "svd": (min(self.group_out, self.group_in * self.taps),),
            "tucker2": (self.group_out, self.group_in),
            "cp": (self.group_out * self.group_in * self.taps,),
        }


def original_cost(geometry: ConvGeometry) -> Cost:
    g = geometry
    weights = g.out_channels * g.group_in * g.taps
    return Cost(weights + (g.out_channels if g.bias else 0), weights * math.prod(g.output_spatial))


def chain_cost(geometry: ConvGeometry, method: str, ranks: tuple[int, ...]) -> Cost:
    """Cost of the chain of `method` at per-group `ranks` (DESIGN.md 2.1-2.3 realizations).

    A 1x1 conv placed before the kernel conv runs at the input resolution (before the stride).
    """
    g = geometry
    inputs, outputs = math.prod(g.input_spatial), math.prod(g.output_spatial)
    if method == "svd":
        (rank,) = ranks
        layers = [(rank * g.group_in * g.taps, outputs), (g.group_out * rank, outputs)]
    elif method == "tucker2":
        # a factor at full rank is folded into the core (rewrite.py), so its 1x1 conv disappears
        rank_out, rank_in = ranks
        layers = [(rank_out * rank_in * g.taps, outputs)]
        if rank_in < g.group_in:
            layers.append((rank_in * g.group_in, inputs))
        if rank_out < g.group_out:
            layers.append((g.group_out * rank_out, outputs))
    elif method == "cp":
        (rank,) = ranks
        layers = [(rank * g.group_in, inputs)]
        for axis, size in enumerate(g.kernel):
            # the depthwise conv along `axis` leaves axes after it at the input resolution
            spatial = g.output_spatial[: axis + 1] + g.input_spatial[axis + 1 :]
            layers.append((rank * size, math.prod(spatial)))
        layers.append((g.group_out * rank, outputs))
    else:
        raise ValueError(f"unknown method {method!r}")
    params = g.group * sum(weights for weights, _ in layers)
    macs = g.group * sum(weights * positions for weights, positions in layers)
    return Cost(params + (g.out_channels if g.bias else 0), macs)
