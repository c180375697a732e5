"""Error propagation (docs/MATH.md): fit each layer on the input it really gets once the layers before it
are compressed. Layers are fitted in waves (each wave's inputs depend only on earlier waves); layers of one
wave share one onnxruntime pass for their cross statistics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from .calibration.cross import collect_cross_statistics
from .fit import FitSettings, LayerFit, fit_layer
from .intervals import relative_difference_interval
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
    outputs computed once): how the propagated and the plain fit of a wave are compared."""

    def __init__(self, model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]], device: str):
        self.batches, self.device = list(batches), device
        session = create_session(model, device)
        self.references = [[np.asarray(y, np.float64) for y in session.run(None, batch)] for batch in self.batches]
        self.energies = np.concatenate([_sample_sums([y**2 for y in outputs]) for outputs in self.references])
        self.energy = float(self.energies.sum()) or 1.0

    def __call__(self, candidate: onnx.ModelProto) -> float:
        return float(self.sample_errors(candidate).sum()) / self.energy

    def sample_errors(self, candidate: onnx.ModelProto) -> np.ndarray:
        """`candidate`'s squared output error per sample (per batch where the outputs do not share their
        first axis), in the order of `energies`."""
        session = create_session(candidate, self.device)
        errors = []
        for batch, references in zip(self.batches, self.references):
            outputs = session.run(None, batch)
            errors.append(_sample_sums([(np.asarray(y, np.float64) - r) ** 2 for y, r in zip(outputs, references)]))
        return np.concatenate(errors)


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
    paired interval of the difference below zero). Propagation minimizes each layer's output error, which need not
    lower the model's (EfficientNet-Lite0 at 0.5: 57.2 % top-1 with the waves' choices, 60.4 % plain); and where
    the two differ by less than a few hundred samples can tell, keeping the propagated one was a coin flip
    (ResNet-20 at 0.75 and 0.5, ResNet-56 at 0.75 and 0.5: 0.01-0.12 points of top-1 lower): such a difference keeps
    the plain fit, the model that compressing without `--propagate` writes."""
    errors = judge.sample_errors(propagated), judge.sample_errors(plain)
    low, high = relative_difference_interval(*errors, judge.energies)
    kept = high < 0
    measured = {fit: float(error.sum()) / judge.energy for fit, error in zip(("propagated", "plain"), errors)}
    record = {
        "kept": "propagated" if kept else "plain", "samples": len(judge.energies), "output_error": measured,
        "difference_interval": [low, high],
    }  # fmt: skip
    if not kept:
        logger.warning(
            "the propagated fit is not clearly better than the plain fit on %d samples neither was fitted on (output "
            "error %.4f vs %.4f, difference [%.4f, %.4f]): keeping the plain fit", len(judge.energies),
            measured["propagated"], measured["plain"], low, high,
        )  # fmt: skip
    return kept, record
