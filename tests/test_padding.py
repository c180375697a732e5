"""Explicit zero Pads folded into the Conv after them: the same output as a numpy convolution of the padded
input, no Pad left, the input model untouched; every Pad that is not such a pad stays."""

import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, conv_reference, relative_error, run
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnx_dacomp
from onnx_dacomp.padding import fold_pads

SHARED = Path(__file__).resolve().parents[2] / "shared"
RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((6, 1, 3, 3))  # depthwise: 6 channels, one input channel each
X = RNG.standard_normal((2, 6, 9, 10)).astype(np.float32)
TF_SAME = [0, 0, 0, 1, 0, 0, 1, 1]  # N, C, H, W begins; N, C, H, W ends (TensorFlow's SAME at stride 2)


def _model(pad_nodes, pad_inputs, conv_attrs=None, extra_outputs=(), inits=(), opset=17):
    """x -> Pad(pad_inputs) -> depthwise Conv (stride 2) -> y, with `pad_nodes` computing the Pad's inputs."""
    conv = helper.make_node("Conv", ["p", "W"], ["y"], name="conv", group=6, strides=[2, 2], **(conv_attrs or {}))
    nodes = [*pad_nodes, helper.make_node("Pad", ["x", *pad_inputs], ["p"], name="pad"), conv]
    graph = helper.make_graph(
        nodes, "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 9, 10])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", *extra_outputs)],
        [numpy_helper.from_array(WEIGHT.astype(np.float32), "W"), *inits],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def _computed_pads(amounts):
    """The Pad amounts as a PyTorch export of TF padding computes them: a constant, reshaped, cast."""
    return [
        helper.make_node("Constant", [], ["raw"], value=numpy_helper.from_array(np.asarray(amounts, np.float32))),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.asarray([-1], np.int64))),
        helper.make_node("Reshape", ["raw", "shape"], ["flat"]),
        helper.make_node("Cast", ["flat"], ["amounts"], to=TensorProto.INT64),
    ]


def _reference(x, amounts, conv_pads=(0, 0, 0, 0)):
    padded = np.pad(x, [(amounts[i], amounts[i + 4]) for i in range(4)])
    return conv_reference(padded, WEIGHT, strides=(2, 2), pads=conv_pads, dilations=(1, 1), group=6)


def test_a_computed_zero_pad_is_folded_into_the_conv_and_its_constants_go():
    model = _model(_computed_pads(TF_SAME), ["amounts"])
    before = model.SerializeToString()
    folding = fold_pads(model)
    assert folding.folded == ("pad",) and model.SerializeToString() == before
    ops = [node.op_type for node in folding.model.graph.node]
    assert ops == ["Conv"]  # the Pad and the graph that computed its amounts are gone
    (conv,) = folding.model.graph.node
    assert list(conv.input[:1]) == ["x"]
    assert {a.name: list(a.ints) for a in conv.attribute}["pads"] == [0, 1, 1, 1]  # H, W begins; H, W ends
    assert relative_error(run(folding.model, {"x": X})[0], _reference(X, TF_SAME)) < 1e-5


def test_the_pad_adds_to_the_convs_own_pads_and_takes_an_explicit_zero_value_and_axes():
    inits = [
        numpy_helper.from_array(np.asarray([2, 1, 0, 3], np.int64), "amounts"),  # H, W begins; H, W ends
        numpy_helper.from_array(np.asarray(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.asarray([2, 3], np.int64), "axes"),
    ]
    model = _model([], ["amounts", "zero", "axes"], {"pads": [1, 0, 0, 1]}, inits=inits, opset=18)
    folding = fold_pads(model)
    assert folding.folded == ("pad",) and "Pad" not in [node.op_type for node in folding.model.graph.node]
    assert not folding.model.graph.initializer[1:]  # only W is left
    amounts = [0, 0, 2, 1, 0, 0, 0, 3]
    expected = _reference(X, amounts, conv_pads=(1, 0, 0, 1))
    assert relative_error(run(folding.model, {"x": X})[0], expected) < 1e-5
    assert relative_error(run(model, {"x": X})[0], expected) < 1e-5  # the reference is the model's function


def test_the_opset_2_pad_with_attributes_is_folded():
    pad = helper.make_node("Pad", ["x"], ["p"], name="pad", pads=TF_SAME, mode="constant", value=0.0)
    conv = helper.make_node("Conv", ["p", "W"], ["y"], name="conv", group=6, strides=[2, 2])
    graph = helper.make_graph(
        [pad, conv], "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 9, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(WEIGHT.astype(np.float32), "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)], ir_version=IR_VERSION)
    folding = fold_pads(model)
    assert folding.folded == ("pad",)
    assert relative_error(run(folding.model, {"x": X})[0], _reference(X, TF_SAME)) < 1e-5


def _shape_dependent():
    """Amounts computed from the input's shape: not constant."""
    return [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["zeros"], value=numpy_helper.from_array(np.zeros(4, np.int64))),
        helper.make_node("Concat", ["zeros", "shape"], ["raw"], axis=0),
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.asarray([1], np.int64))),
        helper.make_node("Min", ["raw", "one"], ["amounts"]),
    ]


@pytest.mark.parametrize(
    "case",
    ["nonzero value", "reflect", "channel axis", "two readers", "graph output", "from the input's shape", "auto_pad"],
)
def test_a_pad_that_is_not_a_conv_s_zero_padding_stays(case):
    value = [numpy_helper.from_array(np.asarray(0.5, np.float32), "value")]
    amounts = [numpy_helper.from_array(np.asarray(TF_SAME, np.int64), "amounts")]
    channels = [numpy_helper.from_array(np.asarray([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "amounts")]
    model = {
        "nonzero value": lambda: _model([], ["amounts", "value"], inits=amounts + value),
        "reflect": lambda: _model([], ["amounts"], inits=amounts),
        "channel axis": lambda: _model([], ["amounts"], inits=channels),
        "two readers": lambda: _model([helper.make_node("Relu", ["p"], ["r"])], ["amounts"], inits=amounts),
        "graph output": lambda: _model([], ["amounts"], extra_outputs=["p"], inits=amounts),
        "from the input's shape": lambda: _model(_shape_dependent(), ["amounts"]),
        "auto_pad": lambda: _model([], ["amounts"], {"auto_pad": "SAME_UPPER"}, inits=amounts),
    }[case]()
    if case == "reflect":
        next(node for node in model.graph.node if node.op_type == "Pad").attribute.append(
            helper.make_attribute("mode", "reflect")
        )
    if case == "two readers":  # the Relu reads the Pad's output too (and nothing reads the Relu)
        model.graph.node.insert(len(model.graph.node), model.graph.node.pop(0))
    folding = fold_pads(model)
    assert folding.folded == () and folding.model is model


def test_compress_writes_the_model_with_its_pads_folded_and_says_so():
    """A Pad before a decomposable 3x3 conv (the chain's first node reads the Pad) and one before a kept
    depthwise conv: both folded in the written model, which is verified against the original."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 6, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((16, 1, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "same"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "same"], ["p1"], name="pad1"),
        helper.make_node("Conv", ["p1", "W1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Pad", ["r1", "same"], ["p2"], name="pad2"),
        helper.make_node("Conv", ["p2", "W2"], ["y"], name="depthwise", group=16),
    ]
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    data = rng.standard_normal((64, 6, 12, 12)).astype(np.float32)
    result = onnx_dacomp.compress(
        model, [{"x": data}], ratio=None, ranks={"conv1": [16, 6]}, method="tucker2", holdout=0, progress=False,
        benchmark=False,
    )  # fmt: skip
    assert result.report.folded_pads == ("pad1", "pad2")
    assert "Pad" not in [node.op_type for node in result.model.graph.node]
    assert "2 explicit zero Pad(s) folded" in result.report.table()
    assert result.report.to_dict()["folded_pads"] == ["pad1", "pad2"]
    x = data[:4]
    assert relative_error(run(result.model, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4  # full ranks: exact


@pytest.mark.skipif(not (SHARED / "models").is_dir() or not (SHARED / "data").is_dir(), reason="needs ../shared")
def test_efficientnet_lite0s_seventeen_tf_pads_fold_and_its_output_is_unchanged_on_real_images():
    model = onnx.load(SHARED / "models" / "efficientnet_lite0_imagenet.onnx")
    folding = fold_pads(model)
    assert len(folding.folded) == 17 and "Pad" not in {node.op_type for node in folding.model.graph.node}
    with tarfile.open(SHARED / "data" / "imagenet_sample_1000.tar.gz") as archive:
        members = [member for member in archive.getmembers() if member.name.endswith(".JPEG")]
        chosen = np.random.default_rng(3).choice(len(members), 4, replace=False)
        images = []
        for index in chosen:  # the model's preprocessing: 224 center crop of the 256 short side, (x - 127) / 128
            image = Image.open(archive.extractfile(members[index])).convert("RGB")
            scale = 256 / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            left, top = (image.width - 224) // 2, (image.height - 224) // 2
            pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)
            images.append(((pixels - 127) / 128).transpose(2, 0, 1))
    x = np.stack(images)
    assert relative_error(run(folding.model, {"input": x})[0], run(model, {"input": x})[0]) < 1e-6
