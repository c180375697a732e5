"""Statistics for error propagation (DESIGN.md 2.4): a layer's input in the original model (x) and in the
model compressed so far (x~), on the same images.

Per layer and group: `cross = sum x x~^T`, `second = sum x~ x~^T`, `first = sum x~` over all patches (float64
sums of float32 products within a batch), from one onnxruntime pass of each model per batch that exposes
the layer inputs. Layers that do not depend on each other share the pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import UserError
from ..runtime import create_session
from ..targets import ConvLayer
from .collect import exposing
from .patches import patches


@dataclass(frozen=True, eq=False)
class CrossStatistics:
    cross: np.ndarray  # (G, n, n): sum of x x~^T
    second: np.ndarray  # (G, n, n): sum of x~ x~^T
    first: np.ndarray  # (G, n): sum of x~
    count: int

    @property
    def cross_moment(self) -> np.ndarray:
        """`C = E[x x~^T]` per group."""
        return self.cross / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """`Sigma~ = E[x~ x~^T]` per group."""
        return self.second / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        """`mu~ = E[x~]` per group."""
        return self.first / max(self.count, 1)


def collect_cross_statistics(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    layers: Sequence[ConvLayer],
    batches: Sequence[dict[str, np.ndarray]],
    *,
    device: str = "auto",
) -> dict[str, CrossStatistics]:
    """Cross statistics of `layers` (whose inputs exist under the same names in both models)."""
    names = list(dict.fromkeys(layer.input for layer in layers))
    sessions = [create_session(exposing(model, names), device) for model in (original, compressed)]
    sums: dict[str, list] = {}
    for batch in batches:
        inputs, perturbed = (dict(zip(names, session.run(names, batch))) for session in sessions)
        for layer in layers:
            reference = patches(inputs[layer.input], layer).astype(np.float32)
            observed = patches(perturbed[layer.input], layer).astype(np.float32)
            parts = [
                np.matmul(reference, observed.transpose(0, 2, 1)).astype(np.float64),
                np.matmul(observed, observed.transpose(0, 2, 1)).astype(np.float64),
                observed.sum(axis=2, dtype=np.float64),
                observed.shape[2],
            ]
            if not all(np.isfinite(p).all() for p in parts[:3]):
                raise UserError(f"layer {layer.name}: the compressed model's activations overflow (NaN or Inf)")
            sums[layer.name] = parts if layer.name not in sums else [a + b for a, b in zip(sums[layer.name], parts)]
    if not sums:
        raise UserError("propagation needs calibration batches, but the data yielded none")
    return {name: CrossStatistics(*parts) for name, parts in sums.items()}
