"""The allocation checked at the plan it chose, and corrected once (docs/MATH.md, "Reallocation").

The allocation adds the layers' errors, each weighted by a sensitivity probed one layer at a time at a small
error (`sensitivity.py`). At the plan's own errors a layer's share of the model's output error can differ
severalfold: ResNet-20's last conv at `--ratio 0.5` was probed at 0.0072 but, with its relative error 0.116,
added 4.4 times what that predicts; most layers of EfficientNet-Lite0 at 0.82 added 0.5-0.9 times. Each
compressed layer's share is measured where it is, leave one out: the output error of the compressed model
less that of the same model with the layer restored, on the judge's samples (data the fits did not see).
Its ratio to the prediction corrects the layer's weight and the budget is allocated again, each compressed
layer kept within reach of its error (`within_reach`): the correction holds near the plan it was measured at,
and a layer moved far along its curve leaves it (EfficientNet-Lite0's convolutions at 0.5: the head conv,
whose restoration raised the error, looked ten times cheaper and was pruned so far that the reallocated
model's error rose from 0.58 to 1.0). The model with the lower output error on those samples is kept, and
a kept plan is measured and reallocated again with twice the reach, a few rounds at most (ResNet-20's last
conv, probed at a small error, added 28 times its prediction at the first plan's, and needs several rounds).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace

import onnx

from .log import progress
from .methods import get
from .ranks.candidates import CandidateTable
from .ranks.plan import RankPlan
from .rewrite import replace_layers

# a measured share is a difference of two noisy errors: a small or negative one is noise, and the correction
# is held at this factor at least (a large share is no noise: ResNet-20's last conv, pruned, added 68 times
# what its low-rank probe predicted)
MIN_FACTOR = 0.1
# Where the free reallocation is no better, each compressed layer's estimated error may move within this factor
# of the plan's (doubled after every kept round), for at most ROUNDS rounds; the first round that keeps nothing
# ends them. Measured (judge's error energy; test top-1): EfficientNet-Lite0's convolutions at 0.5, free 0.584 ->
# 0.997, within 2x 0.524 (64.6 -> 69.2 %); ResNet-20 at 0.5 (ranks in multiples of 8) 0.085 -> 0.037 free, then
# within 4x 0.030 and 8x 0.028 (79.52 -> 79.97 %).
FIRST_REACH = 2.0
ROUNDS = 4


def layer_shares(
    model: onnx.ModelProto,
    chains: Mapping[str, tuple],
    error: Callable[[onnx.ModelProto], float],
    names: Collection[str],
    show_progress: bool = True,
) -> tuple[float, dict[str, float]]:
    """The output error of `model` with every chain of `chains` (layer output -> (layer, factors, bias), as
    `replace_layers` takes them) in place, and the share of it of each layer in `names`: that error less the
    error with the layer restored."""
    total, shares = error(replace_layers(model, chains)), {}
    measured = [output for output, (layer, *_) in chains.items() if layer.name in names]
    with progress(len(measured), "re-probing the plan", "layer", enabled=show_progress) as bar:
        for output in measured:
            others = {key: chain for key, chain in chains.items() if key != output}
            shares[chains[output][0].name] = total - error(replace_layers(model, others))
            bar.update()
    return total, shares


def corrected_weights(
    weights: Mapping[str, float], errors: Mapping[str, float], shares: Mapping[str, float]
) -> dict[str, float]:
    """`weights` (sensitivities) scaled, for each layer in `shares`, by its measured share of the output error
    over the predicted one (its weight times its relative error `errors[name]`), at least MIN_FACTOR."""
    corrected = dict(weights)
    for name, share in shares.items():
        predicted = weights.get(name, 1.0) * errors[name]
        if predicted > 0:
            corrected[name] = weights.get(name, 1.0) * max(share / predicted, MIN_FACTOR)
    return corrected


def within_reach(
    tables: Mapping[str, CandidateTable],
    plan: RankPlan,
    names: Collection[str],
    reach: float,
    groups: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, CandidateTable]:
    """`tables` with the candidates of each layer of `names` (compressed by `plan`) restricted to its chosen
    method with an estimated error within `reach` times (or over) the chosen one's: keeping the layer stays
    possible, moving it far along its curve, or to another method whose error its share did not measure, not.
    The layers a pruned layer of `names` slices (`groups`) get no candidates of their own: their group is
    pruned within reach, or kept."""
    restricted = dict(tables)
    for name in names:
        chosen = plan.get(name)
        fitted_as = get(chosen.method).variant_of or chosen.method  # a `cp-fused` chain: the tables' `cp`
        restricted[name] = replace(tables[name], candidates=tuple(
            c for c in tables[name].candidates
            if c.method == fitted_as and chosen.error / reach <= c.error <= chosen.error * reach
        ))  # fmt: skip
        if get(chosen.method).prunes_inputs:
            for producer in (groups or {}).get(name, ()):
                if producer in restricted:
                    restricted[producer] = replace(restricted[producer], candidates=())
    return restricted
