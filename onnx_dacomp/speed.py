"""Per-layer latency in onnxruntime: is a layer's chain really faster than the original Conv?

Small layers and CP's depthwise pair are often slower than the dense conv they replace, whatever their MACs.
Each candidate is timed as a one-layer model (the original Conv, and the chain built by `rewrite` from
factors of the chosen ranks; values do not change the speed) on the chosen execution provider.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .geometry import Cost, original_cost
from .latency import session_latency
from .layers import Layer, one_layer_model
from .log import logger, progress
from .methods import Ranks, get, realizations
from .ranks.candidates import CandidateTable
from .ranks.plan import RankPlan
from .report import LayerReport
from .rewrite import replace_layers
from .runtime import create_session, provider_name

MIN_LAYER_MS = 1e-4  # the least a layer's in-context time can be (the baseline may exceed a tiny layer's)


@dataclass(frozen=True)
class LayerTiming:
    """Median ms of one layer alone and of a chain replacing it, at one batch size, on `provider`."""

    original_ms: float
    chain_ms: float
    provider: str


def layer_latency(
    layer: Layer,
    method: str,
    ranks: Ranks,
    *,
    batch: int,
    device: str,
    opset: int,
    threads: int | None = None,
    runs: int = 30,
) -> LayerTiming:
    """Median latency of the original layer and of its chain at `batch` samples."""
    model, feeds = layer.timing_model(batch, opset)
    single = replace(layer, input="x", output="y", weight="W", bias="B" if layer.bias else None)
    solver = get(method)
    shape = layer.geometry.weight_shape
    factors = [solver.placeholder(shape, ranks, np.random.default_rng(g)) for g in range(layer.geometry.group)]
    chain = replace_layers(model, {"y": (single, factors)})
    original_ms, provider = session_latency(model, feeds, device=device, threads=threads, runs=runs)
    chain_ms, _ = session_latency(chain, feeds, device=device, threads=threads, runs=runs)
    return LayerTiming(original_ms, chain_ms, provider)


class LatencyTable:
    """Measured latency (ms) of original layers and of chains on one provider at one batch size, less what a
    one-layer model pays besides the layer (`Layer.timing_baseline`: the run call, the layout conversions in
    and out), which inside the whole model the layer does not cost.

    Without that correction a small layer's timing is mostly overhead: on ResNet-56 at batch 1 (a 0.010-0.022
    ms baseline against layers of 0.03-0.06 ms) the chains at their smallest ranks summed to 73 % of the
    original layers' time while the whole model ran at 0.56x, and `--budget latency --ratio 0.7` asked for
    what looked out of reach: it took those smallest ranks and kept 62.6 % top-1. Corrected, ratio 0.7 kept
    82.95 % (83.20 %) at 0.908x end to end, and 0.5 ran at 0.489x (0.714x before). On layers whose time is
    about the baseline's (ResNet-20's at batch 1) the corrected figures are within noise of zero.

    Layers of the same geometry (channels, kernel, stride, padding, dilation, input size, dtype) share
    their measurements, so a network with many repeated blocks is timed once per distinct layer.
    """

    def __init__(self, *, batch: int, device: str, opset: int, threads: int | None = None):
        self.batch, self.device, self.opset, self.threads = batch, device, opset, threads
        self._measured: dict[tuple, float] = {}
        self.provider = None

    def original(self, layer: Layer) -> float:
        key = (layer.timing_key, None, None)
        if key not in self._measured:
            model, feeds = layer.timing_model(self.batch, self.opset)
            measured, self.provider = session_latency(model, feeds, device=self.device, threads=self.threads)
            self._measured[key] = self._in_context(layer, measured)
        return self._measured[key]

    def chain(self, layer: Layer, method: str, ranks: Ranks) -> float:
        key = (layer.timing_key, method, tuple(ranks))
        if key not in self._measured:
            latency = layer_latency(
                layer, method, ranks, batch=self.batch, device=self.device, opset=self.opset, threads=self.threads
            )
            self._measured[key] = self._in_context(layer, latency.chain_ms)
            self._measured.setdefault((layer.timing_key, None, None), self._in_context(layer, latency.original_ms))
            self.provider = latency.provider
        return self._measured[key]

    def baseline(self, layer: Layer) -> float:
        """The ms of the layer's timing baseline (shared by layers of the same kind and input)."""
        key = (type(layer).__name__, tuple(layer.input_shape[1:]), layer.dtype, "baseline")
        if key not in self._measured:
            model, feeds = layer.timing_baseline(self.batch, self.opset)
            self._measured[key] = session_latency(model, feeds, device=self.device, threads=self.threads)[0]
        return self._measured[key]

    def _in_context(self, layer: Layer, measured: float) -> float:
        # a floor keeps every time positive: a chain never costs nothing
        return max(measured - self.baseline(layer), MIN_LAYER_MS)


def speedup_budget(config):
    """The `CompressConfig` a --speedup search runs with: its ratio counts MACs where it would count
    parameters, which do not follow time (measured latency, --budget latency, stays)."""
    if config.plan.speedup is None or config.plan.budget != "params":
        return config
    logger.info("--speedup: the ratio counts MACs (parameters do not follow time)")
    return config.replace(budget="macs")


@functools.lru_cache(maxsize=None)
def channel_multiple(device: str) -> int:
    """The channel count that a rank should be a multiple of to run at full speed on `device`.

    onnxruntime's CPU provider runs convs in a blocked layout (NCHWc) whose block is 8 or 16 channels,
    depending on the CPU's vector width; a conv with fewer channels than the block drops out of that
    layout and pays a reorder before and after, and larger counts are padded up to the block. The block
    is found by letting onnxruntime optimize 1x1 -> 3x3 -> 1x1 chains of a few widths: the narrowest that
    stays in the blocked layout throughout. CUDA gets 8 (tensor-core tiles); 1 where neither applies.
    """
    for width in (4, 8, 16, 32):
        optimized = _optimized_chain(width, device)
        if optimized is None:
            return 8
        reorders = sum(node.op_type.startswith("Reorder") for node in optimized.graph.node)
        if reorders == 2:  # into the blocked layout once at the input, back once at the output
            return width
    return 1


def _optimized_chain(width: int, device: str) -> onnx.ModelProto | None:
    """The CPU provider's optimized graph of a 64 -> width -> width -> 64 conv chain; None on CUDA."""
    rng = np.random.default_rng(0)
    shapes = {"w0": (width, 64, 1, 1), "w1": (width, width, 3, 3), "w2": (64, width, 1, 1)}
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"]),
        helper.make_node("Conv", ["a", "w1"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w2"], ["y"]),
    ]
    model, _ = one_layer_model(nodes, weights, [1, 64, 8, 8], np.float32, 13)
    if provider_name(create_session(model, device)) != "CPU":
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        create_session(model, "cpu", optimized_path=path)
        return onnx.load(path)


class LayerCosts:
    """Each layer's cost, and its chains', in the budget's terms: parameters and MACs from the geometry and,
    with a `timing` table (the latency budget), the measured latency too.

    `coupled` (pruned layer -> the layers computing its input channels, `channels.input_producers`): those
    layers' costs count with the pruned layer's pruned candidates, in proportion to the channels it reads; and
    not on their own, unless `joint` (the allocation chooses for the group: pruned, or each layer on its own)."""

    def __init__(
        self,
        layers: Mapping[str, Layer],
        timing: LatencyTable | None = None,
        coupled: Mapping | None = None,
        joint: bool = False,
    ):
        self.layers, self.timing, self.coupled, self.joint = layers, timing, dict(coupled or {}), joint
        self.producers = {name for names in self.coupled.values() for name in names}

    def original(self, name: str) -> Cost:
        if self.joint:
            return self._own(name)
        if name in self.producers:
            return Cost(0, 0)
        return self._sum([self._own(name), *(self._own(producer) for producer in self.coupled.get(name, ()))])

    def chain(self, name: str, method: str, ranks: Ranks) -> Cost:
        layer = self.layers[name]
        cost = get(method).cost(layer.geometry, ranks)
        if get(method).prunes_inputs and name in self.coupled:
            # the layer on fewer channels, the producers computing only those: the Gather a one-layer timing
            # model would run goes, so the time is the layer's in proportion (a ConvNeXt MLP's pruned layer timed
            # with its Gather came out barely faster, 1.47 ms against 1.58, and the plan pruned two layers hard)
            share = ranks[0] / layer.geometry.in_channels
            latency = 0.0 if self.timing is None else self.timing.original(layer) * share
            return self._sum([cost._replace(latency=latency), *(self._own(p, share) for p in self.coupled[name])])
        return cost if self.timing is None else cost._replace(latency=self.timing.chain(layer, method, ranks))

    def _own(self, name: str, share: float = 1.0) -> Cost:
        """A layer's own cost, or `share` of its output channels' (weights, bias and MACs all follow them)."""
        layer = self.layers[name]
        cost = original_cost(layer.geometry)
        latency = 0.0 if self.timing is None else self.timing.original(layer) * share
        return Cost(round(cost.params * share), round(cost.macs * share), latency)

    @staticmethod
    def _sum(costs) -> Cost:
        return Cost(*(sum(values) for values in zip(*costs)))

    def timed(self, table: CandidateTable) -> CandidateTable:
        """The table with every candidate's cost measured (shared by layers of the same geometry) and coupled."""
        if self.timing is None and table.name not in self.coupled:
            return table
        original = self.original(table.name)
        candidates = tuple(replace(c, cost=self.chain(table.name, c.method, c.ranks)) for c in table.candidates)
        return replace(table, original=original, candidates=candidates)

    def measure(self, layers, chosen: Mapping, show_progress: bool = True) -> None:
        """Time every layer of known size and the chain `chosen[name]` replacing it (where there is one), with
        progress: the report's rows then find the figures (layers of one geometry share them)."""
        timed = [layer for layer in layers if layer.geometry is not None]
        with progress(len(timed), "timing layers and chains", "layer", enabled=show_progress) as bar:
            for layer in timed:
                self.timing.original(layer)
                if (choice := chosen.get(layer.name)) is not None:
                    self.timing.chain(layer, choice.method, choice.ranks)
                bar.update()

    def timed_row(self, row: LayerReport, choice) -> LayerReport:
        """The report row with the measured latency of the layer and of what replaces it (`choice`, or None)."""
        before = self.original(row.name).latency
        if choice is None:
            return replace(row, latency_before=before, latency_after=before)
        layer = self.layers[row.name]
        if self.joint and get(choice.method).prunes_inputs and row.name in self.coupled:
            # its own share: the rows of the layers computing its input show theirs (`report.sliced_rows`)
            return replace(
                row, latency_before=before, latency_after=before * choice.ranks[0] / layer.geometry.in_channels
            )
        # a plan made in another unit has no measured chain (0): its timing is looked up or measured now
        after = choice.cost.latency or self.timing.chain(layer, choice.method, choice.ranks)
        return replace(row, latency_before=before, latency_after=after)


def faster_realizations(
    plan: RankPlan, costs: LayerCosts, fixed, decided: dict, compare: Callable[[RankPlan, RankPlan], float]
) -> RankPlan:
    """The plan with its chains in the realization of their fits (`methods.realizations`: CP's spatial part as
    1-D depthwise convs or as one fused kxk conv, the same function) that runs the whole model faster; layers
    named in --ranks keep their method.

    The choice is made inside the model: one-layer timings chose the separable chain for 23 of ResNet-56's 51
    CP layers at batch 32, while in the model every fused chain ran faster than its separable twin (0.83-0.97x
    by onnxruntime's profile) and the whole model at 0.912x. So per group of planned chains with the same method
    and kernel, `compare(plan, other)` times the model of `plan` against that of `other`, the group in another
    realization (their latency ratio, other / plan), and the group takes the fastest. `decided` keeps each
    group's choice: a search's later plans follow its first, and are not timed twice."""
    groups: dict[tuple, list[str]] = {}
    for name, choice in plan.choices.items():
        geometry = costs.layers[name].geometry
        if choice is not None and name not in fixed and len(realizations(choice.method, geometry)) > 1:
            groups.setdefault((choice.method, geometry.kernel), []).append(name)
    for (method, kernel), names in groups.items():
        if (method, kernel) not in decided:
            options = realizations(method, costs.layers[names[0]].geometry)
            ratios = {other: compare(plan, realized_as(plan, costs, names, other)) for other in options[1:]}
            fastest = min(ratios, key=ratios.get)
            decided[method, kernel] = fastest if ratios[fastest] < 1 else method
            logger.info(
                "%s chains of %s kernels in the model: %s; %s kept", method, "x".join(map(str, kernel)),
                ", ".join(f"as {other} {ratio:.3f} of the time" for other, ratio in ratios.items()),
                decided[method, kernel],
            )  # fmt: skip
        plan = realized_as(plan, costs, names, decided[method, kernel])
    return plan


def realized_as(plan: RankPlan, costs: LayerCosts, names, method: str) -> RankPlan:
    """The plan with the chains of `names` in realization `method` (their fits' ranks and errors stay)."""
    choices = dict(plan.choices)
    for name in names:
        if choices[name].method != method:
            choices[name] = replace(choices[name], method=method, cost=costs.chain(name, method, choices[name].ranks))
    return replace(plan, choices=choices)


def keep_faster(plan: RankPlan, layers: Mapping[str, Layer], timing: LatencyTable, fixed) -> tuple[RankPlan, dict]:
    """Keep the original of every layer whose chain is not faster in onnxruntime (layers in `fixed`, named in
    --ranks, always keep their ranks). The budget is not re-spent on the other layers: pushing them further
    to make up for it would trade accuracy for size; the report shows the ratio reached. Returns the plan
    and the reason of each kept layer."""
    reasons = {}
    for name, choice in plan.choices.items():
        if choice is None or name in fixed:
            continue
        layer = layers[name]
        chain_ms, original_ms = timing.chain(layer, choice.method, choice.ranks), timing.original(layer)
        if chain_ms >= original_ms:
            reasons[name] = (
                f"chain not faster ({chain_ms:.3f} vs {original_ms:.3f} ms at batch {timing.batch}, {timing.provider})"
            )
    if reasons:
        logger.info("keeping %d layer(s) whose chain is not faster: %s", len(reasons), ", ".join(reasons))
    return plan.without(reasons), reasons
