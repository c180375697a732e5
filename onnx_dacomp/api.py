"""The public functions behind the commands: `inspect`, `calibrate` and `evaluate` (`compress` is in
pipeline.py). Each takes a model (path or ModelProto) and plain config objects."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

from .calibration.collect import collect_statistics
from .calibration.sources import Source, open_data
from .calibration.statistics import Statistics
from .config import DataConfig, RuntimeConfig
from .errors import UserError
from .inputs import InputSignature, declared_dims, graph_inputs, input_signature, with_image_size
from .latency import MAX_SECONDS, Latency
from .load import load_model
from .targets import TargetScan, find_targets
from .verify import Comparison, compare_models, end_to_end_latency
from .workers import executor

Model = onnx.ModelProto | str | os.PathLike
Data = Source | Iterable | str | os.PathLike


@dataclass(frozen=True)
class Inspection:
    """What `inspect` finds: the layers (decomposable or why not), the inputs with their batch axes, the
    outputs, and the parameters of the whole model (every initializer element)."""

    scan: TargetScan
    inputs: InputSignature
    outputs: tuple[tuple[str, str, tuple], ...]  # (name, dtype, dims; None where dynamic)
    params: int

    @property
    def layers(self):
        return self.scan.layers

    @property
    def targets(self):
        return self.scan.targets


@dataclass(frozen=True)
class Evaluation:
    comparison: Comparison
    latency: tuple[Latency, ...] = ()


def inspect(model: Model, config: DataConfig = DataConfig()) -> Inspection:
    """Every layer of the kinds onnx-dacomp knows, decomposable or with the reason it is not, and the model's
    inputs, outputs and parameter count."""
    model = _model(model)
    input_shapes = _input_shapes(model, config)
    outputs = tuple(
        (value.name, helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name, tuple(
            d if isinstance(d, int) else None for d in declared_dims(value)
        ))
        for value in model.graph.output
    )  # fmt: skip
    params = sum(math.prod(init.dims) for init in model.graph.initializer)
    signature = input_signature(model, input_shapes, config.batch_axes)
    return Inspection(find_targets(model, input_shapes), signature, outputs, params)


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
    input_shapes = _input_shapes(model, config)
    scan = find_targets(model, input_shapes)
    signature = input_signature(model, input_shapes, config.batch_axes)
    source = _source(data, model, config, runtime)
    with executor(runtime.workers, runtime.ray) as workers:
        return collect_statistics(
            model, scan.targets, source, device=runtime.device, mode=mode, progress=progress, signature=signature,
            workers=workers, positions=config.positions or "sampled", seed=runtime.seed,
        )  # fmt: skip


def evaluate(
    original: Model,
    compressed: Model,
    data: Data,
    config: DataConfig = DataConfig(),
    runtime: RuntimeConfig = RuntimeConfig(),
    *,
    benchmark_batch: Sequence[int] = (),
    max_seconds: float = MAX_SECONDS,
    progress: bool = True,
    classifier_outputs: Sequence[str] = (),
) -> Evaluation:
    """Compare `compressed` with `original` on `data` (every output's error, cosine and SNR; top-1 of
    class-score outputs, see `verify.compare_models`) and, for each size in `benchmark_batch`, time both."""
    original, compressed = _model(original), _model(compressed)
    names = [[value.name for value in graph_inputs(model)] for model in (original, compressed)]
    if names[0] != names[1]:
        raise UserError(
            f"the models have different inputs ({names[0]} and {names[1]}): compare a model with its own compression"
        )
    signature = input_signature(original, _input_shapes(original, config), config.batch_axes)
    source = _source(data, original, config, runtime)
    comparison = compare_models(
        original, compressed, source, device=runtime.device, progress=progress, signature=signature,
        classifier_outputs=classifier_outputs,
    )  # fmt: skip
    latency = (
        end_to_end_latency(original, compressed, source, benchmark_batch, signature, runtime, progress, max_seconds)
        if benchmark_batch
        else ()
    )
    return Evaluation(comparison, latency)


def _model(model: Model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def _source(data: Data, model: onnx.ModelProto, config: DataConfig, runtime: RuntimeConfig):
    if isinstance(data, (str, os.PathLike)):
        return open_data(data, model, config, runtime.seed, limit=config.limit)
    return data


def _input_shapes(model: onnx.ModelProto, config: DataConfig) -> dict:
    """`--input-shape` plus what `--size` says of a single image input."""
    layout = config.preprocessing.layout
    return with_image_size(model, config.input_shapes, config.preprocessing.size, layout)
