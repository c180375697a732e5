"""Test helpers: small ONNX models built by hand, onnxruntime runs, and a float64 numpy conv reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

IR_VERSION = 8  # what every onnxruntime release we support can load
SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared"


def conv_model(weight, bias=None, *, input_shape, dtype=np.float32, opset=17, **attrs) -> onnx.ModelProto:
    """One Conv node `y = Conv(x, W[, B])` with the weight and bias as initializers."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(np.asarray(weight, dtype), "W")]
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, dtype), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", elem, list(input_shape))],
        [helper.make_tensor_value_info("y", elem, [None] * len(input_shape))],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def conv_stack(dtype=np.float32, channels=4, size=(9, 11), seed=0, input_channels=None):
    """Input -> a chain of Convs covering stride, asymmetric pads, auto_pad, dilation and groups."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    specs = [
        dict(kernel=(3, 3), strides=[1, 1], pads=[1, 1, 1, 1]),
        dict(kernel=(3, 2), strides=[2, 1], pads=[0, 1, 2, 0]),
        dict(kernel=(3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
        dict(kernel=(2, 3), auto_pad="SAME_LOWER"),
        dict(kernel=(3, 3), dilations=[2, 1], pads=[2, 1, 1, 0], group=2),
        dict(kernel=(1, 1), auto_pad="VALID", strides=[1, 2]),
    ]
    nodes, inits, current = [], [], "x"
    for index, spec in enumerate(specs):
        spec = dict(spec)
        kernel, group = spec.pop("kernel"), spec.get("group", 1)
        fan_in = (input_channels or channels) if index == 0 else channels
        weight = rng.standard_normal((channels, fan_in // group, *kernel)).astype(dtype)
        inits.append(numpy_helper.from_array(weight, f"w{index}"))
        inits.append(numpy_helper.from_array(rng.standard_normal(channels).astype(dtype), f"b{index}"))
        out = f"c{index}"
        nodes.append(
            helper.make_node(
                "Conv",
                [current, f"w{index}", f"b{index}"],
                [out],
                name=f"conv{index}",
                kernel_shape=list(kernel),
                **spec,
            )
        )
        nodes.append(helper.make_node("Relu", [out], [f"r{index}"]))
        current = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", elem, ["n", input_channels or channels, *size])],
        [helper.make_tensor_value_info(current, elem, [None] * 4)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def reference_patches(model, layer, batch) -> np.ndarray:
    """The patches of `layer`'s input for one batch, `(positions, group, n)` in float64, by explicit loops
    over output positions and kernel taps (2-D convs; independent of onnx_dacomp's own im2col)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=layer.input))
    group = layer.group
    per_group = layer.in_channels // group
    x = run(probe, batch)[-1].astype(np.float64)
    size = x.shape[2:]
    if layer.auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        axis_pads = [
            same_pads(n, k, s, d, layer.auto_pad)
            for n, k, s, d in zip(size, layer.kernel_shape, layer.strides, layer.dilations)
        ]
        pads = [p[0] for p in axis_pads] + [p[1] for p in axis_pads]
    else:
        pads = list(layer.pads)
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_shape, layer.strides, layer.dilations
    out_h = (padded.shape[2] - (kh - 1) * dh - 1) // sh + 1
    out_w = (padded.shape[3] - (kw - 1) * dw - 1) // sw + 1
    rows = []
    for n in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                rows.append(
                    [
                        [
                            padded[n, g * per_group + c, i * sh + a * dh, j * sw + b * dw]
                            for c in range(per_group)
                            for a in range(kh)
                            for b in range(kw)
                        ]
                        for g in range(group)
                    ]
                )
    return np.array(rows)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def same_pads(size, kernel, stride, dilation, mode):
    """Begin/end padding of one axis under auto_pad, as the ONNX spec defines it."""
    if mode == "VALID":
        return 0, 0
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small, large = total // 2, total - total // 2
    return (small, large) if mode == "SAME_UPPER" else (large, small)


def conv_reference(x, weight, bias=None, *, strides, pads, dilations, group=1):
    """Direct float64 convolution (cross-correlation) for N-C-spatial inputs, 1-D or 2-D."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    spatial = weight.ndim - 2
    if spatial == 1:
        x, weight = x[:, :, None, :], weight[:, :, None, :]
        strides, dilations = (1, *strides), (1, *dilations)
        pads = (0, pads[0], 0, pads[1])
    n, channels, height, width = x.shape
    out_channels, per_group, kh, kw = weight.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (padded.shape[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    out_w = (padded.shape[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    y = np.zeros((n, out_channels, out_h, out_w))
    per_out = out_channels // group
    for g in range(group):
        xs = padded[:, g * per_group : (g + 1) * per_group]
        ws = weight[g * per_out : (g + 1) * per_out]
        for i in range(kh):
            for j in range(kw):
                h0, w0 = i * dilations[0], j * dilations[1]
                window = xs[
                    :,
                    :,
                    h0 : h0 + strides[0] * (out_h - 1) + 1 : strides[0],
                    w0 : w0 + strides[1] * (out_w - 1) + 1 : strides[1],
                ]
                y[:, g * per_out : (g + 1) * per_out] += np.einsum("nchw,oc->nohw", window, ws[:, :, i, j])
    if bias is not None:
        y += np.asarray(bias, np.float64)[None, :, None, None]
    return y[:, :, 0, :] if spatial == 1 else y


def relative_error(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    difference = float(np.linalg.norm(np.asarray(actual, np.float64) - expected))
    scale = float(np.linalg.norm(expected))
    return difference / scale if scale > 0 else difference  # an all-padding output is exactly zero
