"""The stages every ratio shares: load -> targets -> calibrate -> problems -> candidate tables ->
sensitivities, into a `job.CompressionJob` (whose `result(ratio)` builds one model)."""

from __future__ import annotations

from collections import ChainMap
from dataclasses import asdict, replace

import onnx

from .cache import Cache, digest, statistics_key
from .calibration.collect import collect_statistics
from .calibration.sources import Source, open_data, rereadable, split
from .calibration.statistics import spilled, too_few_vectors
from .channels import input_producers
from .config import CompressConfig
from .errors import UserError
from .fit import FitSettings
from .geometry import solver_work
from .inputs import input_signature, with_image_size
from .job import CompressionJob
from .latency import serving_threads
from .load import default_opset, load_model
from .log import StageClock, logger
from .methods import AUTO, get, methods_for, pruning_method
from .padding import fold_pads
from .problems import build_problems, needs_shrinkage
from .ranks import overrides
from .ranks.candidates import candidate_tables, merged
from .sensitivity import allocation_weights
from .speed import LatencyTable, LayerCosts, channel_multiple, speedup_budget
from .targets import TargetScan, find_targets, nothing_to_compress, read_biases, read_weights, refittable, select
from .workers import Workers

NATURAL_NOTICE = (
    "no --data or --stats given: calibrating on crops of natural photographs (--data natural); "
    "data from the model's own domain fits better"
)


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


def pruned_producers(model, fitted: list, reasons: dict, method: str) -> tuple[list, dict[str, tuple[str, ...]]]:
    """Where the method prunes input channels: the layers to fit without those that compute a pruned layer's
    input channels (they then compute only the channels read: `channels.shrink_producers`), with their reasons
    added to `reasons`, and the pruned layer -> those layers. With `auto`, the layers whose input channels
    other layers compute (pruning them makes those smaller) -> those layers, all of them fitted: the allocation
    chooses for each group (`ranks.allocate.Joint`)."""
    if method == AUTO:
        prunable = [layer for layer in fitted if pruning_method(layer.geometry) is not None]
        return fitted, input_producers(fold_pads(model).model, prunable) if prunable else {}
    pruned = [layer for layer in fitted if any(get(name).prunes_inputs for name in methods_for(method, layer.geometry))]
    if not pruned:
        return fitted, {}
    coupled = input_producers(fold_pads(model).model, pruned)  # a Pad would stand between them
    for consumer, producers in coupled.items():
        for producer in producers:
            reasons[producer] = f"computes the input channels of {consumer}: only those it reads, where it is pruned"
    producing = {name for names in coupled.values() for name in names}
    return [layer for layer in fitted if layer.name not in producing], coupled


def by_pruning_method(names, problems) -> dict[str, list[str]]:
    """`names` by the method that prunes each (`methods.pruning_method`), where one does."""
    grouped = {}
    for name in names:
        if (method := pruning_method(problems.geometry(name))) is not None:
            grouped.setdefault(method, []).append(name)
    return grouped


def probed_weights(
    model, layers, managed, coupled, calibration, settings, config, signature, progress, store, workers, unseen
) -> tuple[dict | None, dict | None]:
    """The allocation's weights (`allocation_weights`): each layer probed by its own kind of error, pruned
    where `--method` prunes it, else by a low-rank fit; with `auto`, the groups' pruned layers (`coupled`)
    probed pruned as well (the second mapping)."""

    def pruned(name: str) -> bool:
        if config.plan.method == AUTO:
            return name in coupled
        return pruning_method(managed.geometry(name)) in methods_for(config.plan.method, managed.geometry(name))

    low_rank = [name for name in managed if config.plan.method == AUTO or not pruned(name)]

    def probed(names, **method):
        return allocation_weights(
            model, layers, managed.restricted(names), calibration, settings, config, signature, progress, store=store,
            workers=workers, holdout=unseen, **method,
        )  # fmt: skip

    sensitivity = probed(low_rank) if low_rank else {}
    if sensitivity is None:  # not measured (switched off, data-free fit, data not re-readable)
        return None, None
    probed_pruned = {}
    for method, names in by_pruning_method([name for name in managed if pruned(name)], managed).items():
        probed_pruned |= probed(names, method=method)
    if config.plan.method == AUTO:
        return sensitivity, probed_pruned or None
    return sensitivity | probed_pruned, None


def set_aside(calibration) -> tuple[Source, Source] | None:
    """Without held-out data, (the calibration samples to fit on, a fifth of them set aside to measure fits on:
    the source's samples are a seeded random order), or None where the data cannot be split (not a source of
    known size that can be read again, or fewer than 10 samples)."""
    size = getattr(calibration, "size", None) or 0
    if not isinstance(calibration, Source) or type(calibration).subset is Source.subset or size < 10:
        return None
    return calibration.subset(size // 5, None), calibration.subset(0, size // 5)


def held_out_moments(model, fitted, moments, calibration, holdout, config, signature, store, workers, progress):
    """The statistics on unseen data of the layers fitted from few vectors whose methods all give held-out
    errors in closed form (the SVD of a matrix: a classifier, a squeeze-and-excitation conv): their fits are
    measured there (`LayerProblem.plain`), since a shrunk covariance from 400 vectors in 1280 dims fits its
    own samples far better than others (EfficientNet-Lite0's classifier at rank 256: error 0.17 on the
    calibration images, 0.40 on others). A kxk conv with few vectors keeps its calibration estimates: a solver
    run per candidate took the bundled CNN's five such layers 45 s.

    The unseen data is the held-out data; without any, a seeded fifth of the calibration samples, on which
    those layers are then not fitted: measured in-sample, EfficientNet-Lite0's classifier looked cheap and
    `--ratio 0.75 --holdout 0` compressed it until 48.8 % top-1 were left (74.8 % with held-out data).
    Returns (those layers' moments to fit on where they change, their moments on the unseen data, the unseen
    samples, for their sensitivity probes)."""
    if moments is None:
        return {}, {}, holdout

    def closed_form(layer) -> bool:
        return all(get(name).held_out_estimates for name in methods_for(config.plan.method, layer.geometry))

    few = [layer for layer in fitted if needs_shrinkage(moments[layer.name]) and closed_form(layer)]
    if not few:
        return {}, {}, holdout
    if rereadable(holdout):
        logger.info("%d layers fitted from few vectors: their errors are measured on the held-out data", len(few))
        return {}, calibrated(model, few, holdout, config, signature, store, workers, progress).layers, holdout
    parts = set_aside(calibration)
    if parts is None:
        logger.info("%d layers fitted from few vectors, no data to measure them on: in-sample estimates", len(few))
        return {}, {}, holdout
    fit_part, check_part = parts
    logger.info(
        "%d layers fitted from few vectors and no held-out data: they are fitted on %d of the %d calibration "
        "samples and measured on the other %d", len(few), fit_part.size, calibration.size, check_part.size,
    )  # fmt: skip
    fit = calibrated(model, few, fit_part, config, signature, store, workers, progress).layers
    return fit, calibrated(model, few, check_part, config, signature, store, workers, progress).layers, check_part


def prepare(
    model, data, config: CompressConfig, statistics, progress: bool, workers: Workers, scratch: str, *, budgeted=False
) -> CompressionJob:
    """Load, find the layers, calibrate, and build what every ratio shares (`budgeted`: candidate tables and
    sensitivities even where the config sets no ratio, for a sweep)."""
    clock = StageClock()
    model = model if isinstance(model, onnx.ModelProto) else load_model(model)
    runtime, covariance = config.runtime, config.fit.norm == "sigma"
    store = Cache(runtime.cache_dir) if runtime.cache_dir is not None else None
    preprocessing = config.data.preprocessing
    input_shapes = with_image_size(model, config.data.input_shapes, preprocessing.size, preprocessing.layout)
    signature = input_signature(model, input_shapes, config.data.batch_axes)
    scan = find_targets(model, input_shapes)
    compensable = refittable(scan, config.plan.exclude)  # every kind: refitting a layer does not compress it
    scan = TargetScan(tuple(layer for layer in scan.layers if layer.kind in config.plan.layer_kinds))
    layers = {layer.name: layer for layer in scan.layers}
    overrides.check_names(config.plan.ranks, scan.layers)
    if not scan.targets:
        raise UserError(f"no layer of the model can be decomposed: {nothing_to_compress(scan)}")
    fitted, reasons = select(scan, config.plan.exclude, covariance=covariance, unknown=signature.unknown())
    fitted, coupled = pruned_producers(model, fitted, reasons, config.plan.method)
    config = speedup_budget(config)
    if config.plan.rank_multiple is None:
        config = config.replace(rank_multiple=channel_multiple(runtime.device))
        logger.info("ranks in multiples of %d (the execution provider's channel block)", config.plan.rank_multiple)

    if covariance and fitted and statistics is None and data is None:
        logger.info(NATURAL_NOTICE)
        data = "natural"
    data_config = replace(config.data, input_shapes=input_shapes)
    if config.verify.eval_data is not None:  # verification on its own data: all of --data calibrates
        config = config.replace(holdout=0)
        holdout = open_data(config.verify.eval_data, model, data_config, runtime.seed)
        calibration = split(data, model, data_config, 0, runtime.seed)[0]
    else:
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
    refitted, held_out, unseen = held_out_moments(
        model, fitted, moments, calibration, holdout, config, signature, store, workers, progress
    )
    moments = ChainMap(refitted, moments) if refitted else moments  # lazily: spilled moments stay on disk
    clock.mark("calibrate")

    problems = build_problems(
        fitted, weights, read_biases(model, fitted), moments, bias_refit=config.fit.bias_refit, held_out=held_out
    )
    settings = FitSettings.of(config)
    # chains are timed at the batch of the speed target where there is one
    speed_batch = config.plan.speedup_batch if config.plan.speedup is not None else runtime.speed_batch
    # layers are timed on the threads the whole original model gets (`latency.serving_threads`)
    threads = runtime.timing_threads
    times_layers = config.plan.budget == "latency" or config.plan.require_speedup or config.verify.layer_timings
    if threads is None and (times_layers or config.plan.speedup is not None) and not signature.unknown():
        threads = serving_threads(model, signature.random_batch(speed_batch, runtime.seed), speed_batch, runtime.device)
    timing = LatencyTable(batch=speed_batch, device=runtime.device, opset=default_opset(model) or 17, threads=threads)
    # the latency budget counts every candidate chain's one-layer time. --speedup counts MACs and times whole
    # models: one-layer times at its batch 1 are too noisy to choose by (ResNet-56's 16-channel layers measured
    # 0.096 ms and then 0.043, a chain 0.013 and then 0.058), and taking only chains measured faster than their
    # layer made its plan change from run to run (Tucker-2 on 1 layer or on 17 at the same ratio: 82.20 % or
    # 81.40 %)
    timed = config.plan.budget == "latency"
    costs = LayerCosts(layers, timing if timed else None, coupled, joint=config.plan.method == AUTO)
    fixed = overrides.override_choices(problems, config.plan.ranks, config.plan.method, costs.chain, runtime.seed)
    overrides.check_sliced(fixed, coupled)
    managed = problems.restricted([name for name in problems if name not in fixed])
    pooled = workers.map_for(sum(solver_work(problems.geometry(name)) for name in problems))
    budgeted = budgeted or config.plan.target_ratio is not None or config.plan.targeted or config.plan.speedup
    tables, sensitivity, pruned_sensitivity = {}, None, None
    if budgeted and managed and config.plan.allocation == "allocated":
        tables = candidate_tables(
            managed, config.plan.method, multiple=config.plan.rank_multiple, seed=runtime.seed,
            show_progress=progress, map=pooled, cache=store,
        )  # fmt: skip
        if config.plan.method == AUTO:  # the groups' pruned candidates
            for method, names in by_pruning_method([name for name in coupled if name in tables], managed).items():
                extra = candidate_tables(
                    managed.restricted(names), method, multiple=config.plan.rank_multiple, seed=runtime.seed,
                    show_progress=False, map=pooled, cache=store,
                )  # fmt: skip
                tables = {name: merged(table, extra.get(name)) for name, table in tables.items()}
        tables = {name: costs.timed(table) for name, table in tables.items()}
        sensitivity, pruned_sensitivity = probed_weights(
            model, layers, managed, coupled, calibration, settings, config, signature, progress, store, workers, unseen
        )
    # the budget counts the decomposable layers (as `inspect` lists them), excluded ones too, less those the
    # calibration data cannot fit
    counted = [layer.name for layer in scan.targets if layer.geometry is not None and layer.name not in unfittable]
    return CompressionJob(
        model=model, config=config, progress=progress, workers=workers, store=store, clock=clock, scan=scan,
        layers=layers, fitted=fitted, reasons=reasons, calibration=calibration, holdout=holdout, signature=signature,
        statistics=statistics, problems=problems, settings=settings, timing=timing, costs=costs, fixed=fixed,
        pooled=pooled, tables=tables, sensitivity=sensitivity, pruned_sensitivity=pruned_sensitivity, counted=counted,
        compensable=compensable, input_shapes=input_shapes,
        set_aside=set_aside(calibration) if holdout is None else None,
    )  # fmt: skip
