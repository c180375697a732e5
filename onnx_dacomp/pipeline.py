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
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from tqdm import tqdm

from .calibrate.collect import MAX_PATCH_SIZE, collect_statistics
from .calibrate.patches import patch_size
from .calibrate.sources import Source, open_source
from .calibrate.statistics import Statistics
from .config import CompressConfig
from .decompose.covariance import output_energy, sigma_error
from .decompose.cp import cp_als, da_cp
from .decompose.factors import Factors, reconstruct
from .decompose.result import Decomposition
from .decompose.svd import da_svd, truncated_svd
from .decompose.tucker2 import da_tucker2, tucker2_hooi, weighted_input_factor
from .errors import UserError
from .evaluate import compare_models
from .load import load_model
from .log import logger
from .ranks.allocate import Choice, allocate, uniform
from .ranks.candidates import Candidate, candidate_table, estimate_errors, methods_for
from .ranks.costs import ConvGeometry, chain_cost, original_cost
from .report import CompressionReport, LayerReport
from .rewrite import replace_convs
from .targets import ConvLayer, find_targets, read_weights


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
    `{input_name: array}` batches). Sources of known size give the first `config.holdout` samples to
    verification and calibrate on the rest. `statistics`: precomputed patch statistics of this model (then
    `data`, if given, serves verification only). `--norm frobenius` needs neither.
    """
    clock = {"start": time.perf_counter()}
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    scan = find_targets(model, config.input_shapes)
    if not scan.layers:
        raise UserError("the model has no Conv layers: nothing to compress")
    weights = read_weights(model, scan.targets)
    _check_rank_names(config, scan.layers)

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

    calibration, holdout = _split(model, data, config, precomputed=statistics is not None)
    if config.norm == "sigma" and fitted:
        if statistics is None:
            if calibration is None:
                raise UserError(
                    "the distribution-aware fit needs calibration data: pass --data or --stats "
                    "(or --norm frobenius for the data-free baseline)"
                )
            statistics = collect_statistics(model, fitted, calibration, device=config.device, progress=progress)
        else:
            statistics.check_model(fitted, weights)
    clock["calibrate"] = time.perf_counter()

    geometries = {layer.name: _geometry(layer) for layer in scan.layers if layer.params is not None}
    problems = {
        layer.name: _groups(layer, weights[layer.name], statistics if config.norm == "sigma" else None)
        for layer in fitted
    }
    plan = _plan(config, fitted, geometries, problems, scan.layers, progress)
    clock["ranks"] = time.perf_counter()

    replacements, layer_reports = {}, {}
    chosen = [(layer, plan[layer.name]) for layer in fitted if plan.get(layer.name) is not None]
    measure = statistics is not None
    for layer, choice in tqdm(
        chosen, desc="decomposing", unit="layer", disable=None if progress else True, leave=False
    ):
        group_weights, group_sigmas = problems[layer.name]
        results = [
            _solve(choice.method, w, s, choice.ranks, config)
            for w, s in zip(group_weights, group_sigmas or [None] * len(group_weights))
        ]
        factors = [result.factors for result in results]
        truth = _groups(layer, weights[layer.name], statistics)[1] if measure else None
        error = _relative_error(group_weights, factors, truth)
        replacements[layer.output] = (layer, factors)
        layer_reports[layer.name] = _layer_report(
            layer, geometries[layer.name], choice, error, max(r.iterations for r in results)
        )
        logger.debug(
            "%s: %s %s, rel. error %.4g (estimate %.4g)", layer.name, choice.method, choice.ranks, error, choice.error
        )
    new_model = replace_convs(model, replacements)
    clock["decompose"] = time.perf_counter()

    verification = None
    if holdout is not None:
        verification = compare_models(model, new_model, holdout, device=config.device, progress=progress)
    clock["verify"] = time.perf_counter()

    for layer in scan.layers:
        if layer.name not in layer_reports and layer.name in geometries:
            reason = reasons.get(layer.name) or _kept_reason(layer, geometries[layer.name], config)
            layer_reports[layer.name] = _kept_report(layer, geometries[layer.name], reason)
    report = CompressionReport(
        layers=tuple(layer_reports[layer.name] for layer in scan.layers if layer.name in layer_reports),
        error_norm="sigma" if measure else "frobenius",
        budget=config.budget,
        target_ratio=config.ratio,
        verification=verification,
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


def _split(model, data, config: CompressConfig, *, precomputed: bool) -> tuple[Source | Iterable | None, Source | None]:
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
    if precomputed:
        return None, data.subset(0, config.holdout) if config.holdout else None
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


def _groups(layer: ConvLayer, weight: np.ndarray, statistics: Statistics | None):
    """Per-group weights (T/G, S/G, *k) in float64 and, with statistics, the per-group Sigma."""
    weight = np.asarray(weight, np.float64)
    per_group = layer.out_channels // layer.group
    weights = [weight[g * per_group : (g + 1) * per_group] for g in range(layer.group)]
    sigmas = list(statistics.layers[layer.name].covariance) if statistics is not None else None
    return weights, sigmas


def _plan(config, fitted, geometries, problems, layers, progress) -> dict[str, Choice]:
    """The method and ranks of every fitted layer: --ranks overrides, then the budget for the rest."""
    plan: dict[str, Choice] = {}
    for layer in fitted:
        if layer.name in config.ranks:
            method, ranks = _override(layer.name, config.ranks[layer.name], config.method, geometries[layer.name])
            weights, sigmas = problems[layer.name]
            estimate = estimate_errors(method, weights, sigmas, [ranks], seed=config.seed)[0]
            plan[layer.name] = Candidate(method, ranks, chain_cost(geometries[layer.name], method, ranks), estimate)
    managed = [layer for layer in fitted if layer.name not in plan]
    if config.ratio is None or not managed:
        return plan
    managed_names = {layer.name for layer in managed}
    budget = config.budget
    before = sum(original_cost(geometries[layer.name]).of(budget) for layer in layers if layer.name in geometries)
    fixed = sum(
        plan[layer.name].cost.of(budget) if layer.name in plan else original_cost(geometries[layer.name]).of(budget)
        for layer in layers
        if layer.name in geometries and layer.name not in managed_names
    )
    target = config.ratio * before
    if config.allocation == "uniform":

        def choose(name, options):
            weights, sigmas = problems[name]
            errors = [estimate_errors(m, weights, sigmas, [r], seed=config.seed)[0] for m, r in options]
            return options[int(np.argmin(errors))]

        plan.update(
            uniform(
                {layer.name: geometries[layer.name] for layer in managed},
                {layer.name: methods_for(config.method, geometries[layer.name]) for layer in managed},
                budget,
                target,
                fixed,
                config.rank_multiple,
                choose,
            )
        )
    else:
        tables = []
        for layer in tqdm(
            managed, desc="rank candidates", unit="layer", disable=None if progress else True, leave=False
        ):
            weights, sigmas = problems[layer.name]
            tables.append(
                candidate_table(
                    layer.name,
                    geometries[layer.name],
                    weights,
                    sigmas,
                    config.method,
                    multiple=config.rank_multiple,
                    seed=config.seed,
                )
            )
        plan.update(allocate(tables, budget, target, fixed))
    reached = fixed + sum(
        plan[layer.name].cost.of(budget) if plan.get(layer.name) else original_cost(geometries[layer.name]).of(budget)
        for layer in managed
    )
    if reached > target * 1.0001:
        logger.warning(
            "the target %s ratio %.3g cannot be reached: the smallest ranks give %.3g (layers that are skipped "
            "or excluded keep their size)",
            budget,
            config.ratio,
            reached / before,
        )
    return plan


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


def _solve(method: str, weight: np.ndarray, sigma: np.ndarray | None, ranks, config: CompressConfig) -> Decomposition:
    """The full solver at the chosen ranks, started where the candidate estimate was computed."""
    if method == "svd":
        return truncated_svd(weight, ranks[0]) if sigma is None else da_svd(weight, sigma, ranks[0])
    if method == "tucker2":
        if sigma is None:
            return tucker2_hooi(weight, ranks, max_iter=config.max_iter)
        start = weighted_input_factor(weight, sigma)[:, : ranks[1]]
        return da_tucker2(weight, sigma, ranks, init=start, max_iter=config.max_iter, seed=config.seed)
    if sigma is None:
        return cp_als(weight, ranks[0], max_iter=config.max_iter, seed=config.seed)
    return da_cp(weight, sigma, ranks[0], max_iter=config.max_iter, seed=config.seed)


def _relative_error(weights, factors: list[Factors], sigmas) -> float:
    """`sum_g ||(W_g - W_g~) L_g||^2 / sum_g ||W_g L_g||^2` (Frobenius when `sigmas` is None)."""
    sigmas = sigmas if sigmas is not None else [None] * len(weights)
    energies = [output_energy(w, s) for w, s in zip(weights, sigmas)]
    errors = [sigma_error(w, reconstruct(f), s) * e for w, f, s, e in zip(weights, factors, sigmas, energies)]
    total = sum(energies)
    return float(sum(errors) / total) if total > 0 else 0.0


def _layer_report(
    layer: ConvLayer, geometry: ConvGeometry, choice: Candidate, error: float, sweeps: int
) -> LayerReport:
    before, after = original_cost(geometry), choice.cost
    return LayerReport(
        name=layer.name,
        method=choice.method,
        ranks=tuple(int(r) for r in choice.ranks),
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        rel_error=error,
        estimated_error=None if math.isnan(choice.error) else choice.error,
        sweeps=sweeps,
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
    return "kept by the allocation (the budget is met without it)"
