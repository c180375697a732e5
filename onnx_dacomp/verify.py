"""Stage 7: compare a compressed model with its original on held-out data, and time both in onnxruntime."""

from __future__ import annotations

import statistics as stats
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from .calibration.sources import IterableSource, Source
from .errors import UserError
from .inputs import InputSignature, input_signature
from .log import progress as log_progress
from .runtime import create_session, provider_name


@dataclass(frozen=True)
class Comparison:
    """Outputs of two models on the same samples (first model output; classes along axis 1).

    `rel_output_error` = ||Y~ - Y||_F / ||Y||_F over all samples; `top1_agreement` = share of samples (and
    positions, for dense outputs) where both argmaxes agree; top-1 accuracies only when labels exist.
    """

    samples: int
    top1_agreement: float
    rel_output_error: float
    top1_original: float | None = None
    top1_compressed: float | None = None
    labels_from: str | None = None  # where the labels of the top-1 figures came from

    @property
    def top1_drop(self) -> float | None:
        if self.top1_original is None or self.top1_compressed is None:
            return None
        return self.top1_original - self.top1_compressed


@dataclass(frozen=True)
class Latency:
    """Median wall time of one `session.run` on a batch (same session options for both models)."""

    batch: int
    original_ms: float
    compressed_ms: float
    provider: str

    @property
    def ratio(self) -> float:
        return self.compressed_ms / self.original_ms


def compare_models(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    source: Source | Iterable,
    *,
    device: str = "auto",
    progress: bool = True,
    signature: InputSignature | None = None,
) -> Comparison:
    signature = signature or input_signature(original)
    if not isinstance(source, Source):
        source = IterableSource(source, signature.names)
    first, second = create_session(original, device), create_session(compressed, device)
    agree = positions = samples = 0
    squared_error = squared_norm = 0.0
    correct = [0, 0]
    labelled = True
    with log_progress(source.size, "verifying", "sample", enabled=progress) as bar:
        for index, (batch, labels) in enumerate(source.labelled()):
            batch = signature.check(batch, index)
            reference = np.asarray(first.run(None, batch)[0], np.float64)
            output = np.asarray(second.run(None, batch)[0], np.float64)
            squared_error += float(np.sum((output - reference) ** 2))
            squared_norm += float(np.sum(reference**2))
            predicted = [_classes(reference), _classes(output)]
            agree += int(np.sum(predicted[0] == predicted[1]))
            positions += predicted[0].size
            samples += signature.length(batch)
            if labels is None or predicted[0].ndim != 1:
                labelled = False
            else:
                for k in range(2):
                    correct[k] += int(np.sum(predicted[k] == np.asarray(labels)))
            bar.update(signature.length(batch))
    if samples == 0:
        raise UserError(f"the evaluation data ({getattr(source, 'description', 'data')}) yielded no samples")
    return Comparison(
        samples=samples,
        top1_agreement=agree / positions,
        rel_output_error=float(np.sqrt(squared_error / squared_norm)) if squared_norm > 0 else float(squared_error > 0),
        top1_original=correct[0] / samples if labelled else None,
        top1_compressed=correct[1] / samples if labelled else None,
        labels_from=getattr(source, "labels_from", None) if labelled else None,
    )


def measure_latency(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    batch: dict[str, np.ndarray],
    samples: int,
    *,
    device: str = "auto",
    warmup: int = 3,
    repeats: int = 30,
    rounds: int = 3,
) -> Latency:
    """Median latency of both models on `batch` over `repeats` runs each.

    The runs come in `rounds` blocks per model, alternating, so slow drifts of the machine hit both alike.
    Runs are not interleaved one by one: onnxruntime's worker threads keep spinning for a while after a run
    and would steal the cores from the other session's next run. Each block starts with `warmup` runs.
    """
    sessions = [create_session(original, device), create_session(compressed, device)]
    times = _block_times(sessions, batch, warmup, repeats, rounds)
    return Latency(
        batch=samples,
        original_ms=1000 * stats.median(times[0]),
        compressed_ms=1000 * stats.median(times[1]),
        provider=provider_name(sessions[0]),
    )


def session_latency(model: onnx.ModelProto, batch: dict[str, np.ndarray], *, device: str = "auto", repeats: int = 30):
    """Median latency (ms) of one model on `batch`, timed like `measure_latency`."""
    session = create_session(model, device)
    return 1000 * stats.median(_block_times([session], batch, 3, repeats, 3)[0]), provider_name(session)


def _block_times(sessions, batch, warmup: int, repeats: int, rounds: int) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in sessions]
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for session, measured in zip(sessions, times):
            for _ in range(warmup):
                session.run(None, batch)
            for _ in range(per_round):
                start = time.perf_counter()
                session.run(None, batch)
                measured.append(time.perf_counter() - start)
    return times


def benchmark_batches(source: Source, sizes, signature: InputSignature) -> list[dict[str, np.ndarray]]:
    """Batches of each size from the first samples of `source` (repeated when the source is smaller)."""
    largest, parts, count = max(sizes), [], 0
    for batch in source:
        parts.append(batch)
        count += signature.length(batch)
        if count >= largest:
            break
    if not parts:
        raise UserError("the data yielded no samples to time the models with")
    joined = signature.concatenate(parts)
    return [signature.resized(joined, size) for size in sizes]


def end_to_end_latency(original, compressed, source, sizes, signature: InputSignature, runtime) -> tuple[Latency, ...]:
    """Both models timed at each batch size: on samples of `source` when there is one, else random data."""
    batches = (benchmark_batches(source, sizes, signature) if source else None) or [
        random_batch(signature, size, runtime.seed) for size in sizes
    ]
    return tuple(
        measure_latency(original, compressed, batch, size, device=runtime.device) for batch, size in zip(batches, sizes)
    )


def random_batch(signature: InputSignature, size: int, seed: int) -> dict[str, np.ndarray]:
    """A random input batch for timing when no data was given (latency does not depend on the values)."""
    unknown = signature.unknown()
    if unknown:
        hints = " ".join(f"--input-shape {spec.hint()}" for spec in unknown)
        raise UserError(f"timing the models needs fixed input dims: pass --data, or {hints}")
    rng = np.random.default_rng(seed)
    batch = {}
    for spec in signature.specs:
        shape = [size if axis == spec.batch_axis else d for axis, d in enumerate(spec.dims)]
        batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return batch


def _classes(output: np.ndarray) -> np.ndarray:
    """Argmax over the class axis (axis 1): (N,) for logits, (N, positions) for dense predictions."""
    if output.ndim <= 2:
        return output.reshape(len(output), -1).argmax(axis=1)
    return output.reshape(output.shape[0], output.shape[1], -1).argmax(axis=1)
