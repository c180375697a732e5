"""Error propagation (docs/MATH.md): fit each layer on the input it really gets once the layers before it
are compressed. Layers are fitted in waves (each wave's inputs depend only on earlier waves); layers of one
wave share one onnxruntime pass for their cross statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from .calibration.cross import collect_cross_statistics
from .fit import FitSettings, LayerFit, fit_layer
from .layers import Layer
from .log import logger, progress
from .moments import Moments
from .problems import LayerProblem
from .ranks.plan import RankPlan
from .rewrite import replace_layers


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
