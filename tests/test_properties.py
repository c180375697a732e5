"""Property-based checks over random conv stacks (hypothesis): full-rank rewrites reproduce the model and
statistics do not depend on the order of the data."""

import numpy as np
from builders import IR_VERSION, relative_error, run
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnx_dacomp
from onnx_dacomp.calibration.collect import collect_statistics
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.targets import find_targets


@st.composite
def conv_stacks(draw):
    """A chain of 1-3 Convs with random channels, kernels, strides, pads and dilations, ReLU between them."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels = draw(st.integers(1, 6))
    nodes, inits, current = [], [], "x"
    height = width = 10
    for index in range(draw(st.integers(1, 3))):
        out_channels = draw(st.integers(1, 6))
        kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        pads = [draw(st.integers(0, 2)) for _ in range(4)]
        height = (height + pads[0] + pads[2] - dilation * (kernel[0] - 1) - 1) // stride + 1
        width = (width + pads[1] + pads[3] - dilation * (kernel[1] - 1) - 1) // stride + 1
        if min(height, width) < 1 and index > 0:
            break  # this conv would not fit its input: the stack ends before it
        assume(min(height, width) >= 1)
        inits.append(
            numpy_helper.from_array(
                rng.standard_normal((out_channels, channels, *kernel)).astype(np.float32), f"w{index}"
            )
        )
        inits.append(numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), f"b{index}"))
        nodes.append(
            helper.make_node(
                "Conv", [current, f"w{index}", f"b{index}"], [f"c{index}"], name=f"conv{index}",
                kernel_shape=list(kernel), strides=[stride] * 2, dilations=[dilation] * 2, pads=pads,
            )
        )  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        current, channels = f"r{index}", out_channels
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", inits[0].dims[1], 10, 10])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [None] * 4)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    data = rng.standard_normal((12, inits[0].dims[1], 10, 10)).astype(np.float32)
    return model, data


@settings(max_examples=25, deadline=None)
@given(conv_stacks(), st.sampled_from(["tucker2", "svd", "cp"]))
def test_full_rank_reproduces_any_stack(stack, method):
    model, data = stack
    ranks = {}
    for layer in find_targets(model).targets:
        taps = int(np.prod(layer.kernel_shape))
        if method == "tucker2":
            ranks[layer.name] = {"method": "tucker2", "ranks": [layer.out_channels, layer.in_channels]}
        elif method == "svd":
            ranks[layer.name] = {"method": "svd", "ranks": [min(layer.out_channels, layer.in_channels * taps)]}
        else:  # the CP rank T*S is always enough: one component per (t, s) pair carries that kernel
            ranks[layer.name] = {"method": "cp", "ranks": [layer.out_channels * layer.in_channels * taps]}
    batches = [{"x": data[:6]}, {"x": data[6:]}]
    config = CompressConfig(ratio=None, ranks=ranks, holdout=0, max_iter=200 if method == "cp" else 20)
    result = onnx_dacomp.compress(model, batches, config, progress=False)
    tolerance = 1e-3 if method == "cp" else 1e-4
    assert relative_error(run(result.model, {"x": data})[0], run(model, {"x": data})[0]) < tolerance


@settings(max_examples=15, deadline=None)
@given(conv_stacks(), st.randoms(use_true_random=False))
def test_statistics_do_not_depend_on_data_order(stack, random):
    model, data = stack
    layers = find_targets(model).targets
    order = list(range(len(data)))
    random.shuffle(order)
    # every output position (a sampled grid's phase depends on where a run starts in the data)
    options = dict(device="cpu", progress=False, positions="all")
    first = collect_statistics(model, layers, [{"x": data[:5]}, {"x": data[5:]}], **options)
    shuffled = data[order]
    second = collect_statistics(model, layers, [{"x": shuffled[:7]}, {"x": shuffled[7:]}], **options)
    for layer in layers:
        a, b = first.layers[layer.name], second.layers[layer.name]
        assert a.count == b.count
        scale = max(np.abs(a.second).max(), 1e-12)
        assert np.abs(a.second - b.second).max() <= 1e-5 * scale
        # float32 sums of values of either sign: their rounding scales with count * RMS (sqrt(count * sum x^2)),
        # not with the sum, which cancels
        magnitude = np.sqrt(a.count * scale)
        assert np.abs(a.first - b.first).max() <= 1e-5 * max(magnitude, np.abs(a.first).max(), 1e-12)
