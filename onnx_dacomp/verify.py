"""Stage 7: compare a compressed model with its original on held-out data, and time both in onnxruntime."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx

from .calibration.sources import IterableSource, Source
from .classes import class_producers, class_scores
from .errors import UserError
from .inputs import InputSignature, input_signature
from .intervals import paired_difference_interval, relative_error_interval, wilson
from .latency import MAX_SECONDS, Latency, compare_latency
from .log import logger
from .log import progress as log_progress
from .runtime import create_session


@dataclass(frozen=True)
class OutputComparison:
    """One model output, original against compressed, over all compared samples.

    `rel_error` = ||Y~ - Y|| / ||Y||; `cosine`: the mean over samples of the cosine similarity of the two
    outputs (flattened per sample); `snr_db` = 10 log10(||Y||^2 / ||Y~ - Y||^2). Class-score outputs (`[N, C]`
    after squeezing, from a linear layer or a softmax, or declared with --classifier-output) also get top-1
    agreement, and top-1 of both models when the data has labels.
    """

    name: str
    rel_error: float
    cosine: float
    snr_db: float
    classes: bool = False
    top1_agreement: float | None = None
    top1_original: float | None = None
    top1_compressed: float | None = None
    # 95 % intervals (`intervals.py`): bootstrap over samples for the error and the paired top-1 drop,
    # Wilson for the proportions
    rel_error_interval: tuple[float, float] | None = None
    top1_agreement_interval: tuple[float, float] | None = None
    top1_original_interval: tuple[float, float] | None = None
    top1_compressed_interval: tuple[float, float] | None = None
    top1_drop_interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class Comparison:
    """Every output of two models on the same samples, and where the labels (if any) came from."""

    samples: int
    outputs: tuple[OutputComparison, ...]
    labels_from: str | None = None
    in_sample: bool = False  # compared on the calibration data itself (no held-out data): optimistic

    def output(self, name: str) -> OutputComparison:
        for output in self.outputs:
            if output.name == name:
                return output
        raise UserError(f"the model has no output {name!r}; its outputs are {[o.name for o in self.outputs]}")

    @property
    def classifier(self) -> OutputComparison | None:
        """The first class-score output, which the top-1 figures refer to."""
        return next((output for output in self.outputs if output.classes), None)

    @property
    def rel_output_error(self) -> float:
        """The worst output's relative error."""
        return max(output.rel_error for output in self.outputs)

    @property
    def worst_output(self) -> OutputComparison:
        return max(self.outputs, key=lambda output: output.rel_error)

    @property
    def rel_output_error_high(self) -> float:
        """The upper end of the worst output's error interval: what a bound on the error must meet."""
        worst = self.worst_output
        return worst.rel_error_interval[1] if worst.rel_error_interval else worst.rel_error

    @property
    def top1_agreement_low(self) -> float | None:
        """The lower end of the top-1 agreement's interval."""
        classifier = self.classifier
        if classifier is None or classifier.top1_agreement is None:
            return None
        return (
            classifier.top1_agreement_interval[0] if classifier.top1_agreement_interval else classifier.top1_agreement
        )

    @property
    def top1_drop_high(self) -> float | None:
        """The upper end of the top-1 drop's interval (paired: the same samples under both models)."""
        if self.top1_drop is None:
            return None
        interval = self.classifier.top1_drop_interval
        return interval[1] if interval else self.top1_drop

    @property
    def lost_function(self) -> bool:
        """Whether the compressed model no longer computes the original's function: top-1 agreement under a
        half for a classifier, else an output error near or above the output itself (SNR under 1 dB)."""
        if self.top1_agreement is not None:
            return self.top1_agreement < 0.5
        return self.rel_output_error > 0.9

    @property
    def top1_agreement(self) -> float | None:
        return self.classifier.top1_agreement if self.classifier else None

    @property
    def top1_original(self) -> float | None:
        return self.classifier.top1_original if self.classifier else None

    @property
    def top1_compressed(self) -> float | None:
        return self.classifier.top1_compressed if self.classifier else None

    @property
    def top1_drop(self) -> float | None:
        if self.top1_original is None or self.top1_compressed is None:
            return None
        return self.top1_original - self.top1_compressed

    def to_dict(self) -> dict:
        keys = ("rel_output_error", "rel_output_error_high", "top1_agreement", "top1_agreement_low", "top1_drop")
        summary = {key: getattr(self, key) for key in (*keys, "top1_drop_high")}
        summary |= {"top1_original": self.top1_original, "top1_compressed": self.top1_compressed}
        return {**asdict(self), **summary}


def compare_models(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    source: Source | Iterable,
    *,
    device: str = "auto",
    progress: bool = True,
    signature: InputSignature | None = None,
    classifier_outputs: Sequence[str] = (),
) -> Comparison:
    """Both models on every sample of `source`; each output compared (see `OutputComparison`).
    `classifier_outputs`: outputs to score as class scores whatever their producer (a map `[N, C, ...]` per
    position)."""
    signature = signature or input_signature(original)
    if not isinstance(source, Source):
        source = IterableSource(source, signature.names)
    first, second = create_session(original, device), create_session(compressed, device)
    names = [output.name for output in first.get_outputs()]
    unknown = sorted(set(classifier_outputs) - set(names))
    if unknown:
        raise UserError(f"--classifier-output names {unknown}, but the model's outputs are {names}")
    producers = class_producers(original)
    sums = {name: np.zeros(4) for name in names}  # error energy, reference energy, cosine sum, samples
    agree, positions, correct, samples, labelled, classes = {}, {}, {}, 0, True, {}
    units = {name: ([], []) for name in names}  # per sample (or per batch): error and reference energies
    hits = {name: ([], []) for name in names}  # per sample: top-1 right under the original, the compressed
    with log_progress(source.size, "verifying", "sample", enabled=progress) as bar:
        for index, (batch, labels) in enumerate(source.labelled()):
            batch = signature.check(batch, index)
            size = signature.length(batch)
            for name, reference, output in zip(names, first.run(None, batch), second.run(None, batch)):
                reference, output = np.asarray(reference, np.float64), np.asarray(output, np.float64)
                sums[name] += _energies(reference, output, size)
                for unit, energy in zip(units[name], _unit_energies(reference, output, size)):
                    unit.append(energy)
                declared = name in classifier_outputs
                scores = class_scores(reference, size, dense=declared)
                if name not in classes:
                    classes[name] = declared or (scores is not None and name in producers)
                if classes[name] and scores is not None:
                    predicted = scores.argmax(axis=1), class_scores(output, size, dense=declared).argmax(axis=1)
                    agree[name] = agree.get(name, 0) + int(np.sum(predicted[0] == predicted[1]))
                    positions[name] = positions.get(name, 0) + len(scores)
                    if labels is not None and len(scores) == size:
                        right = [p == np.asarray(labels) for p in predicted]
                        correct[name] = [a + int(np.sum(b)) for a, b in zip(correct.get(name, [0, 0]), right)]
                        for kept, flags in zip(hits[name], right):
                            kept.append(flags)
            labelled = labelled and labels is not None
            samples += size
            bar.update(size)
    if samples == 0:
        raise UserError(f"the evaluation data ({getattr(source, 'description', 'data')}) yielded no samples")
    outputs = []
    for name in names:
        error, energy, cosines, count = sums[name]
        top1 = correct.get(name) if labelled else None
        errors, energies = (np.concatenate(unit) for unit in units[name])
        comparison = OutputComparison(
            name=name,
            rel_error=float(np.sqrt(error / energy)) if energy > 0 else float(error > 0),
            cosine=float(cosines / max(count, 1)),
            snr_db=float(10 * np.log10(energy / error)) if error > 0 else float("inf"),
            classes=bool(classes.get(name)),
            rel_error_interval=relative_error_interval(errors, energies),
        )
        if name in agree:
            comparison = replace(
                comparison, top1_agreement=agree[name] / positions[name],
                top1_agreement_interval=wilson(agree[name], positions[name]),
            )  # fmt: skip
        if top1:
            original, compressed = (np.concatenate(flags) for flags in hits[name])
            comparison = replace(
                comparison, top1_original=top1[0] / samples, top1_compressed=top1[1] / samples,
                top1_original_interval=wilson(top1[0], samples), top1_compressed_interval=wilson(top1[1], samples),
                top1_drop_interval=paired_difference_interval(original, compressed),
            )  # fmt: skip
        outputs.append(comparison)
    has_top1 = any(output.top1_original is not None for output in outputs)
    return Comparison(samples, tuple(outputs), getattr(source, "labels_from", None) if has_top1 else None)


def _energies(reference: np.ndarray, output: np.ndarray, samples: int) -> np.ndarray:
    """(error energy, reference energy, sum of per-sample cosines, samples) of one batch of one output."""
    error, energy = float(np.sum((output - reference) ** 2)), float(np.sum(reference**2))
    if reference.ndim and reference.shape[0] == samples and samples > 0:
        left, right = reference.reshape(samples, -1), output.reshape(samples, -1)
        norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
        cosines = np.where(norms > 0, np.sum(left * right, axis=1) / np.where(norms > 0, norms, 1), 1.0)
        return np.array([error, energy, float(np.sum(cosines)), samples])
    norm = np.linalg.norm(reference) * np.linalg.norm(output)
    return np.array([error, energy, float(np.sum(reference * output) / norm) if norm > 0 else 1.0, 1])


def _unit_energies(reference: np.ndarray, output: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample error and reference energies of one batch of one output (one unit for the whole batch
    when the output has no sample axis), for the error's interval."""
    if reference.ndim and reference.shape[0] == samples and samples > 0:
        left, right = reference.reshape(samples, -1), output.reshape(samples, -1)
        return np.sum((right - left) ** 2, axis=1), np.sum(left**2, axis=1)
    return np.array([np.sum((output - reference) ** 2)]), np.array([np.sum(reference**2)])


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


def warn_if_lost(comparison: Comparison | None) -> None:
    """A loud warning where the compressed model no longer computes the original's function."""
    if comparison is not None and comparison.lost_function:
        logger.warning(
            "WARNING: the compressed model has lost the original's function on the %s (top-1 agreement %s, "
            "relative output error %.3f): compress less (a larger --ratio or a smaller --speedup)",
            "calibration samples (no held-out data)" if comparison.in_sample else "held-out data",
            "n/a" if comparison.top1_agreement is None else f"{comparison.top1_agreement:.1%}",
            comparison.rel_output_error,
        )


def end_to_end_latency(
    original, compressed, source, sizes, signature: InputSignature, runtime, show_progress: bool = True,
    max_seconds: float = MAX_SECONDS,
    threshold: float | None = None,
) -> tuple[Latency, ...]:  # fmt: skip
    """Both models timed at each batch size (`latency.compare_latency`, until decided against `threshold` where
    one is given): on samples of `source` when there is one, else random data."""
    batches = (benchmark_batches(source, sizes, signature) if source else None) or [
        signature.random_batch(size, runtime.seed) for size in sizes
    ]
    return tuple(
        compare_latency(
            original,
            compressed,
            batch,
            size,
            device=runtime.device,
            threads=runtime.timing_threads,
            max_seconds=max_seconds,
            show_progress=show_progress,
            threshold=threshold,
        )  # fmt: skip
        for batch, size in zip(batches, sizes)
    )
