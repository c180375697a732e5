"""Values of constant tensors in a graph, looked through the nodes that keep them constant."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

PASS_THROUGH = ("Identity", "Cast")  # nodes between a constant and its consumer that still leave a constant


class ConstantResolver:
    """Values of constant tensors: initializers and Constant nodes, looked through Identity and Cast."""

    def __init__(self, graph: onnx.GraphProto):
        self._initializers = {init.name: init for init in graph.initializer}
        self._overridable = {value.name for value in graph.input} & set(self._initializers)
        self._producers = {output: node for node in graph.node for output in node.output}

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producers.get(name)

    def source(self, name: str) -> str | None:
        """Why `name` is not a usable constant ('input', 'computed by OP'), or None if it is one."""
        name = self._through_identity(name)
        if name in self._overridable:
            return "input"
        if name in self._initializers:
            return None
        node = self._producers.get(name)
        if node is not None and node.op_type == "Constant":
            return None
        return f"computed by {node.op_type}" if node is not None else "input"

    def value(self, name: str) -> np.ndarray:
        node = self._producers.get(name)
        if name not in self._initializers and node is not None and node.op_type in PASS_THROUGH:
            value = self.value(node.input[0])
            if node.op_type == "Cast":
                to = helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
                value = value.astype(helper.tensor_dtype_to_np_dtype(to))
            return value
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        attribute = node.attribute[0]
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        return np.asarray(helper.get_attribute_value(attribute))

    def _through_identity(self, name: str) -> str:
        """The tensor behind Identity and Cast nodes (a Cast of a constant is a constant)."""
        node = self._producers.get(name)
        while node is not None and node.op_type in PASS_THROUGH and name not in self._initializers:
            name = node.input[0]
            node = self._producers.get(name)
        return name
