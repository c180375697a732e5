"""The allocation checked at the plan it chose, and corrected once (docs/MATH.md, "Reallocation").

The allocation adds the layers' errors, each weighted by a sensitivity probed one layer at a time at a small
error (`sensitivity.py`). At the plan's own errors a layer's share of the model's output error can differ
severalfold: ResNet-20's last conv at `--ratio 0.5` was probed at 0.0072 but, with its relative error 0.116,
added 4.4 times what that predicts; most layers of EfficientNet-Lite0 at 0.82 added 0.5-0.9 times. Each
compressed layer's share is measured where it is, leave one out: the output error of the compressed model
less that of the same model with the layer restored, on the judge's samples (data the fits did not see).
Its ratio to the prediction corrects the layer's weight, the budget is allocated again, and the model with
the lower output error on those samples is kept: the correction holds near the plan it was measured at, and
a layer moved far along its curve can leave it (ResNet-56 at 0.5: the corrected plan was worse, and is not
kept).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import onnx

from .log import progress
from .rewrite import replace_layers

# a measured share is a difference of two noisy errors: a small or negative one is noise, and the correction
# is held at this factor at least (a large share is no noise: ResNet-20's last conv, pruned, added 68 times
# what its low-rank probe predicted)
MIN_FACTOR = 0.1


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
