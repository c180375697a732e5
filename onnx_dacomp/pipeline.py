"""The main job: load -> targets -> calibrate -> candidate ranks -> decompose -> rewrite -> verify.

`compress(model_or_path, data=..., config=...)` returns the new model and a report; the CLI's `compress`
command builds the same `CompressConfig` and saves the model.
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from .calibrate.collect import MAX_PATCH_SIZE, collect_statistics
from .calibrate.cross import collect_cross_statistics
from .calibrate.patches import patch_size
from .calibrate.sources import IterableSource, Source, open_source
from .calibrate.statistics import Statistics
from .config import CompressConfig
from .errors import UserError
from .evaluate import Comparison, benchmark_batches, compare_models, measure_latency
from .fit import LayerFit, LayerProblem, fit_layer
from .load import default_opset, load_model
from .log import logger
from .ranks.allocate import Choice, allocate, uniform
from .ranks.candidates import Candidate, CandidateTable, candidate_table, estimate_errors, methods_for
from .ranks.costs import ConvGeometry, Cost, chain_cost, original_cost
from .report import CompressionReport, LayerReport
from .rewrite import replace_convs
from .sensitivity import measure_sensitivities, probe_batches, probe_fit
from .shapes import concrete_input_shapes, graph_inputs
from .speed import LatencyTable, channel_multiple
from .targets import NON_FINITE_WEIGHT, ConstantResolver, ConvLayer, find_targets, read_weights

SEARCH_PROBES = 10  # bisection steps of the accuracy-targeted ratio search at most
SEARCH_TOLERANCE = 0.01  # ... stopping once the bracket is this narrow
NATURAL_NOTICE = (
    "no --data or --stats given: calibrating on crops of natural photographs (--data natural); "
    "data from the model's own domain fits better"
)


@dataclass(frozen=True, eq=False)
class CompressionResult:
    model: onnx.ModelProto
    report: CompressionReport


def compress(
    model: onnx.ModelProto | str | os.PathLike,
    data: Source | Iterable | str | None = None,
    config: CompressConfig = CompressConfig(),
    *,
    statistics: Statistics | None = None,
    progress: bool = True,
) -> CompressionResult:
    """Compress `model` (a ModelProto, never modified, or a path) as `config` says.

    `data`: calibration data (a `Source`, a spec such as an image folder or `.npz` path, or any iterable of
    `{input_name: array}` batches); None calibrates on crops of natural photographs. Sources of known size
    give the first `config.holdout` samples to verification and calibrate on the rest. `statistics`:
    precomputed patch statistics of this model (then `data`, if given, serves verification only).
    `norm="frobenius"` needs neither.
    """
    clock = {"start": time.perf_counter()}
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    scan = find_targets(model, config.input_shapes)
    if not scan.layers:
        raise UserError("the model has no Conv layers: nothing to compress")
    weights = read_weights(model, scan.targets)
    _check_rank_names(config, scan.layers)

    broken = [layer.name for layer in scan.layers if layer.skip_reason == NON_FINITE_WEIGHT]
    if broken:
        raise UserError(
            f"layer {broken[0]} has NaN or Inf weights: the model itself is broken (its outputs are not finite); "
            f"repair or re-export it"
        )
    reasons: dict[str, str] = {}
    for layer in scan.layers:
        if not layer.decomposable:
            reasons[layer.name] = layer.skip_reason
        elif any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in config.exclude):
            reasons[layer.name] = "excluded (--exclude)"
        elif layer.output_shape is None or layer.input_shape is None:
            raise UserError(f"layer {layer.name} has no static shape: pass --input-shape NAME:NxCxHxW")
        elif config.norm == "sigma" and patch_size(layer) > MAX_PATCH_SIZE:
            reasons[layer.name] = f"patch length {patch_size(layer)} too large for a covariance"
    fitted = [layer for layer in scan.targets if layer.name not in reasons]
    if config.rank_multiple is None:
        config = replace(config, rank_multiple=channel_multiple(config.device))
        logger.info("ranks in multiples of %d (the execution provider's channel block)", config.rank_multiple)

    if config.norm == "sigma" and fitted and statistics is None and data is None:
        logger.info(NATURAL_NOTICE)
        data = "natural"
    calibration, holdout = _split(model, data, config)
    if config.norm == "sigma" and fitted:
        if statistics is None:
            if calibration is None:
                raise UserError("the calibration data left no samples to calibrate on after the held-out part")
            statistics = collect_statistics(model, fitted, calibration, device=config.device, progress=progress)
        else:
            statistics.check_model(fitted, weights)
    clock["calibrate"] = time.perf_counter()

    job = _Job(model, config, scan.layers, fitted, weights, statistics, reasons, calibration, progress)
    ratio, search = config.ratio, None
    if config.max_drop is not None or config.min_agreement is not None:
        ratio, search = _search_ratio(job, holdout)
    plan = job.plan(ratio)
    if config.require_speedup:
        plan = _faster_plan(job, plan)
    clock["ranks"] = time.perf_counter()
    new_model, layer_reports = job.build(plan, propagate=config.propagate)
    clock["decompose"] = time.perf_counter()

    verification = propagation = None
    if holdout is not None:
        verification = compare_models(model, new_model, holdout, device=config.device, progress=progress)
    if config.propagate and verification is not None:
        # propagation minimizes each layer's output error, which need not lower the model's: verify both
        plain_model, plain_reports = job.build(plan, propagate=False)
        plain = compare_models(model, plain_model, holdout, device=config.device, progress=progress)
        propagation = {"kept": "propagated", "propagated": asdict(verification), "plain": asdict(plain)}
        if _preference(plain, config, search) > _preference(verification, config, search):
            logger.warning(
                "the propagated fit verifies worse than the plain fit on the held-out data (top-1 agreement "
                "%.4f vs %.4f, output error %.4f vs %.4f): keeping the plain fit",
                verification.top1_agreement,
                plain.top1_agreement,
                verification.rel_output_error,
                plain.rel_output_error,
            )
            new_model, layer_reports, verification = plain_model, plain_reports, plain
            propagation["kept"] = "plain"
    latency = ()
    if config.require_speedup or config.benchmark:
        sizes = sorted({1, config.speed_batch})
        batches = benchmark_batches(holdout or calibration, sizes) if holdout or calibration else None
        batches = batches or [_random_batch(model, size, config) for size in sizes]
        latency = tuple(measure_latency(model, new_model, batch, device=config.device) for batch in batches)
    clock["verify"] = time.perf_counter()

    geometries = job.geometries

    for layer in scan.layers:
        if layer.name not in layer_reports and layer.name in geometries:
            reason = reasons.get(layer.name) or _kept_reason(layer, geometries[layer.name], config)
            layer_reports[layer.name] = _kept_report(layer, geometries[layer.name], reason)
    if config.budget == "latency":
        layer_reports = {name: job.timed_report(report, plan.get(name)) for name, report in layer_reports.items()}
    layer_reports = {name: replace(r, sensitivity=job.sensitivity.get(name)) for name, r in layer_reports.items()}
    report = CompressionReport(
        layers=tuple(layer_reports[layer.name] for layer in scan.layers if layer.name in layer_reports),
        error_norm="sigma" if statistics is not None and config.norm == "sigma" else "frobenius",
        budget=config.budget,
        target_ratio=ratio,
        verification=verification,
        search=search,
        propagation=propagation,
        latency=latency,
        calibration=statistics.source if statistics is not None else None,
        seconds={
            stage: round(clock[stage] - clock[previous], 3)
            for previous, stage in zip(
                ["start", "calibrate", "ranks", "decompose"], ["calibrate", "ranks", "decompose", "verify"]
            )
        },
        settings={k: v for k, v in asdict(config).items() if k not in ("input_shapes",)},
    )
    logger.info("%s", report.table())
    return CompressionResult(new_model, report)


def _split(model, data, config: CompressConfig) -> tuple[Source | Iterable | None, Source | None]:
    """(calibration data, held-out verification data). Only sources of known size can be split."""
    if data is None:
        return None, None
    if isinstance(data, (str, os.PathLike)):
        data = open_source(data, model, input_shapes=config.input_shapes, seed=config.seed)
    size = getattr(data, "size", None)
    splittable = isinstance(data, Source) and size is not None and type(data).subset is not Source.subset
    if not splittable:
        if config.limit is not None:
            raise UserError("--limit needs a data source of known size (an image folder or .npz/.npy files)")
        return data, None
    holdout = min(config.holdout, size // 5)
    if config.holdout and holdout < config.holdout:
        logger.info("holding out %d of %d samples for verification (a fifth of the data)", holdout, size)
    if holdout == 0:
        return data.subset(0, config.limit), None
    return data.subset(holdout, config.limit), data.subset(0, holdout)


def _geometry(layer: ConvLayer) -> ConvGeometry:
    spatial = len(layer.kernel_shape)
    return ConvGeometry(
        out_channels=layer.out_channels,
        in_channels=layer.in_channels,
        group=layer.group,
        kernel=tuple(layer.kernel_shape),
        input_spatial=tuple(layer.input_shape[2:]) if layer.input_shape else (1,) * spatial,
        output_spatial=tuple(layer.output_shape[2:]) if layer.output_shape else (1,) * spatial,
        bias=bool(layer.bias),
    )


def _waves(model: onnx.ModelProto, layers: list[ConvLayer]) -> list[list[ConvLayer]]:
    """`layers` grouped by depth: a layer's wave comes after the waves of every layer upstream of it."""
    producers = {output: node for node in model.graph.node for output in node.output}
    names = {layer.output: layer.name for layer in layers}
    depth: dict[str, int] = {}

    def upstream(tensor: str) -> set[str]:
        found, pending, seen = set(), [tensor], set()
        while pending:
            name = pending.pop()
            if name in seen or name not in producers:
                continue
            seen.add(name)
            if name in names:
                found.add(names[name])
                continue  # that layer's own depth covers what lies before it
            pending.extend(producers[name].input)
        return found

    for layer in layers:  # graph order is topological
        depth[layer.name] = 1 + max((depth[name] for name in upstream(layer.input)), default=-1)
    return [[layer for layer in layers if depth[layer.name] == level] for level in sorted(set(depth.values()))]


def _biases(model: onnx.ModelProto, layers) -> dict[str, np.ndarray | None]:
    resolver = ConstantResolver(model.graph)
    return {layer.name: np.asarray(resolver.value(layer.bias), np.float64) if layer.bias else None for layer in layers}


class _Job:
    """One compression run's fixed inputs and caches: candidate tables and plain layer fits are computed
    once and reused by every plan (the ratio search and the speed checks probe several plans)."""

    def __init__(self, model, config, layers, fitted, weights, statistics, reasons, calibration, progress):
        self.model, self.config, self.layers, self.fitted = model, config, layers, fitted
        self.statistics, self.reasons, self.calibration, self.progress = statistics, reasons, calibration, progress
        self.geometries = {layer.name: _geometry(layer) for layer in layers if layer.params is not None}
        biases = _biases(model, fitted)
        self.problems = {
            layer.name: LayerProblem.plain(layer, weights[layer.name], biases[layer.name], statistics, config)
            for layer in fitted
        }
        self.tables: dict[str, CandidateTable] = {}
        self.fits: dict[tuple, LayerFit] = {}
        self.batches = None
        opset = default_opset(model) or 17
        self.latency = LatencyTable(batch=config.speed_batch, device=config.device, opset=opset)
        self.by_name = {layer.name: layer for layer in layers}
        self.sensitivity: dict[str, float] = {}
        self.unweighted_notice = False

    def sensitivities(self, layers: list[ConvLayer]) -> dict[str, float] | None:
        """Measured output sensitivity of each layer (sensitivity.py), the allocation's weights; None where
        they cannot be measured (Frobenius fit, no re-readable calibration data, or switched off)."""
        config = self.config
        if not config.sensitivity or config.norm != "sigma":
            return None
        missing = [layer for layer in layers if layer.name not in self.sensitivity]
        rereadable = isinstance(self.calibration, (list, tuple)) or (
            isinstance(self.calibration, Source) and not isinstance(self.calibration, IterableSource)
        )
        if missing and not rereadable:
            if not self.unweighted_notice:
                logger.info("no re-readable calibration data: layer errors are not weighted by output sensitivity")
                self.unweighted_notice = True
            return None
        if missing:
            probes = {}
            for layer in missing:
                fit = probe_fit(self.problems[layer.name], self.geometries[layer.name], config)
                probes[layer.name] = (layer, fit.factors, fit.bias, fit.rel_error)
            with self._bar(len(probes), "layer sensitivity") as bar:
                batches = probe_batches(self.calibration)
                self.sensitivity.update(
                    measure_sensitivities(self.model, probes, batches, device=config.device, progress=bar)
                )
        return {layer.name: self.sensitivity[layer.name] for layer in layers}

    def timed_report(self, report: LayerReport, choice: Choice) -> LayerReport:
        """The report with the measured latency of the layer and of what replaces it."""
        if report.name not in self.geometries:
            return report
        before = self._cost(self.by_name[report.name]).latency
        after = choice.cost.latency if choice is not None and report.method is not None else before
        return replace(report, latency_before=before, latency_after=after)

    def _cost(self, layer, method: str | None = None, ranks=None) -> Cost:
        """Cost of the layer (method None) or of its chain; with the latency budget, measured latency too."""
        geometry = self.geometries[layer.name]
        cost = original_cost(geometry) if method is None else chain_cost(geometry, method, ranks)
        if self.config.budget != "latency":
            return cost
        latency = self.latency.original(layer) if method is None else self.latency.chain(layer, method, ranks)
        return cost._replace(latency=latency)

    def _bar(self, total: int, description: str):
        return tqdm(total=total, desc=description, unit="layer", disable=None if self.progress else True, leave=False)

    def _estimate(self, name: str, method: str, ranks) -> float:
        problem = self.problems[name]
        return estimate_errors(
            method,
            problem.targets,
            problem.fit_sigmas,
            [ranks],
            reference_sigmas=problem.reference_sigmas,
            seed=self.config.seed,
        )[0]

    def plan(self, ratio: float | None, keep=frozenset()) -> dict[str, Choice]:
        """The method and ranks of every fitted layer: --ranks overrides, then the budget `ratio` for the
        rest, except the layers in `keep` (left as they are)."""
        config, geometries, plan = self.config, self.geometries, {}
        for layer in self.fitted:
            if layer.name in config.ranks:
                method, ranks = _override(layer.name, config.ranks[layer.name], config.method, geometries[layer.name])
                cost = self._cost(layer, method, ranks)
                plan[layer.name] = Candidate(method, ranks, cost, self._estimate(layer.name, method, ranks))
        managed = [layer for layer in self.fitted if layer.name not in plan and layer.name not in keep]
        if ratio is None or not managed:
            return plan
        managed_names = {layer.name for layer in managed}
        budget = config.budget

        def cost(layer) -> float:
            choice = plan.get(layer.name)
            return choice.cost.of(budget) if choice else self._cost(layer).of(budget)

        counted = [layer for layer in self.layers if layer.name in geometries]
        before = sum(self._cost(layer).of(budget) for layer in counted)
        fixed = sum(cost(layer) for layer in counted if layer.name not in managed_names)
        target = ratio * before
        if config.allocation == "uniform":

            def choose(name, options):
                return options[int(np.argmin([self._estimate(name, m, r) for m, r in options]))]

            chosen = uniform(
                {layer.name: geometries[layer.name] for layer in managed},
                {layer.name: methods_for(config.method, geometries[layer.name]) for layer in managed},
                budget,
                target,
                fixed,
                config.rank_multiple,
                choose,
            )
        else:
            missing = [layer for layer in managed if layer.name not in self.tables]
            with self._bar(len(missing), "rank candidates") as bar:
                for layer in missing:
                    problem = self.problems[layer.name]
                    table = candidate_table(
                        layer.name,
                        geometries[layer.name],
                        problem.targets,
                        problem.fit_sigmas,
                        config.method,
                        reference_sigmas=problem.reference_sigmas,
                        multiple=config.rank_multiple,
                        seed=config.seed,
                    )
                    if budget == "latency":  # every candidate timed (shared by layers of the same geometry)
                        timed = (replace(c, cost=self._cost(layer, c.method, c.ranks)) for c in table.candidates)
                        table = replace(table, original=self._cost(layer), candidates=tuple(timed))
                    self.tables[layer.name] = table
                    bar.update()
            weights = self.sensitivities(managed)
            chosen = allocate([self.tables[layer.name] for layer in managed], budget, target, fixed, weights)
        plan.update(chosen)
        reached = fixed + sum(cost(layer) for layer in managed)
        if reached > target * 1.0001:
            logger.warning(
                "the target %s ratio %.3g cannot be reached: the smallest ranks give %.3g (layers that are "
                "skipped or excluded keep their size)",
                budget,
                ratio,
                reached / before,
            )
        return plan

    def build(self, plan: dict[str, Choice], *, propagate: bool):
        """The compressed model of `plan` and the reports of its layers. With `propagate`, layers are fitted
        in waves (each wave's inputs depend only on earlier waves) on the inputs of the model so far."""
        chosen = [layer for layer in self.fitted if plan.get(layer.name) is not None]
        if propagate and chosen and self.batches is None:
            if self.calibration is None:
                raise UserError("--propagate needs calibration data (--data): it runs the partially compressed model")
            self.batches = list(self.calibration)
        new_model, reports = self.model, {}
        with self._bar(len(chosen), "decomposing") as bar:
            for wave in _waves(self.model, chosen) if propagate else [chosen]:
                if propagate:
                    cross = collect_cross_statistics(
                        self.model, new_model, wave, self.batches, device=self.config.device
                    )
                replacements = {}
                for layer in wave:
                    choice = plan[layer.name]
                    if propagate:
                        problem = LayerProblem.propagated(
                            self.problems[layer.name],
                            self.statistics.layers[layer.name],
                            cross[layer.name],
                            self.config.bias_refit,
                        )
                        fit = fit_layer(problem, choice, self.config)
                    else:
                        key = (layer.name, choice.method, choice.ranks)
                        if key not in self.fits:
                            self.fits[key] = fit_layer(self.problems[layer.name], choice, self.config)
                        fit = self.fits[key]
                    replacements[layer.output] = (layer, fit.factors, fit.bias)
                    reports[layer.name] = _layer_report(layer, self.geometries[layer.name], choice, fit)
                    logger.debug("%s: %s %s, rel. error %.4g", layer.name, choice.method, choice.ranks, fit.rel_error)
                    bar.update()
                new_model = replace_convs(new_model, replacements)
        return new_model, reports


def _preference(comparison: Comparison, config: CompressConfig, search) -> tuple:
    """Order of held-out results: meeting the search target first, then top-1 agreement, then output error."""
    return (search is None or _meets(comparison, config), comparison.top1_agreement, -comparison.rel_output_error)


def _meets(comparison: Comparison | None, config: CompressConfig) -> bool:
    if comparison is None:
        return False
    if config.max_drop is not None:
        return comparison.top1_drop is not None and 100 * comparison.top1_drop <= config.max_drop
    return comparison.top1_agreement >= config.min_agreement


def _search_ratio(job: _Job, holdout: Source | None) -> tuple[float, dict]:
    """The smallest global ratio whose model meets --max-drop / --min-agreement on the held-out data, by
    bisection over the allocation. Each probe reuses the statistics, the candidate tables and the cached
    layer fits: one rewrite and one evaluation (the plain fit; --propagate applies to the final model)."""
    config = job.config
    if holdout is None:
        raise UserError("--max-drop/--min-agreement need held-out data: pass --data and a --holdout above 0")
    probes = []
    low, high = 0.0, 1.0  # ratio 1 keeps every layer: it meets any target
    for _ in range(SEARCH_PROBES):
        ratio = (low + high) / 2
        candidate, _ = job.build(job.plan(ratio), propagate=False)
        comparison = compare_models(job.model, candidate, holdout, device=config.device, progress=False)
        if config.max_drop is not None and comparison.top1_drop is None:
            raise UserError("--max-drop needs labeled data (class folders, .npz with labels); use --min-agreement")
        met = _meets(comparison, config)
        probes.append(
            {"ratio": ratio, "top1_drop": comparison.top1_drop, "top1_agreement": comparison.top1_agreement, "met": met}
        )
        logger.info(
            "probe at ratio %.4f: top-1 agreement %.4f, top-1 drop %s: %s",
            ratio,
            comparison.top1_agreement,
            "n/a" if comparison.top1_drop is None else f"{100 * comparison.top1_drop:.2f} points",
            "meets the target" if met else "misses it",
        )
        low, high = (low, ratio) if met else (ratio, high)
        if high - low < SEARCH_TOLERANCE:
            break
    if config.max_drop is not None:
        target = f"top-1 drop <= {config.max_drop} points"
    else:
        target = f"top-1 agreement >= {config.min_agreement}"
    logger.info("ratio search: %s met at ratio %.4f after %d probes", target, high, len(probes))
    return high, {"target": target, "ratio": high, "probes": probes}


def _faster_plan(job: _Job, plan: dict[str, Choice]) -> dict[str, Choice]:
    """Keep the original of every layer whose chain is not faster in onnxruntime (a layer named in --ranks
    always keeps its ranks). The budget is not re-spent on the other layers: pushing them further to make
    up for it would trade accuracy for size; the report shows the ratio reached."""
    config, timing = job.config, job.latency
    kept = []
    for name, choice in plan.items():
        if choice is None or name in config.ranks:
            continue
        layer = job.by_name[name]
        chain_ms, original_ms = timing.chain(layer, choice.method, choice.ranks), timing.original(layer)
        if chain_ms >= original_ms:
            kept.append(name)
            job.reasons[name] = (
                f"chain not faster ({chain_ms:.3f} vs {original_ms:.3f} ms at batch {timing.batch}, {timing.provider})"
            )
    if kept:
        logger.info("keeping %d layer(s) whose chain is not faster: %s", len(kept), ", ".join(kept))
    return {name: None if name in kept else choice for name, choice in plan.items()}


def _random_batch(model: onnx.ModelProto, size: int, config: CompressConfig) -> dict[str, np.ndarray]:
    """A random input batch for timing when no data was given (latency does not depend on the values)."""
    shapes = concrete_input_shapes(model, config.input_shapes)
    if shapes is None:
        raise UserError("timing the models needs fixed input dims: pass --input-shape or --data")
    rng = np.random.default_rng(config.seed)
    batch = {}
    for value in graph_inputs(model):
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        batch[value.name] = rng.standard_normal((size, *shapes[value.name][1:])).astype(dtype)
    return batch


def _override(name: str, spec, default_method: str, geometry: ConvGeometry) -> tuple[str, tuple[int, ...]]:
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
        method = "tucker2" if len(ranks) == 2 else methods_for(default_method, geometry)[0]
        if method == "auto":
            method = "tucker2"
    if method not in ("svd", "tucker2", "cp"):
        raise UserError(f"--ranks entry for {name}: unknown method {method!r} (svd, tucker2 or cp)")
    if method == "tucker2" and len(ranks) == 1:
        ranks = ranks * 2
    limits = geometry.max_ranks[method]
    if len(ranks) != len(limits) or not all(1 <= r <= limit for r, limit in zip(ranks, limits)):
        raise UserError(
            f"--ranks entry for {name}: {method} ranks {list(ranks)} do not fit the layer "
            f"(each between 1 and {list(limits)} per group)"
        )
    return method, ranks


def _check_rank_names(config: CompressConfig, layers) -> None:
    names = {layer.name for layer in layers}
    unknown = sorted(set(config.ranks) - names)
    if unknown:
        raise UserError(f"--ranks names unknown layers {unknown}; `onnx-dacomp inspect` lists the layer names")
    for layer in layers:
        if layer.name in config.ranks and not layer.decomposable:
            raise UserError(f"--ranks names layer {layer.name}, which cannot be decomposed: {layer.skip_reason}")


def _layer_report(layer: ConvLayer, geometry: ConvGeometry, choice: Candidate, fit: LayerFit) -> LayerReport:
    before = original_cost(geometry)
    # a refitted bias on a layer that had none adds T parameters to the chain
    after = chain_cost(replace(geometry, bias=geometry.bias or fit.bias is not None), choice.method, choice.ranks)
    return LayerReport(
        name=layer.name,
        method=choice.method,
        ranks=tuple(int(r) for r in choice.ranks),
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        rel_error=fit.rel_error,
        estimated_error=None if math.isnan(choice.error) else choice.error,
        sweeps=fit.sweeps,
    )


def _kept_report(layer: ConvLayer, geometry: ConvGeometry, reason: str) -> LayerReport:
    cost = original_cost(geometry)
    return LayerReport(layer.name, None, None, cost.params, cost.params, cost.macs, cost.macs, 0.0, reason=reason)


def _kept_reason(layer: ConvLayer, geometry: ConvGeometry, config: CompressConfig) -> str:
    if config.ratio is None:
        return "not named in --ranks"
    original = original_cost(geometry)
    methods = methods_for(config.method, geometry)
    smallest = [chain_cost(geometry, m, (1,) * len(geometry.max_ranks[m])) for m in methods]
    if all(cost.of(config.budget) >= original.of(config.budget) for cost in smallest):
        return f"no {'/'.join(methods)} chain has fewer {config.budget}"
    return "kept: budget met without it"
