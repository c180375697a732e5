"""What `compress` should do: one frozen config object, built by the CLI and by Python callers alike."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import UserError

METHODS = ("tucker2", "cp", "svd", "auto")
NORMS = ("sigma", "frobenius")
BUDGETS = ("params", "macs", "latency")
ALLOCATIONS = ("allocated", "uniform")


@dataclass(frozen=True)
class CompressConfig:
    """Options of one compression run.

    `ratio`: size of the model's convolution part after compression relative to before (parameters, or MACs with
    `budget="macs"`); None compresses only the layers named in `ranks`. `ranks` maps layer names (as `inspect`
    prints them) to exact ranks: an int (svd/cp rank, or R_T = R_S for tucker2), a pair (R_T, R_S) for tucker2,
    or `{"method": ..., "ranks": ...}`. `exclude`: glob patterns of layer names left untouched. `rank_multiple`:
    allocated ranks are multiples of this on channel axes at least as wide; None takes the execution provider's
    channel block (`speed.channel_multiple`), below which convs leave onnxruntime's fast blocked layout.
    `budget="latency"`: the ratio counts the summed latency of the layers, each candidate timed in onnxruntime
    at `speed_batch` images. `require_speedup`: time each chosen chain against its original layer in onnxruntime
    at `speed_batch` images and keep the original where the chain is not faster; with it or `benchmark`, the
    report holds the end-to-end latency of both models. `holdout`: samples of the data kept out of calibration
    for verification; `limit`: at most this many calibration samples (after the held-out ones). `bias_refit`:
    fit in the centered covariance and absorb the mean error into the bias. `sensitivity`: weight each layer's
    error in the allocation by how much of it reaches the model output, measured once per layer in onnxruntime
    on calibration samples (needs re-readable data and the DA norm; otherwise errors count equally).
    `propagate`: fit each layer to the original output from its input in the model compressed so far. `max_drop`
    (top-1 points) / `min_agreement` (0..1): instead of `ratio`, search the smallest ratio whose model meets
    this on the held-out data.
    """

    method: str = "tucker2"
    norm: str = "sigma"
    ratio: float | None = 0.5
    budget: str = "params"
    allocation: str = "allocated"
    ranks: Mapping[str, object] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    rank_multiple: int | None = None
    device: str = "auto"
    seed: int = 0
    holdout: int = 500
    limit: int | None = None
    max_iter: int = 100
    bias_refit: bool = False
    propagate: bool = False
    sensitivity: bool = True
    max_drop: float | None = None
    min_agreement: float | None = None
    require_speedup: bool = False
    benchmark: bool = False
    speed_batch: int = 1
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        for name, value, allowed in (
            ("method", self.method, METHODS),
            ("norm", self.norm, NORMS),
            ("budget", self.budget, BUDGETS),
            ("allocation", self.allocation, ALLOCATIONS),
        ):
            if value not in allowed:
                raise UserError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise UserError(f"--ratio must lie in (0, 1], got {self.ratio}")
        if self.max_drop is not None and self.min_agreement is not None:
            raise UserError("give --max-drop or --min-agreement, not both")
        if self.max_drop is not None and not 0 <= self.max_drop <= 100:
            raise UserError(f"--max-drop is in top-1 points (0 to 100), got {self.max_drop}")
        if self.min_agreement is not None and not 0 < self.min_agreement <= 1:
            raise UserError(f"--min-agreement must lie in (0, 1], got {self.min_agreement}")
        if self.ratio is None and not self.ranks and self.max_drop is None and self.min_agreement is None:
            raise UserError("give a target --ratio, --max-drop, --min-agreement or exact --ranks")
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise UserError(f"--rank-multiple must be a positive integer, got {self.rank_multiple}")
        if self.holdout < 0:
            raise UserError(f"--holdout must be >= 0, got {self.holdout}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be a positive integer, got {self.limit}")
        if self.speed_batch < 1:
            raise UserError(f"--speed-batch must be a positive integer, got {self.speed_batch}")
        if self.budget == "latency" and self.allocation != "allocated":
            raise UserError("--budget latency needs --allocation allocated (uniform ranks follow parameter counts)")
        if self.propagate and self.norm != "sigma":
            raise UserError("--propagate is part of the distribution-aware fit: it needs --norm sigma")
        if self.max_iter < 0:
            raise UserError(f"max_iter must be >= 0, got {self.max_iter}")
