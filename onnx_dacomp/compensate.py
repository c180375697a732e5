"""Next-layer compensation (docs/MATH.md): the linear layers a plan keeps (and depthwise convs), where a
compressed layer lies upstream, refit in closed form on the input they really get in the compressed model, so
that they absorb part of the error of the layers before them.

Layers are refit in waves (`propagate.waves`: a wave's inputs depend only on earlier waves), from the cross
statistics of one onnxruntime pass of both models per wave. Each wave keeps the ridge (or no refit) that gives
the compressed model the lowest output error on the judge's samples, so compensation never raises that error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from .calibration.cross import collect_cross_statistics
from .decompose.compensation import ridge_refit
from .layers import Layer
from .log import logger, progress
from .propagate import OutputError, waves
from .rewrite import refit_layers

# a wave's statistics come from enough samples for this many input vectors per input dimension (at least
# MIN_SAMPLES samples, at most all): a conv sees hundreds of vectors per sample, a classifier one
VECTORS_PER_INPUT = 32
MIN_SAMPLES = 256
# the ridges tried per wave, relative to the mean eigenvalue of the input's covariance: from nearly the least
# squares fit (many samples per input dimension) to a strong pull toward the original weight (few)
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def downstream(model: onnx.ModelProto, layers: Sequence[Layer], changed: Sequence[str]) -> list[Layer]:
    """The `layers` whose input depends on one of the tensors `changed` (the outputs of compressed layers)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    reached, pending = set(), list(changed)
    while pending:
        tensor = pending.pop()
        for node in consumers.get(tensor, ()):
            for output in node.output:
                if output not in reached:
                    reached.add(output)
                    pending.append(output)
    return [layer for layer in layers if layer.input in reached or layer.input in changed]


def compensate(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    layers: Sequence[Layer],
    weights: Mapping[str, np.ndarray],
    biases: Mapping[str, np.ndarray | None],
    batches: Sequence[dict[str, np.ndarray]],
    judge: OutputError,
    *,
    length: Callable[[dict], int] = lambda batch: len(next(iter(batch.values()))),
    device: str = "auto",
    show_progress: bool = True,
) -> tuple[onnx.ModelProto, dict]:
    """`compressed` with `layers` (kept layers downstream of compressed ones, graph order; `weights` in the
    `(T, S / G, *kernel)` layout) refit wave by wave on `batches` (as many as each wave needs; `length`: a
    batch's sample count), and the record of the waves."""
    model, record, error = compressed, [], judge(compressed)
    with progress(len(layers), "compensating", "layer", enabled=show_progress) as bar:
        for wave in waves(original, layers):
            cross = collect_cross_statistics(original, model, wave, _enough(batches, wave, length), device=device)
            trials = {None: (model, error)}
            for ridge in RIDGES:
                refits = {layer.output: (layer, *_refit(layer, weights[layer.name], biases[layer.name],
                                                        cross[layer.name], ridge)) for layer in wave}  # fmt: skip
                candidate = refit_layers(model, refits)
                trials[ridge] = (candidate, judge(candidate))
            ridge = min(trials, key=lambda key: trials[key][1])  # the unrefit model first: a tie keeps it
            record.append({"layers": [layer.name for layer in wave], "ridge": ridge,
                           "output_error": [trials[None][1], trials[ridge][1]]})  # fmt: skip
            model, error = trials[ridge]
            bar.update(len(wave))
    refitted = sum(len(wave["layers"]) for wave in record if wave["ridge"] is not None)
    if record:
        logger.info("compensation: %d of %d kept layers refit, output error %.4f -> %.4f on the judge's samples",
                    refitted, len(layers), record[0]["output_error"][0], error)  # fmt: skip
    return model, {"layers": len(layers), "refitted": refitted, "waves": record}


def _enough(batches: Sequence[dict[str, np.ndarray]], wave: Sequence[Layer], length: Callable) -> list[dict]:
    """The first batches that hold the samples the wave's layers need (VECTORS_PER_INPUT, MIN_SAMPLES)."""
    needed = max(
        MIN_SAMPLES,
        *(
            math.ceil(VECTORS_PER_INPUT * layer.vector_length / math.prod(layer.geometry.output_spatial))
            for layer in wave
        ),
    )
    chosen, count = [], 0
    for batch in batches:
        if count >= needed:
            break
        chosen.append(batch)
        count += length(batch)
    return chosen


def _refit(layer: Layer, weight: np.ndarray, bias: np.ndarray | None, cross, ridge: float):
    """The layer's refit weight and bias from its cross moments, group by group."""
    groups = len(cross.second)
    per_group = len(weight) // groups
    parts = [
        ridge_refit(
            weight[g * per_group : (g + 1) * per_group],
            None if bias is None else bias[g * per_group : (g + 1) * per_group],
            cross.reference_mean[g],
            cross.cross_moment[g],
            cross.covariance[g],
            cross.mean[g],
            ridge,
        )  # fmt: skip
        for g in range(groups)
    ]
    return np.concatenate([w for w, _ in parts]), np.concatenate([b for _, b in parts])
