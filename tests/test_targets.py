"""Conv target discovery: geometry, params and MACs against hand computations, skip reasons."""

import numpy as np
import pytest
from builders import IR_VERSION, SHARED, conv_model
from onnx import TensorProto, helper, numpy_helper

from onnx_dacomp.errors import UserError
from onnx_dacomp.load import load_model
from onnx_dacomp.targets import find_targets

needs_shared = pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared/models is absent")


@needs_shared
def test_resnet56_layers_and_macs_by_hand():
    scan = find_targets(load_model(SHARED / "models" / "cifar10_resnet56.onnx"))
    assert len(scan.layers) == 56 and len(scan.targets) == 56 and scan.layers[-1].op_type == "Gemm"
    assert scan.layers[-1].macs == 64 * 10 and scan.layers[-1].params == 64 * 10 + 10
    scan = type(scan)(scan.layers[:-1])  # the 55 Conv layers

    # stem 3->16 at 32x32; 3 stages of 18 3x3 convs (16@32x32, 32@16x16, 64@8x8), the first of stages 2-3
    # with stride 2 and half the input channels; option-A shortcuts have no conv
    def stage(c_in, c, side):
        return c * c_in * 9 * side * side + 17 * c * c * 9 * side * side

    expected = 16 * 3 * 9 * 32 * 32 + 18 * 16 * 16 * 9 * 32 * 32 + stage(16, 32, 16) + stage(32, 64, 8)
    assert sum(layer.macs for layer in scan.layers) == expected
    first = scan.layers[0]
    assert (first.out_channels, first.in_channels, first.kernel_shape, first.strides) == (16, 3, (3, 3), (1, 1))
    assert first.params == 16 * 3 * 9 + 16  # weight + bias
    assert [layer.strides for layer in scan.layers].count((2, 2)) == 2


@needs_shared
def test_efficientnet_depthwise_convs_are_skipped_with_reason():
    scan = find_targets(load_model(SHARED / "models" / "efficientnet_lite0_imagenet.onnx"))
    assert len(scan.layers) == 50 and scan.layers[-1].op_type == "Gemm"  # 49 Conv and the classifier
    scan = type(scan)(scan.layers[:-1])
    depthwise = [layer for layer in scan.layers if layer.group > 1]
    assert len(depthwise) == 16 and all("depthwise" in layer.skip_reason for layer in depthwise)
    # shapes behind the computed Pad nodes come from an onnxruntime run: every layer has its MACs
    assert all(layer.macs for layer in scan.layers)
    stem = scan.layers[0]
    assert stem.output_shape == (1, 32, 112, 112) and stem.macs == 32 * 3 * 9 * 112 * 112


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_constant_weight_behind_identity_and_attributes():
    weight = np.ones((6, 4, 3, 1), np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(weight)),
        helper.make_node("Identity", ["w_const"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 1], pads=[1, 0, 2, 0], dilations=[2, 1]),
    ]
    model = _model(nodes, [_vi("x", [1, 4, 10, 7])], [_vi("y", None)])
    (layer,) = find_targets(model).layers
    assert layer.decomposable and layer.name == "y"  # nameless node: named by its output
    assert (layer.strides, layer.pads, layer.dilations) == ((2, 1), (1, 0, 2, 0), (2, 1))
    # H: (10 + 3 - (3-1)*2 - 1) // 2 + 1 = 5; W: 7
    assert layer.output_shape == (1, 6, 5, 7)
    assert layer.macs == 6 * 4 * 3 * 5 * 7 and layer.params == 6 * 4 * 3


def test_dynamic_spatial_dims_need_input_shape():
    model = conv_model(np.ones((2, 3, 3, 3)), input_shape=("n", 3, "h", "w"), pads=[1, 1, 1, 1])
    assert find_targets(model).layers[0].macs is None
    layer = find_targets(model, {"x": (1, 3, 20, 30)}).layers[0]
    assert layer.macs == 2 * 3 * 9 * 20 * 30
    with pytest.raises(UserError, match="fixed to 3"):
        find_targets(model, {"x": (1, 4, 20, 30)})
    with pytest.raises(UserError, match="model's inputs"):
        find_targets(model, {"image": (1, 3, 20, 30)})


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dtype_and_group(dtype):
    model = conv_model(np.ones((8, 2, 3, 3)), input_shape=(1, 4, 8, 8), dtype=dtype, group=2)
    (layer,) = find_targets(model).layers
    assert layer.decomposable and layer.dtype == np.dtype(dtype).name and layer.in_channels == 4
    assert layer.macs == 8 * 2 * 9 * 6 * 6


def test_skip_reasons():
    x = _vi("x", [1, 4, 6, 6])
    inits = [
        numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w_dw"),
        numpy_helper.from_array(np.ones((4, 4, 1, 1, 1), np.float32), "w_3d"),
        numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w_t"),
        numpy_helper.from_array(np.array([[[[np.nan]]]] * 4, np.float32).repeat(4, 1), "w_nan"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_dw"], ["dw"], name="depthwise", group=4),
        helper.make_node("Unsqueeze", ["x", "axes"], ["x5"]),
        helper.make_node("Conv", ["x5", "w_3d"], ["c3"], name="conv3d"),
        helper.make_node("ConvTranspose", ["x", "w_t"], ["ct"], name="transposed"),
        helper.make_node("Relu", ["w_t"], ["w_relu"]),
        helper.make_node("Conv", ["x", "w_relu"], ["computed"], name="computed"),
        helper.make_node("Conv", ["x", "w_nan"], ["nan"], name="nan"),
        helper.make_node("Conv", ["x", "w_in"], ["from_input"], name="from_input"),
    ]
    inits.append(numpy_helper.from_array(np.array([4], np.int64), "axes"))
    model = _model(
        nodes,
        [x, _vi("w_in", [4, 4, 1, 1])],
        [_vi(n, None) for n in ("dw", "c3", "ct", "computed", "nan", "from_input")],
        inits,
    )
    reasons = {layer.name: layer.skip_reason for layer in find_targets(model).layers}
    assert "depthwise" in reasons["depthwise"]
    assert "3-D convolution" in reasons["conv3d"]
    assert "ConvTranspose" in reasons["transposed"]
    assert reasons["computed"] == "weight is not a constant (computed by Relu)"
    assert "NaN" in reasons["nan"]
    assert "graph input" in reasons["from_input"]


def test_quantized_convs_are_skipped():
    x = _vi("x", [1, 4, 6, 6])
    inits = [
        numpy_helper.from_array(np.ones((4, 4, 3, 3), np.int8), "wq"),
        numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["y"], name="qdq"),
    ]
    reasons = [layer.skip_reason for layer in find_targets(_model(nodes, [x], [_vi("y", None)], inits)).layers]
    assert "DequantizeLinear" in reasons[0]


def test_model_without_conv_is_refused():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [1])], [_vi("y", [1])])
    with pytest.raises(UserError, match="no Conv"):
        find_targets(model)
