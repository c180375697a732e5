"""The main job as a script of stage calls: load -> targets -> calibrate -> problems -> tables -> plan -> fit
-> rewrite -> verify -> report. `compress(model_or_path, data=..., config=...)` returns the new model and its
report; the CLI's `compress` command calls it and saves the model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

import onnx

from .cache import Cache, digest, statistics_key
from .calibration.collect import collect_statistics
from .calibration.sources import Source, split
from .calibration.statistics import Statistics, spilled, too_few_vectors
from .config import CompressConfig
from .errors import UserError
from .fit import FitSettings, fit_all
from .geometry import solver_work
from .inputs import input_signature, with_image_size
from .load import default_opset, load_model
from .log import StageClock, logger
from .problems import build_problems
from .propagate import fit_propagated, keep_better
from .ranks import overrides
from .ranks.candidates import candidate_tables
from .ranks.plan import Budget, RankPlan, plan
from .report import CompressionReport, layer_rows, model_totals
from .rewrite import replace_layers, with_provenance
from .runtime import blas_threads
from .search import largest_ratio_at_speed, smallest_ratio
from .sensitivity import allocation_weights
from .speed import LatencyTable, LayerCosts, channel_multiple, keep_faster, speedup_budget
from .targets import TargetScan, find_targets, nothing_to_compress, read_biases, read_weights, select
from .verify import compare_models, end_to_end_latency, warn_if_lost
from .workers import Workers, executor

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
    give their first `config.verify.holdout` samples to verification and calibrate on the rest.
    `statistics`: precomputed statistics of this model (then `data`, if given, serves verification only).
    """
    with blas_threads(), executor(config.runtime.workers, config.runtime.ray) as workers:
        with tempfile.TemporaryDirectory(prefix="onnx-dacomp-") as scratch:  # large statistics wait here
            return _compress(model, data, config, statistics, progress, workers, scratch)


def calibrated(
    model, layers, calibration, config: CompressConfig, signature, store: Cache | None, workers: Workers, progress: bool
):
    """The statistics of `layers` on `calibration`: from `store` where it holds them, else collected on
    `workers` (and kept there)."""
    runtime, data = config.runtime, config.data
    # propagation's cross statistics take every position: its plain statistics do too, unless asked otherwise
    positions = data.positions or ("all" if config.fit.propagate else "sampled")
    settings = (asdict(data), positions, signature, runtime.device, runtime.seed, config.verify.holdout)
    key = statistics_key(digest(model.SerializeToString()), layers, calibration, settings) if store else None
    statistics = store.statistics(key) if key else None
    if statistics is None:
        statistics = collect_statistics(
            model, layers, calibration, device=runtime.device, progress=progress, signature=signature, workers=workers,
            positions=positions, seed=runtime.seed,
        )  # fmt: skip
        if key:
            store.put_statistics(key, statistics)
    return statistics


def _compress(
    model, data, config: CompressConfig, statistics, progress: bool, workers: Workers, scratch: str
) -> CompressionResult:
    clock = StageClock()
    model = model if isinstance(model, onnx.ModelProto) else load_model(model)
    runtime, covariance = config.runtime, config.fit.norm == "sigma"
    store = Cache(runtime.cache_dir) if runtime.cache_dir is not None else None
    preprocessing = config.data.preprocessing
    input_shapes = with_image_size(model, config.data.input_shapes, preprocessing.size, preprocessing.layout)
    signature = input_signature(model, input_shapes, config.data.batch_axes)
    scan = find_targets(model, input_shapes)
    scan = TargetScan(tuple(layer for layer in scan.layers if layer.kind in config.plan.layer_kinds))
    layers = {layer.name: layer for layer in scan.layers}
    overrides.check_names(config.plan.ranks, scan.layers)
    if not scan.targets:
        raise UserError(f"no layer of the model can be decomposed: {nothing_to_compress(scan)}")
    fitted, reasons = select(scan, config.plan.exclude, covariance=covariance, unknown=signature.unknown())
    config = speedup_budget(config)
    if config.plan.rank_multiple is None:
        config = config.replace(rank_multiple=channel_multiple(runtime.device))
        logger.info("ranks in multiples of %d (the execution provider's channel block)", config.plan.rank_multiple)

    if covariance and fitted and statistics is None and data is None:
        logger.info(NATURAL_NOTICE)
        data = "natural"
    data_config = replace(config.data, input_shapes=input_shapes)
    calibration, holdout = split(data, model, data_config, config.verify.holdout, runtime.seed)
    weights = read_weights(model, fitted)
    if covariance and fitted:
        if statistics is None:
            if calibration is None:
                raise UserError("the calibration data left no samples to calibrate on after the held-out part")
            statistics = calibrated(model, fitted, calibration, config, signature, store, workers, progress)
        else:
            statistics.check_model(fitted, weights)
        statistics = spilled(statistics, scratch)
    moments = statistics.layers if covariance and statistics is not None else None
    unfittable = too_few_vectors(statistics, fitted) if moments is not None else {}
    reasons.update(unfittable)
    fitted = [layer for layer in fitted if layer.name not in unfittable]
    clock.mark("calibrate")

    problems = build_problems(fitted, weights, read_biases(model, fitted), moments, bias_refit=config.fit.bias_refit)
    settings = FitSettings.of(config)
    timing = LatencyTable(batch=runtime.speed_batch, device=runtime.device, opset=default_opset(model) or 17)
    costs = LayerCosts(layers, timing if config.plan.budget == "latency" else None)
    fixed = overrides.override_choices(problems, config.plan.ranks, config.plan.method, costs.chain, runtime.seed)
    managed = problems.restricted([name for name in problems if name not in fixed])
    pooled = workers.map_for(sum(solver_work(problems.geometry(name)) for name in problems))
    budgeted = config.plan.target_ratio is not None or config.plan.targeted or config.plan.speedup is not None
    tables, sensitivity = {}, None
    if budgeted and managed and config.plan.allocation == "allocated":
        tables = candidate_tables(
            managed, config.plan.method, multiple=config.plan.rank_multiple, seed=runtime.seed,
            show_progress=progress, map=pooled, cache=store,
        )  # fmt: skip
        tables = {name: costs.timed(table) for name, table in tables.items()}
        sensitivity = allocation_weights(
            model, layers, managed, calibration, settings, config, signature, progress, store=store, workers=workers
        )
    # the budget counts the decomposable layers (as `inspect` lists them), excluded ones too, less those the
    # calibration data cannot fit
    counted = [layer.name for layer in scan.targets if layer.geometry is not None and layer.name not in unfittable]
    original_costs = {name: costs.original(name) for name in counted}
    fit_cache: dict = {}

    def plan_at(ratio: float | None) -> RankPlan:
        options = config.plan
        budget = Budget(options.budget, ratio, options.allocation, options.method, options.rank_multiple, runtime.seed)
        return plan(problems, tables, budget, original_costs=original_costs, overrides=fixed, weights=sensitivity)

    def build(rank_plan: RankPlan, propagate: bool):
        if propagate:
            if calibration is None:
                raise UserError("--propagate needs calibration data (--data): it runs the partially compressed model")
            batches = list(calibration)
            return fit_propagated(
                model, fitted, rank_plan, problems, statistics.layers, batches, settings,
                bias_refit=config.fit.bias_refit, device=runtime.device, show_progress=progress,
            )  # fmt: skip
        fits = fit_all(
            problems, rank_plan.choices, settings, map=pooled, cache=fit_cache, store=store, show_progress=progress
        )
        return replace_layers(model, {layers[n].output: (layers[n], f.factors, f.bias) for n, f in fits.items()}), fits

    def timed(candidate: onnx.ModelProto, sizes, show: bool, seconds: float):
        source = holdout or calibration
        return end_to_end_latency(model, candidate, source, sizes, signature, runtime, show, seconds)

    def verify(candidate: onnx.ModelProto, show: bool = progress):
        return compare_models(
            model, candidate, holdout, device=runtime.device, progress=show, signature=signature,
            classifier_outputs=config.verify.classifier_outputs,
        )  # fmt: skip

    ratio, search = config.plan.target_ratio, None
    if config.plan.targeted:
        if holdout is None:
            raise UserError("--max-drop/--min-agreement/--max-error need held-out data: pass --data and --holdout N")
        ratio, search = smallest_ratio(lambda r: verify(build(plan_at(r), False)[0], False), config.plan)
    elif config.plan.speedup is not None:  # each probe: the model at that ratio timed against the original
        sizes, seconds = [config.plan.speedup_batch], config.verify.benchmark_seconds
        ratio, search = largest_ratio_at_speed(
            lambda r: timed(build(plan_at(r), False)[0], sizes, False, seconds)[0], config.plan.speedup
        )
    rank_plan = plan_at(ratio)
    if config.plan.require_speedup:
        rank_plan, slower = keep_faster(rank_plan, layers, timing, fixed)
        reasons.update(slower)
    clock.mark("ranks")
    new_model, fits = build(rank_plan, config.fit.propagate)
    clock.mark("decompose")

    verification = verify(new_model) if holdout is not None else None
    warn_if_lost(verification)
    propagation = None
    if config.fit.propagate and verification is not None:  # propagation need not lower the model's error
        new_model, fits, verification, propagation = keep_better(
            (new_model, fits, verification), lambda: build(rank_plan, False), verify, config.plan
        )
    latency = ()
    if config.verify.benchmark:  # every run says whether the result is faster, measured end to end
        sizes = sorted({1, config.verify.benchmark_batch})
        latency = timed(new_model, sizes, progress, config.verify.benchmark_seconds)
    clock.mark("verify")
    if store is not None:
        logger.info("cache %s: %s", runtime.cache_dir, store.summary() or "nothing to keep")

    row_costs = costs if config.plan.budget == "latency" else None
    if config.verify.layer_timings:
        row_costs = row_costs or LayerCosts(layers, timing)
        row_costs.measure(scan.layers, {name: rank_plan.get(name) for name in fits}, progress)
        clock.mark("layer_timings")
    provenance = {"method": config.plan.method, "budget": config.plan.budget, "ratio": ratio, "norm": config.fit.norm}
    new_model = with_provenance(new_model, provenance)
    report = CompressionReport(
        layers=layer_rows(
            scan.layers,
            rank_plan,
            fits,
            reasons,
            method=config.plan.method,
            budget=config.plan.budget,
            ratio=ratio,
            sensitivity=sensitivity,
            timed=row_costs.timed_row if row_costs is not None else None,
            counted=counted,
        ),  # fmt: skip
        model_totals=model_totals(model, new_model),
        error_norm="sigma" if moments is not None else "frobenius",
        budget=config.plan.budget,
        target_ratio=ratio,
        verification=verification,
        search=search,
        propagation=propagation,
        latency=latency,
        calibration=statistics.source if statistics is not None else None,
        seconds=clock.seconds(),
        cpu_seconds=clock.cpu_seconds(),
        peak_rss_gib=clock.peak_rss(),
        settings={k: v for k, v in config.options().items() if k not in ("input_shapes",)},
    )
    logger.info("%s", report.table())
    return CompressionResult(new_model, report)
