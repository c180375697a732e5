"""Error propagation (docs/MATH.md): fit each layer on the input it really gets once the layers before it
are compressed. Layers are fitted in waves (each wave's inputs depend only on earlier waves); layers of one
wave share one onnxruntime pass for their cross statistics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from .calibration.cross import collect_cross_statistics
from .config import PlanConfig
from .fit import FitSettings, LayerFit, fit_layer
from .layers import Layer
from .log import logger, progress
from .moments import Moments
from .problems import LayerProblem
from .ranks.plan import RankPlan
from .rewrite import replace_layers
from .search import preference


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
) -> tuple[onnx.ModelProto, dict[str, LayerFit]]:
    """The compressed model of `plan` with every chosen layer (in `layers`, graph order) fitted on the
    inputs of the model compressed so far, and the fits."""
    chosen = [layer for layer in layers if plan.get(layer.name) is not None]
    new_model, fits = model, {}
    with progress(len(chosen), "decomposing", "layer", enabled=show_progress) as bar:
        for wave in waves(model, chosen):
            cross = collect_cross_statistics(model, new_model, wave, batches, device=device)
            replacements = {}
            for layer in wave:
                problem = LayerProblem.propagated(
                    problems[layer.name], statistics[layer.name], cross[layer.name], bias_refit
                )
                fit = fits[layer.name] = fit_layer(problem, plan.get(layer.name), settings)
                replacements[layer.output] = (layer, fit.factors, fit.bias)
                logger.debug("%s: propagated fit, rel. error %.4g", layer.name, fit.rel_error)
                bar.update()
            new_model = replace_layers(new_model, replacements)
    return new_model, fits


def keep_better(propagated: tuple, build_plain: Callable, verify: Callable, config: PlanConfig) -> tuple:
    """The propagated `(model, fits, verification)` or the plain fit (`build_plain()` -> (model, fits),
    verified by `verify(model)`), whichever the held-out data prefers, and the record of both: propagation
    minimizes each layer's output error, which need not lower the model's (EfficientNet-Lite0 lost 14 points)."""
    model, fits, verification = propagated
    plain_model, plain_fits = build_plain()
    plain = verify(plain_model)
    record = {"kept": "propagated", "propagated": verification.to_dict(), "plain": plain.to_dict()}
    if preference(plain, config) > preference(verification, config):
        logger.warning(
            "the propagated fit verifies worse than the plain fit on the held-out data (top-1 agreement "
            "%s vs %s, output error %.4f vs %.4f): keeping the plain fit",
            verification.top1_agreement,
            plain.top1_agreement,
            verification.rel_output_error,
            plain.rel_output_error,
        )
        return plain_model, plain_fits, plain, {**record, "kept": "plain"}
    return model, fits, verification, record
