"""Error propagation (docs/MATH.md): fit each layer on the input it really gets once the layers before it
are compressed. Layers are fitted in waves (each wave's inputs depend only on earlier waves); layers of one
wave share one onnxruntime pass for their cross statistics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from .calibration.cross import collect_cross_statistics
from .classes import class_scores
from .fit import FitSettings, LayerFit, fit_layer
from .intervals import paired_difference_interval, relative_difference_interval
from .layers import Layer
from .log import logger, progress
from .moments import Moments
from .problems import LayerProblem
from .ranks.plan import RankPlan
from .rewrite import replace_layers
from .runtime import create_session


def waves(model: onnx.ModelProto, layers: Sequence[Layer]) -> list[list[Layer]]:
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


def first_batches(batches: Sequence[dict[str, np.ndarray]], needed: int, length: Callable) -> list[dict]:
    """The first of `batches` that hold `needed` samples (`length`: a batch's sample count), or all."""
    chosen, count = [], 0
    for batch in batches:
        if count >= needed:
            break
        chosen.append(batch)
        count += length(batch)
    return chosen


class OutputError:
    """The relative output error energy of candidate models against `model` on fixed batches (the reference
    outputs computed once): how the propagated and the plain fit of a wave are compared. `classes`: the outputs
    that score classes (name -> whether a map scores each position, `classes.class_scores`), whose top-1
    agreement with `model` per sample `measure` gives too."""

    def __init__(
        self, model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], device: str,
        classes: Mapping[str, bool] | None = None,
    ):  # fmt: skip
        self.batches, self.device, self.classes = list(batches), device, dict(classes or {})
        session = create_session(model, device)
        self.names = [output.name for output in session.get_outputs()]
        self.references = [[np.asarray(y, np.float64) for y in session.run(None, batch)] for batch in self.batches]
        self.energies = np.concatenate([_sample_sums([y**2 for y in outputs]) for outputs in self.references])
        self.energy = float(self.energies.sum()) or 1.0
        self.reference_classes = [self._predicted(outputs) for outputs in self.references]

    def __call__(self, candidate: onnx.ModelProto) -> float:
        return float(self.sample_errors(candidate).sum()) / self.energy

    def sample_errors(self, candidate: onnx.ModelProto) -> np.ndarray:
        """`candidate`'s squared output error per sample (per batch where the outputs do not share their
        first axis), in the order of `energies`."""
        return self.measure(candidate)[0]

    def measure(self, candidate: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray | None]:
        """`sample_errors`, and per sample the share of the class outputs' top-1 (of their positions, for maps)
        that agrees with `model`'s; None without class outputs, or where they have no row per sample."""
        session = create_session(candidate, self.device)
        errors, agreements = [], []
        for batch, references, classes in zip(self.batches, self.references, self.reference_classes):
            outputs = [np.asarray(y, np.float64) for y in session.run(None, batch)]
            errors.append(_sample_sums([(y - r) ** 2 for y, r in zip(outputs, references)]))
            predicted = self._predicted(outputs)
            if classes is not None and predicted is not None:
                agreements.append(np.mean([p == c for p, c in zip(predicted, classes)], axis=(0, 2)))
        errors = np.concatenate(errors)
        if len(agreements) < len(self.batches):
            return errors, None
        agreements = np.concatenate(agreements)
        return errors, agreements if len(agreements) == len(errors) else None

    def _predicted(self, outputs: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """Each class output's top-1, `[samples, positions]`; None where there are none or one has no row per
        sample."""
        samples = {len(y) for y in outputs if y.ndim}
        if not self.classes or len(samples) != 1:
            return None
        size, predicted = samples.pop(), []
        for name, output in zip(self.names, outputs):
            if name in self.classes:
                scores = class_scores(output, size, dense=self.classes[name])
                if scores is None:
                    return None
                predicted.append(scores.argmax(axis=1).reshape(size, -1))
        return predicted if predicted and len({p.shape for p in predicted}) == 1 else None


def _sample_sums(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The sum of `arrays` per sample along their shared first axis, or their total as one value."""
    rows = {a.shape[0] if a.ndim else None for a in arrays}
    if len(rows) == 1 and None not in rows:
        return sum(a.reshape(len(a), -1).sum(axis=1) for a in arrays)
    return np.array([sum(float(a.sum()) for a in arrays)])


def fit_propagated(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    plan: RankPlan,
    problems: Mapping[str, LayerProblem],
    statistics: Mapping[str, Moments],
    batches: Sequence[dict[str, np.ndarray]],
    settings: FitSettings,
    *,
    bias_refit: bool,
    device: str = "auto",
    show_progress: bool = True,
    judge: OutputError | None = None,
) -> tuple[onnx.ModelProto, dict[str, LayerFit], dict]:
    """The compressed model of `plan` with every chosen layer (in `layers`, graph order) fitted on the
    inputs of the model compressed so far, the fits, and the record of the waves.

    `judge`: each wave's propagated fits are kept only where the model compressed so far has no larger output
    error (on the judge's batches) than with the wave's plain fits: matching each layer's output from its
    perturbed input is not matching the model's (EfficientNet-Lite0 lost 16 points to it at 0.5)."""
    chosen = [layer for layer in layers if plan.get(layer.name) is not None]
    new_model, fits, kept = model, {}, []
    with progress(len(chosen), "decomposing", "layer", enabled=show_progress) as bar:
        for wave in waves(model, chosen):
            cross = collect_cross_statistics(model, new_model, wave, batches, device=device)
            propagated, plain = {}, {}
            for layer in wave:
                if problems[layer.name].shrinkage > 0:
                    # fitted from few vectors (a shrunk covariance): the propagated target inverts the perturbed
                    # input's covariance from those same few vectors and fits them rather than the layer
                    # (EfficientNet-Lite0's classifier, no held-out data: output error 0.04 on the calibration
                    # samples against 0.19 plain, and 65.4 % top-1 on other images against 75.0 %)
                    propagated[layer.name] = plain[layer.name] = fit_layer(
                        problems[layer.name], plan.get(layer.name), settings
                    )
                    bar.update()
                    continue
                problem = LayerProblem.propagated(
                    problems[layer.name], statistics[layer.name], cross[layer.name], bias_refit
                )
                propagated[layer.name] = fit_layer(problem, plan.get(layer.name), settings)
                if judge is not None:
                    plain[layer.name] = fit_layer(problems[layer.name], plan.get(layer.name), settings)
                bar.update()
            candidate = _replaced(new_model, wave, propagated)
            if all(propagated[layer.name] is plain.get(layer.name) for layer in wave):
                kept.append({"layers": [layer.name for layer in wave], "propagated": False, "output_error": None})
            elif judge is not None:
                alternative = _replaced(new_model, wave, plain)
                errors = judge(candidate), judge(alternative)
                if errors[1] < errors[0]:
                    candidate, propagated = alternative, plain
                kept.append({"layers": [layer.name for layer in wave], "propagated": errors[0] <= errors[1],
                             "output_error": list(errors)})  # fmt: skip
            fits.update(propagated)
            new_model = candidate
    record = {"waves": len(kept), "propagated_waves": sum(wave["propagated"] for wave in kept), "choices": kept}
    if kept:
        logger.info("propagation kept in %d of %d waves (the others keep the plain fit)", record["propagated_waves"],
                    len(kept))  # fmt: skip
    return new_model, fits, record


def _replaced(model: onnx.ModelProto, wave: Sequence[Layer], fits: Mapping[str, LayerFit]) -> onnx.ModelProto:
    return replace_layers(
        model, {layer.output: (layer, fits[layer.name].factors, fits[layer.name].bias) for layer in wave}
    )


def keep_better(propagated: onnx.ModelProto, plain: onnx.ModelProto, judge: OutputError) -> tuple[bool, dict]:
    """Whether the `propagated` model is kept over the `plain` one, and the record: only where its output error
    on the `judge`'s samples, which neither was fitted on, is lower with 95 % confidence (the upper end of the
    paired interval of the difference below zero), and, for a classifier, its top-1 agreement with the original
    is not lower (the lower end of the paired interval of the difference at zero or above). Propagation minimizes
    each layer's output error, which need not lower the model's (EfficientNet-Lite0 at 0.5: 57.2 % top-1 with the
    waves' choices, 60.4 % plain); where the two differ by less than a few hundred samples can tell, keeping the
    propagated one was a coin flip (ResNet-20 at 0.75 and 0.5, ResNet-56 at 0.75 and 0.5: 0.01-0.12 points of
    top-1 lower); and a lower error energy did not mean a better top-1 (ResNet-56 at 0.35: 0.0266 against 0.0289
    beyond doubt, agreement 95.75 % against 94.25 %, difference [-0.50, +3.75] points; -0.32 points of top-1 on
    the test images): such a difference keeps the plain fit, the model that compressing without `--propagate`
    writes."""
    (errors, agreements), (plain_errors, plain_agreements) = judge.measure(propagated), judge.measure(plain)
    low, high = relative_difference_interval(errors, plain_errors, judge.energies)
    measured = {"propagated": float(errors.sum()) / judge.energy, "plain": float(plain_errors.sum()) / judge.energy}
    record = {
        "samples": len(judge.energies), "output_error": measured, "difference_interval": [low, high],
    }  # fmt: skip
    agreement_low = 0.0
    if agreements is not None:
        agreement_low, agreement_high = paired_difference_interval(agreements, plain_agreements)
        record |= {
            "top1_agreement": {"propagated": float(agreements.mean()), "plain": float(plain_agreements.mean())},
            "agreement_difference_interval": [agreement_low, agreement_high],
        }  # fmt: skip
    kept = high < 0 and agreement_low >= 0
    record = {"kept": "propagated" if kept else "plain"} | record
    if high >= 0:
        logger.warning(
            "the propagated fit is not clearly better than the plain fit on %d samples neither was fitted on (output "
            "error %.4f vs %.4f, difference [%.4f, %.4f]): keeping the plain fit", len(judge.energies),
            measured["propagated"], measured["plain"], low, high,
        )  # fmt: skip
    elif not kept:
        logger.warning(
            "the propagated fit has the lower output error on %d samples neither was fitted on (%.4f vs %.4f) but "
            "its top-1 agreement with the original could be lower (%.2f %% vs %.2f %%, difference [%+.2f, %+.2f] "
            "points): keeping the plain fit", len(judge.energies), measured["propagated"], measured["plain"],
            100 * agreements.mean(), 100 * plain_agreements.mean(), 100 * agreement_low, 100 * agreement_high,
        )  # fmt: skip
    return kept, record
