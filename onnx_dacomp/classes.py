"""Which model outputs score classes, and their scores as rows (numpy and onnx only): verification's top-1 and
the top-1 agreement by which propagation's model is judged both read outputs through these."""

from __future__ import annotations

import numpy as np
import onnx

CLASS_PRODUCERS = {"Gemm", "MatMul", "Softmax", "LogSoftmax", "Conv", "Add", "Sigmoid"}
SHAPE_ONLY = {"Reshape", "Flatten", "Squeeze", "Identity", "Cast"}


def class_producers(model: onnx.ModelProto) -> set[str]:
    """Outputs computed by a layer that scores classes (a linear layer, a 1x1 conv, a softmax; looked
    through reshapes), unlike features from a pooling or a map from a conv stack's middle."""
    producers = {output: node for node in model.graph.node for output in node.output}
    found = set()
    for value in model.graph.output:
        node = producers.get(value.name)
        while node is not None and node.op_type in SHAPE_ONLY:
            node = producers.get(node.input[0])
        if node is not None and node.op_type in CLASS_PRODUCERS:
            found.add(value.name)
    return found


def class_scores(array: np.ndarray, samples: int, dense: bool = False) -> np.ndarray | None:
    """The output as `[samples, C]` when it is one (singleton dims squeezed); with `dense` (a declared
    classifier output), a map `[N, C, ...]` as one row of class scores per position; else None."""
    if array.ndim == 0 or array.shape[0] != samples:
        return None
    kept = [n for n in array.shape[1:] if n != 1]
    if len(kept) == 1 and kept[0] > 1:
        return array.reshape(samples, kept[0])
    if dense and array.ndim > 2 and array.shape[1] > 1:
        return np.moveaxis(array, 1, -1).reshape(-1, array.shape[1])
    return None
