"""Statistics for error propagation (docs/MATH.md): a layer's input in the original model (x) and in the
model compressed so far (x~), on the same samples.

Per layer and group, as `Moments` with a cross term: `cross = sum x x~^T`, `second = sum x~ x~^T`,
`first = sum x~`, `reference_first = sum x` over all input vectors (float64 sums of float32 products within a
batch), from one onnxruntime pass of each model per batch that exposes the layer inputs. Layers that do not
depend on each other share the pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..errors import UserError
from ..layers import Layer
from ..moments import Moments
from ..runtime import create_session
from .collect import exposing


def collect_cross_statistics(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    layers: Sequence[Layer],
    batches: Sequence[dict[str, np.ndarray]],
    *,
    device: str = "auto",
) -> dict[str, Moments]:
    """Cross moments of `layers` (whose inputs exist under the same names in both models)."""
    names = list(dict.fromkeys(layer.input for layer in layers))
    sessions = [create_session(exposing(model, names), device) for model in (original, compressed)]
    sums: dict[str, Moments] = {}
    for batch in batches:
        inputs, perturbed = (dict(zip(names, session.run(names, batch))) for session in sessions)
        for layer in layers:
            reference = layer.input_vectors(inputs[layer.input], np.float32)
            observed = layer.input_vectors(perturbed[layer.input], np.float32)
            part = Moments(
                cross=np.matmul(reference, observed.transpose(0, 2, 1)).astype(np.float64),
                second=np.matmul(observed, observed.transpose(0, 2, 1)).astype(np.float64),
                first=observed.sum(axis=2, dtype=np.float64),
                count=observed.shape[2],
                reference_first=reference.sum(axis=2, dtype=np.float64),
            )
            if not part.is_finite():
                raise UserError(f"layer {layer.name}: the compressed model's activations overflow (NaN or Inf)")
            sums[layer.name] = sums[layer.name] + part if layer.name in sums else part
    if not sums:
        raise UserError("propagation needs calibration batches, but the data yielded none")
    return sums
