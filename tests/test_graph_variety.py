"""Real-world graph shapes through the whole `compress` job: each on a generated model, checked by running
original and compressed models in onnxruntime."""

import hashlib

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, relative_error, run
from onnx import TensorProto, helper, numpy_helper

import onnx_dacomp
from onnx_dacomp.calibration.collect import collect_statistics
from onnx_dacomp.calibration.sources import IterableSource
from onnx_dacomp.cli import main
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.targets import find_targets

RNG = np.random.default_rng(7)


def _model(nodes, inits, inputs, outputs, opset=17, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION, functions=list(functions)
    )


def _value(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _weight(name, shape, dtype=np.float32):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def _batches(shapes, count=4, batch=8, dtype=np.float32):
    rng = np.random.default_rng(1)
    return [{n: rng.standard_normal((batch, *s)).astype(dtype) for n, s in shapes.items()} for _ in range(count)]


def _full_ranks(model):
    ranks = {}
    for layer in find_targets(model).targets:
        out_channels, in_channels = layer.out_channels // layer.group, layer.in_channels // layer.group
        ranks[layer.name] = {"method": "tucker2", "ranks": [out_channels, in_channels]}
    return ranks


def _compress(model, batches, **options):
    config = CompressConfig(**{"holdout": 0, "max_iter": 5, "rank_multiple": 1, **options})
    return onnx_dacomp.compress(model, IterableSource(batches, []), config, progress=False)


def _two_convs(channels, input_dims, dtype=np.float32):
    """conv0 (3x3, 3 -> channels) -> ReLU -> conv1 (3x3, channels -> channels), pads 1, output `y`."""
    nodes = [
        _conv(["x", "w0"], "c0", "conv0"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        _conv(["r0", "w1"], "y", "conv1"),
    ]
    inits = [_weight("w0", (channels, input_dims[1], 3, 3), dtype), _weight("w1", (channels, channels, 3, 3), dtype)]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return _model(nodes, inits, [_value("x", input_dims, elem)], [_value("y", [None] * 4, elem)])


def _conv(inputs, output, name, **attrs):
    return helper.make_node("Conv", inputs, [output], name=name, pads=[1, 1, 1, 1], **attrs)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opsets_weights_behind_cast_and_unfused_batchnorm(opset):
    bn = [_weight(n, (8,)) for n in ("scale", "bias_bn", "mean")] + [
        numpy_helper.from_array(np.ones(8, np.float32), "var")
    ]
    nodes = [
        helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),  # a float16 weight cast up
        _conv(["x", "w32"], "c0", "conv0"),
        helper.make_node("BatchNormalization", ["c0", "scale", "bias_bn", "mean", "var"], ["n0"], name="bn"),
        helper.make_node("Relu", ["n0"], ["r0"]),
        _conv(["r0", "w1"], "y", "conv1"),
    ]
    inits = [_weight("w16", (8, 4, 3, 3), np.float16), _weight("w1", (8, 8, 3, 3)), *bn]
    model = _model(nodes, inits, [_value("x", ["n", 4, 10, 10])], [_value("y", ["n", 8, 10, 10])], opset=opset)
    batches = _batches({"x": (4, 10, 10)})
    assert [layer.decomposable for layer in find_targets(model).layers] == [True, True]
    result = _compress(model, batches, ratio=None, ranks=_full_ranks(model))
    assert len(result.report.compressed) == 2
    assert {node.op_type for node in result.model.graph.node} >= {"BatchNormalization", "Relu"}
    assert "w16" not in {init.name for init in result.model.graph.initializer}  # replaced, Cast removed too
    x = batches[0]
    assert relative_error(run(result.model, x)[0], run(model, x)[0]) < 1e-4


def test_float16_model_is_fitted_in_float64_and_written_in_float16():
    nodes = [
        _conv(["x", "w0"], "c0", "conv0"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        _conv(["r0", "w1"], "y", "conv1"),
    ]
    inits = [_weight("w0", (16, 4, 3, 3), np.float16), _weight("w1", (16, 16, 3, 3), np.float16)]
    elem = TensorProto.FLOAT16
    model = _model(nodes, inits, [_value("x", ["n", 4, 10, 10], elem)], [_value("y", ["n", 16, 10, 10], elem)])
    batches = _batches({"x": (4, 10, 10)}, dtype=np.float16)
    full = _compress(model, batches, ratio=None, ranks=_full_ranks(model)).model
    assert {init.data_type for init in full.graph.initializer} == {TensorProto.FLOAT16}
    x = batches[0]
    assert relative_error(run(full, x)[0], run(model, x)[0]) < 1e-2  # float16 rounding of the factors
    half = _compress(model, batches, ratio=0.5)
    assert half.report.ratio <= 0.5
    onnx.checker.check_model(half.model)


def test_shared_weight_never_corrupts_the_other_conv():
    nodes = [
        _conv(["x", "w"], "c0", "first"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        _conv(["r0", "w"], "y", "second"),
    ]
    model = _model(nodes, [_weight("w", (6, 6, 3, 3))], [_value("x", ["n", 6, 8, 8])], [_value("y", ["n", 6, 8, 8])])
    batches = _batches({"x": (6, 8, 8)})
    # only the first is compressed: the second must still read the original weight
    result = _compress(model, batches, ratio=None, ranks={"first": [6, 6]})
    assert "w" in {init.name for init in result.model.graph.initializer}
    x = batches[0]
    assert relative_error(run(result.model, x)[0], run(model, x)[0]) < 1e-4
    both = _compress(model, batches, ratio=0.6)
    onnx.checker.check_model(both.model)


def test_multiple_inputs_functions_and_subgraphs_stay_intact():
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["y0"], ["t"])], "then", [], [_value("t", None)]
    )  # reads the outer-scope tensor y0
    else_graph = helper.make_graph([helper.make_node("Neg", ["y0"], ["e"])], "else", [], [_value("e", None)])
    function = helper.make_function(
        "local", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])], [helper.make_opsetid("", 17)]
    )
    nodes = [
        _conv(["x", "w0"], "c0", "conv0"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        _conv(["r0", "w1"], "c1", "conv1"),
        helper.make_node("Add", ["c1", "extra"], ["y0"]),
        helper.make_node("If", ["flag"], ["y1"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Double", ["y1"], ["y"], domain="local"),
    ]
    inputs = [_value("x", ["n", 3, 8, 8]), _value("extra", ["n", 8, 8, 8]), _value("flag", [], TensorProto.BOOL)]
    model = _model(
        nodes,
        [_weight("w0", (8, 3, 3, 3)), _weight("w1", (8, 8, 3, 3))],
        inputs,
        [_value("y", None)],
        functions=[function],
    )
    model.opset_import.append(helper.make_opsetid("local", 1))
    rng = np.random.default_rng(2)
    batches = [
        {
            "x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32),
            "extra": rng.standard_normal((4, 8, 8, 8)).astype(np.float32),
            "flag": np.array(True),
        }
        for _ in range(3)
    ]
    # a scalar input has no batch axis: the statistics are gathered from batches that feed it as is
    stats = collect_statistics(model, find_targets(model).targets, batches, device="cpu", progress=False)
    result = onnx_dacomp.compress(
        model, None, CompressConfig(ratio=None, ranks=_full_ranks(model)), statistics=stats, progress=False
    )
    new = result.model
    assert [f.SerializeToString() for f in new.functions] == [function.SerializeToString()]
    if_nodes = [n for n in new.graph.node if n.op_type == "If"]
    assert len(if_nodes) == 1 and if_nodes[0].SerializeToString() == nodes[4].SerializeToString()
    for flag in (True, False):
        feeds = dict(batches[0], flag=np.array(flag))
        assert relative_error(run(new, feeds)[0], run(model, feeds)[0]) < 1e-4


def test_same_seed_gives_byte_identical_files(tmp_path):
    model = _two_convs(12, ["n", 3, 12, 12])
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, path)
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 3, 12, 12)).astype(np.float32))
    digests = []
    for index in range(2):
        out = tmp_path / f"out{index}.onnx"
        args = ["-q", "compress", str(path), "-o", str(out), "--data", str(data), "--method", "cp", "--seed", "3"]
        assert main([*args, "--ratio", "0.5", "--holdout", "8"]) == 0
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_dynamic_spatial_dims_are_fixed_by_input_shape():
    model = _two_convs(8, ["n", 3, "h", "w"])
    batches = _batches({"x": (3, 10, 12)})
    from onnx_dacomp.errors import UserError

    with pytest.raises(UserError, match="--input-shape"):
        _compress(model, batches, ratio=0.6)
    result = _compress(model, batches, ratio=0.6, input_shapes={"x": (1, 3, 10, 12)})
    assert result.report.ratio <= 0.6
    assert run(result.model, batches[0])[0].shape == (8, 8, 10, 12)


def test_layer_too_large_for_a_covariance_is_skipped_with_a_reason():
    channels = 2400  # 2400 * 3 * 3 = 21,600 patch entries: a 3.5 GiB covariance
    nodes = [
        _conv(["x", "w0"], "c0", "huge"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        _conv(["r0", "w1"], "y", "small"),
    ]
    inits = [_weight("w0", (8, channels, 3, 3)), _weight("w1", (8, 8, 3, 3))]
    model = _model(nodes, inits, [_value("x", ["n", channels, 4, 4])], [_value("y", [None] * 4)])
    report = _compress(model, _batches({"x": (channels, 4, 4)}, count=1, batch=2), ratio=0.9).report
    huge = next(layer for layer in report.layers if layer.name == "huge")
    assert huge.method is None and "too large for a covariance" in huge.reason


def test_external_data_model_in_and_nan_weights_refused(tmp_path, capsys):
    nodes = [
        _conv(["x", "w0"], "c0", "conv0"),
        helper.make_node("Relu", ["c0"], ["r0"]),
        _conv(["r0", "w1"], "y", "conv1"),
    ]
    inits = [_weight("w0", (8, 3, 3, 3)), _weight("w1", (8, 8, 3, 3))]
    model = _model(nodes, inits, [_value("x", ["n", 3, 8, 8])], [_value("y", [None] * 4)])
    path = tmp_path / "ext.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data rewrites the tensors of the saved object
    onnx.save_model(copy, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    before = (path.read_bytes(), (tmp_path / "ext.data").read_bytes())
    out = tmp_path / "small.onnx"
    assert main(["-q", "compress", str(path), "-o", str(out), "--norm", "frobenius", "--ratio", "0.6"]) == 0
    assert (path.read_bytes(), (tmp_path / "ext.data").read_bytes()) == before
    x = _batches({"x": (3, 8, 8)}, count=1)[0]
    assert relative_error(run(onnx.load(str(out)), x)[0], run(model, x)[0]) < 1.0

    inits[1] = numpy_helper.from_array(np.full((8, 8, 3, 3), np.nan, np.float32), "w1")
    broken = tmp_path / "nan.onnx"
    onnx.save(_model(nodes, inits, [_value("x", ["n", 3, 8, 8])], [_value("y", [None] * 4)]), broken)
    capsys.readouterr()
    assert main(["compress", str(broken), "-o", str(tmp_path / "never.onnx"), "--norm", "frobenius"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN or Inf weights" in err[0] and not (tmp_path / "never.onnx").exists()
