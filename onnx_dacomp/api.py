"""The public functions behind the commands: `inspect`, `calibrate` and `evaluate` (`compress` is in
pipeline.py). Each takes a model (path or ModelProto) and plain config objects."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx

from .calibration.collect import collect_statistics
from .calibration.sources import Source, open_data
from .calibration.statistics import Statistics
from .config import DataConfig, RuntimeConfig
from .errors import UserError
from .load import load_model
from .shapes import graph_inputs
from .targets import TargetScan, find_targets
from .verify import Comparison, Latency, benchmark_batches, compare_models, measure_latency

Model = onnx.ModelProto | str | os.PathLike
Data = Source | Iterable | str | os.PathLike


@dataclass(frozen=True)
class Evaluation:
    comparison: Comparison
    latency: tuple[Latency, ...] = ()


def inspect(model: Model, config: DataConfig = DataConfig()) -> TargetScan:
    """Every layer of the kinds onnx-dacomp knows, decomposable or with the reason it is not."""
    return find_targets(_model(model), config.input_shapes)


def calibrate(
    model: Model,
    data: Data,
    config: DataConfig = DataConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    *,
    mode: str = "auto",
    progress: bool = True,
) -> Statistics:
    """Statistics of every decomposable layer of `model` over `data` (a spec as `--data`, a `Source`, or an
    iterable of `{input_name: array}` batches); `config.limit` caps the samples of a spec."""
    model = _model(model)
    scan = find_targets(model, config.input_shapes)
    source = _source(data, model, config, runtime)
    return collect_statistics(model, scan.targets, source, device=runtime.device, mode=mode, progress=progress)


def evaluate(
    original: Model,
    compressed: Model,
    data: Data,
    config: DataConfig = DataConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    *,
    benchmark_batch: Sequence[int] = (),
    repeats: int = 30,
    progress: bool = True,
) -> Evaluation:
    """Compare `compressed` with `original` on `data` (agreement, output error, top-1 with labels) and, for
    each size in `benchmark_batch`, time both in onnxruntime."""
    original, compressed = _model(original), _model(compressed)
    names = [[value.name for value in graph_inputs(model)] for model in (original, compressed)]
    if names[0] != names[1]:
        raise UserError(
            f"the models have different inputs ({names[0]} and {names[1]}): compare a model with its own compression"
        )
    source = _source(data, original, config, runtime)
    comparison = compare_models(original, compressed, source, device=runtime.device, progress=progress)
    latency = tuple(
        measure_latency(original, compressed, batch, device=runtime.device, repeats=repeats)
        for batch in (benchmark_batches(source, benchmark_batch) if benchmark_batch else [])
    )
    return Evaluation(comparison, latency)


def _model(model: Model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def _source(data: Data, model: onnx.ModelProto, config: DataConfig, runtime: RuntimeConfig):
    if isinstance(data, (str, os.PathLike)):
        return open_data(data, model, config, runtime.seed, limit=config.limit)
    return data
