"""The rewrite touches only the replaced node: the rest of the graph, names and metadata survive."""

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, SHARED, conv_reference, relative_error, run
from onnx import TensorProto, helper, numpy_helper

from onnx_dacomp.decompose.factors import CPFactors, SVDFactors, Tucker2Factors
from onnx_dacomp.load import load_model
from onnx_dacomp.rewrite import drop_unread, replace_layers
from onnx_dacomp.targets import find_targets


def _orthogonal(rng, n):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q


def exact_tucker2(weight, rng):
    """Tucker-2 that reconstructs `weight` exactly: random orthogonal factors, each with one extra column
    whose core slice is zero (so neither factor is square and the chain keeps its three convs)."""
    u_t, u_s = _orthogonal(rng, weight.shape[0]), _orthogonal(rng, weight.shape[1])
    core = np.einsum("ts...,ta,sb->ab...", weight, u_t, u_s)
    core = np.pad(core, [(0, 1), (0, 1)] + [(0, 0)] * (core.ndim - 2))
    extra_t, extra_s = rng.standard_normal((weight.shape[0], 1)), rng.standard_normal((weight.shape[1], 1))
    return Tucker2Factors(np.hstack([u_s, extra_s]), core, np.hstack([u_t, extra_t]))


def two_conv_model():
    rng = np.random.default_rng(3)
    shared = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "shared_w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    const_w = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "shared_w", "b"], ["c1"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "shared_w"], ["c2"], name="second", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["w_const"], name="const", value=const_w),
        helper.make_node("Identity", ["w_const"], ["w_id"], name="ident"),
        helper.make_node("Conv", ["c2", "w_id"], ["y"], name="third"),
    ]
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [shared, bias],
        value_info=[helper.make_tensor_value_info("r1", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=IR_VERSION,
        producer_name="tests",
        doc_string="two convs share a weight",
    )
    helper.set_model_props(model, {"author": "tests"})
    return model


def test_rewrite_preserves_the_rest_and_handles_shared_weights():
    model = two_conv_model()
    snapshot = model.SerializeToString()
    scan = find_targets(model)
    first = scan.layer("first")
    rng = np.random.default_rng(0)
    weight = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    new = replace_layers(model, {first.output: (first, [exact_tucker2(weight, rng)])})
    assert model.SerializeToString() == snapshot  # input untouched
    onnx.checker.check_model(new)

    assert [n.name for n in new.graph.node] == [
        "first/dacomp_tucker2_0",
        "first/dacomp_tucker2_1",
        "first/dacomp_tucker2_2",
        "relu",
        "second",
        "const",
        "ident",
        "third",
    ]
    assert new.graph.node[2].output[0] == "c1" and list(new.graph.node[2].input)[2] == "b"
    for name in ("relu", "second", "const", "ident", "third"):
        assert [n for n in new.graph.node if n.name == name] == [n for n in model.graph.node if n.name == name]
    assert new.graph.input == model.graph.input and new.graph.output == model.graph.output
    assert new.graph.value_info == model.graph.value_info
    assert (new.opset_import, new.metadata_props, new.producer_name, new.doc_string, new.ir_version) == (
        model.opset_import,
        model.metadata_props,
        model.producer_name,
        model.doc_string,
        model.ir_version,
    )
    assert "shared_w" in {init.name for init in new.graph.initializer}  # still read by "second"

    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    assert relative_error(run(new, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5

    # replacing the other users too: the shared weight and the Constant/Identity pair are dropped
    second, third = scan.layer("second"), scan.layer("third")
    const = numpy_helper.to_array(model.graph.node[3].attribute[0].t).astype(np.float64)
    u = _orthogonal(rng, 4)
    replacements = {
        first.output: (first, [exact_tucker2(weight, rng)]),
        second.output: (second, [SVDFactors(np.einsum("ts...,tr->rs...", weight, u), u)]),
        third.output: (third, [SVDFactors(const, np.eye(4))]),
    }
    everything = replace_layers(model, replacements)
    remaining = {init.name for init in everything.graph.initializer}
    assert "shared_w" not in remaining and "b" in remaining
    assert not any(n.op_type in ("Constant", "Identity") for n in everything.graph.node)
    assert relative_error(run(everything, {"x": x})[0], run(model, {"x": x})[0]) < 1e-5
    # deterministic: the same request gives the same bytes
    assert replace_layers(model, replacements).SerializeToString() == everything.SerializeToString()


def test_grouped_conv_factors_per_group():
    rng = np.random.default_rng(5)
    group, per_in, per_out = 3, 2, 4
    factors = [
        CPFactors(
            rng.standard_normal((per_in, 2)),
            (rng.standard_normal((3, 2)), rng.standard_normal((2, 2))),
            rng.standard_normal((per_out, 2)),
        )
        for _ in range(group)
    ]
    weight = np.concatenate(
        [np.einsum("tr,sr,hr,wr->tshw", f.output_factor, f.input_factor, *f.spatial_factors) for f in factors]
    )
    x = rng.standard_normal((2, group * per_in, 7, 9)).astype(np.float32)
    init = numpy_helper.from_array(weight.astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="grouped", group=group, strides=[2, 1], pads=[1, 0, 0, 1])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [init],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    (layer,) = find_targets(model).targets
    new = replace_layers(model, {layer.output: (layer, factors)})
    expected = conv_reference(x, weight, strides=(2, 1), pads=(1, 0, 0, 1), dilations=(1, 1), group=group)
    assert relative_error(run(new, {"x": x})[0], expected) < 1e-5
    assert [next(a.i for a in n.attribute if a.name == "group") for n in new.graph.node] == [3, 6, 6, 3]

    with pytest.raises(ValueError, match="3 groups"):
        replace_layers(model, {layer.output: (layer, factors[:1])})


@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared/models is absent")
def test_real_model_full_rank_rewrite_keeps_outputs():
    model = load_model(SHARED / "models" / "cifar10_resnet20.onnx")
    scan = find_targets(model)
    rng = np.random.default_rng(0)
    initializers = {init.name: init for init in model.graph.initializer}
    replacements = {}
    for layer in scan.targets[:6]:
        weight = numpy_helper.to_array(initializers[layer.weight]).astype(np.float64)
        replacements[layer.output] = (layer, [exact_tucker2(weight, rng)])
    new = replace_layers(model, replacements)
    onnx.checker.check_model(new)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert relative_error(run(new, {"input": x})[0], run(model, {"input": x})[0]) < 1e-5
    assert len(new.graph.node) == len(model.graph.node) + 2 * 6


def test_drop_unread_removes_what_only_the_dropped_read():
    """A weight behind Constant -> Identity goes with both nodes; a constant another node reads stays, and so
    does one a subgraph reads from the outer scope."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["b"])], "branch", [], [helper.make_tensor_value_info("b", 1, [1])]
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=value),
            helper.make_node("Identity", ["c"], ["w"]),
            helper.make_node("Identity", ["shared"], ["s"]),
            helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch),
        ],
        "g",
        [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(name, 1, [1]) for name in ("s", "y")],
        [helper.make_tensor(name, TensorProto.FLOAT, [1], [2.0]) for name in ("shared", "outer", "gone")],
    )
    drop_unread(graph, ["w", "shared", "outer", "gone", None])
    assert [node.output[0] for node in graph.node] == ["s", "y"]
    assert sorted(init.name for init in graph.initializer) == ["outer", "shared"]
