"""Next-layer compensation (docs/MATH.md): the linear layers a plan keeps (and depthwise convs), where a
compressed layer lies upstream, refit in closed form on the input they really get in the compressed model, so
that they absorb part of the error of the layers before them.

Layers are refit in waves (`propagate.waves`: a wave's inputs depend only on earlier waves), from the cross
statistics of one onnxruntime pass of both models per wave. Each layer's ridge is chosen on half of the samples
by its error on the other half; a wave's refits are kept only where they lower the compressed model's output
error on the judge's samples, so compensation never raises that error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from .calibration.cross import collect_cross_statistics
from .decompose.compensation import refit_loss, ridge_refit
from .layers import Layer
from .log import logger, progress
from .propagate import OutputError, first_batches, waves
from .rewrite import refit_layers

# a wave's statistics come from enough samples for this many input vectors per input dimension (at least
# MIN_SAMPLES samples, at most all): a conv sees hundreds of vectors per sample, a classifier one
VECTORS_PER_INPUT = 32
MIN_SAMPLES = 64
# the ridges tried per layer, relative to the mean eigenvalue of the input's covariance: from nearly the least
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
    batch's sample count), and the record of the waves.

    Each layer's ridge is the one whose refit on half of the batches has the lowest error on the other half;
    the wave's refits (on all its batches) are kept where the judge finds a lower output error with them."""
    model, record, error = compressed, [], judge(compressed)
    with progress(len(layers), "compensating", "layer", enabled=show_progress) as bar:
        for wave in waves(original, layers):
            chosen = _enough(batches, wave, length)
            halves = [collect_cross_statistics(original, model, wave, part, device=device)
                      for part in (chosen[::2], chosen[1::2]) if part]  # fmt: skip
            fitting, checking = halves[0], halves[-1]  # one batch only: the ridge is chosen in-sample
            ridges, refits = {}, {}
            for layer in wave:
                args = (weights[layer.name], biases[layer.name])
                losses = {ridge: _loss(*args, _refit(*args, fitting[layer.name], ridge), checking[layer.name])
                          for ridge in RIDGES}  # fmt: skip
                ridges[layer.name] = min(losses, key=losses.get)
                moments = fitting[layer.name] + checking[layer.name] if len(halves) > 1 else fitting[layer.name]
                refits[layer.output] = (layer, *_refit(*args, moments, ridges[layer.name]))
            candidate = refit_layers(model, refits)
            candidate_error = judge(candidate)
            refit = candidate_error < error  # a tie keeps the layers as they are
            record.append({"layers": [layer.name for layer in wave], "ridges": ridges, "refit": refit,
                           "output_error": [error, min(error, candidate_error)]})  # fmt: skip
            if refit:
                model, error = candidate, candidate_error
            bar.update(len(wave))
    refitted = sum(len(wave["layers"]) for wave in record if wave["refit"])
    if record:
        logger.info("compensation: %d of %d kept layers refit, output error %.4g -> %.4g on the judge's samples",
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
    return first_batches(batches, needed, length)


def _moments(cross) -> tuple:
    """(reference mean, cross moment, second moment, mean) of cross moments, stacked over groups."""
    return cross.reference_mean, cross.cross_moment, cross.covariance, cross.mean


def _grouped(weight: np.ndarray, bias: np.ndarray | None, groups: int) -> tuple:
    """`weight` (T, S / G, *kernel) and `bias` (T,) with a leading group axis."""
    return weight.reshape(groups, -1, *weight.shape[1:]), None if bias is None else bias.reshape(groups, -1)


def _refit(weight: np.ndarray, bias: np.ndarray | None, cross, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The layer's refit weight and bias from its cross moments, every group on its own."""
    refit, refit_bias = ridge_refit(*_grouped(weight, bias, len(cross.second)), *_moments(cross), ridge)
    return refit.reshape(weight.shape), refit_bias.reshape(-1)


def _loss(weight: np.ndarray, bias: np.ndarray | None, refit: tuple, cross) -> float:
    """The refit's output error under `cross` (other samples' moments), up to a constant."""
    groups = len(cross.second)
    return refit_loss(*_grouped(weight, bias, groups), _grouped(*refit, groups), *_moments(cross))
