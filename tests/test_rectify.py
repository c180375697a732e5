"""Rectified output refit: the intervals against the activations themselves, the solver against least squares
and a general-purpose optimizer, the activation found after a layer, and the stage on a model whose exact
answer is known."""

import math

import numpy as np
import onnx
import pytest
import scipy.optimize
from builders import relative_error, run
from onnx import helper, numpy_helper

from onnx_dacomp.decompose.rectified import interval_objective, output_intervals, rectified_refit
from onnx_dacomp.propagate import OutputError
from onnx_dacomp.rectify import Activation, activations_after, refit_outputs
from onnx_dacomp.targets import find_targets

IR_VERSION = 8


@pytest.mark.parametrize("low, high", [(0.0, math.inf), (0.0, 6.0), (-math.inf, math.inf)])
def test_intervals_hold_exactly_the_outputs_the_activation_cannot_tell_apart(low, high):
    rng = np.random.default_rng(0)
    targets = 4 * rng.standard_normal(2000)
    residual = 3 * rng.standard_normal(2000)  # what an Add puts on the output before the activation
    inputs = targets + residual
    lower, upper = output_intervals(targets, inputs, low, high)
    predictions = targets + 5 * rng.standard_normal(2000)
    after = np.clip(predictions + residual, low, high)
    wanted = np.clip(inputs, low, high)
    inside = (predictions >= lower) & (predictions <= upper)
    np.testing.assert_array_equal(inside, np.isclose(after, wanted, rtol=0, atol=1e-12))
    # the squared distance to the interval bounds the squared error after the activation from above
    distance = (predictions - np.clip(predictions, lower, upper)) ** 2
    assert np.all(distance >= (after - wanted) ** 2 - 1e-9)


def test_point_intervals_give_the_affine_least_squares_fit():
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((3000, 6)) @ rng.standard_normal((6, 6)) + 0.5
    targets = inputs @ rng.standard_normal((6, 4)) + rng.standard_normal(4) + 0.1 * rng.standard_normal((3000, 4))
    weight, bias = rectified_refit(inputs, targets, targets, np.zeros((4, 6)), np.zeros(4), ridge=1e-12)
    design = np.hstack([inputs, np.ones((len(inputs), 1))])
    solution = np.linalg.lstsq(design, targets, rcond=None)[0]  # independent: numpy's solver
    # the refit holds its vectors and outputs in float32: agreement to float32's precision times the inputs'
    # conditioning, as a whole (elementwise, a small coefficient's error relative to itself depends on the BLAS
    # kernel's summation order: 3e-4 on one machine); a wrong fit is off by orders of magnitude more
    fitted, expected = np.hstack([weight, bias[:, None]]), solution.T
    assert np.linalg.norm(fitted - expected) <= 1e-4 * np.linalg.norm(expected)


def test_the_refit_reaches_the_optimum_a_general_optimizer_finds():
    rng = np.random.default_rng(2)
    inputs = rng.standard_normal((1500, 5))
    truth = rng.standard_normal((3, 5))
    targets = inputs @ truth.T + 0.3 * rng.standard_normal((1500, 3))
    residual = rng.standard_normal((1500, 3))
    lower, upper = output_intervals(targets, targets + residual, 0.0, math.inf)
    start = (truth + 0.5 * rng.standard_normal(truth.shape), rng.standard_normal(3))
    ridge = 1e-3
    # the default stops once a step gains under 0.1 %: asked for, it goes on to the optimum
    weight, bias = rectified_refit(inputs, lower, upper, *start, ridge=ridge, tolerance=1e-9)
    design = np.hstack([inputs, np.ones((len(inputs), 1))])
    shift = ridge * np.trace(design.T @ design) / design.shape[1]
    initial = np.hstack([start[0], start[1][:, None]])

    def objective(flat):
        mapping = flat.reshape(initial.shape)
        outputs = design @ mapping.T
        gap = outputs - np.clip(outputs, lower, upper)
        value = np.sum(gap**2) + shift * np.sum((mapping - initial) ** 2)
        return value, (2 * gap.T @ design + 2 * shift * (mapping - initial)).ravel()

    reference = scipy.optimize.minimize(objective, initial.ravel(), jac=True, method="L-BFGS-B", tol=1e-14)
    ours = objective(np.hstack([weight, bias[:, None]]).ravel())[0]
    assert ours <= reference.fun * (1 + 1e-3)
    assert ours < objective(initial.ravel())[0] * 0.5
    # the hinge matters: the fit for the intervals beats the least squares fit of the outputs on them
    linear = rectified_refit(inputs, targets, targets, *start, ridge=ridge)
    assert ours < objective(np.hstack([linear[0], linear[1][:, None]]).ravel())[0]


def test_the_objective_counts_only_what_lies_outside():
    outputs = np.array([[-1.0, 2.0, 5.0]])
    lower, upper = np.array([[-np.inf, 2.0, 1.0]]), np.array([[0.0, 2.0, np.inf]])
    assert interval_objective(outputs, lower, upper) == 0.0
    assert interval_objective(outputs + 1, lower, upper) == pytest.approx(0 + 1 + 0)


def _graph_model(nodes, initializers, outputs=("y",), opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def _weight(name, shape, seed):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def test_the_activation_after_a_layer_is_found_directly_after_an_add_or_not_at_all():
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    weight = _weight("w", (4, 4, 1, 1), 0)
    relu = _graph_model([conv, helper.make_node("Relu", ["c"], ["y"])], [weight])
    assert activations_after(relu, ["c"])["c"] == Activation(None, 0.0, math.inf)
    residual = _graph_model(
        [conv, helper.make_node("Add", ["c", "x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])], [weight]
    )
    assert activations_after(residual, ["c"])["c"] == Activation("s", 0.0, math.inf)
    bounds = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    clip = _graph_model([conv, helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], [weight, *bounds])
    assert activations_after(clip, ["c"])["c"] == Activation(None, 0.0, 6.0)
    old_clip = _graph_model([conv, helper.make_node("Clip", ["c"], ["y"], min=0.0, max=6.0)], [weight], opset=6)
    assert activations_after(old_clip, ["c"])["c"] == Activation(None, 0.0, 6.0)
    # read twice (by the ReLU and as a model output): the activation does not see all its uses
    exposed = _graph_model([conv, helper.make_node("Relu", ["c"], ["y"])], [weight], outputs=("y", "c"))
    assert activations_after(exposed, ["c"])["c"].linear
    sigmoid = _graph_model([conv, helper.make_node("Sigmoid", ["c"], ["y"])], [weight])
    assert activations_after(sigmoid, ["c"])["c"].linear


def test_the_stage_restores_a_chain_whose_last_conv_was_disturbed():
    """Original: x -> 1x1 conv (4 -> 5) -> Add x' -> ReLU. "Compressed": the conv as a 1x1 chain 4 -> 4 -> 5 whose
    first conv is invertible and whose last conv is disturbed: the refit can give back every activation."""
    rng = np.random.default_rng(3)
    weight, bias = rng.standard_normal((5, 4)), rng.standard_normal(5)
    mixing = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    last = weight @ mixing.T + 0.3 * rng.standard_normal((5, 4))
    skip = _weight("ws", (5, 4, 1, 1), 9)
    tail = [
        helper.make_node("Conv", ["x", "ws"], ["side"], name="side"),
        helper.make_node("Add", ["c", "side"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]

    def array(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    original = _graph_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), *tail],
        [array("w", weight[..., None, None]), array("b", bias), skip],
    )
    compressed = _graph_model(
        [
            helper.make_node("Conv", ["x", "w0"], ["z"], name="conv/dacomp_0"),
            helper.make_node("Conv", ["z", "w1", "b1"], ["c"], name="conv/dacomp_1"),
            *tail,
        ],
        [array("w0", mixing[..., None, None]), array("w1", last[..., None, None]), array("b1", bias), skip],
    )
    batches = [{"x": rng.standard_normal((16, 4, 6, 6)).astype(np.float32)} for _ in range(8)]
    judge = OutputError(original, batches[:2], "cpu")
    assert judge(compressed) > 0.01
    nodes = [layer for layer in find_targets(compressed).layers if layer.output == "c"]
    originals = {"c": find_targets(original).layer("conv")}
    model, record = refit_outputs(original, compressed, nodes, originals, batches, judge, device="cpu",
                                  show_progress=False)  # fmt: skip
    assert record["refitted"] == 1 and record["waves"][0]["refit"]
    before, after = record["waves"][0]["output_error"]
    assert after < 1e-5 < before
    x = batches[-1]["x"]
    assert relative_error(run(model, {"x": x})[0], run(original, {"x": x})[0]) < 1e-3
    assert run(model, {"x": x})[0].shape == run(original, {"x": x})[0].shape


def test_a_refit_that_the_judge_finds_worse_is_not_kept():
    """The judge measures on other data than the refit sees: judged on an output the refit cannot match, the
    model is left as it was."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])]
    original = _graph_model(nodes, [numpy_helper.from_array(weight, "w")])
    compressed = _graph_model(nodes, [numpy_helper.from_array(weight * 0.5, "w")])
    batches = [{"x": rng.standard_normal((16, 4, 6, 6)).astype(np.float32)} for _ in range(4)]

    class Contrary:
        """A judge that finds every change worse."""

        def __init__(self):
            self.calls = 0

        def __call__(self, model):
            self.calls += 1
            return float(self.calls)

    layers = find_targets(compressed).layers
    model, record = refit_outputs(original, compressed, layers, {"c": find_targets(original).layer("conv")},
                                  batches, Contrary(), device="cpu", show_progress=False)  # fmt: skip
    assert record["refitted"] == 0 and not record["waves"][0]["refit"]
    assert model is compressed


def test_a_node_no_activation_reads_is_left_as_it_is():
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    original = _graph_model(nodes, [numpy_helper.from_array(weight, "w")])
    compressed = _graph_model(nodes, [numpy_helper.from_array(weight * 0.5, "w")])
    batches = [{"x": rng.standard_normal((16, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    judge = OutputError(original, batches[:2], "cpu")
    layers = find_targets(compressed).layers
    model, record = refit_outputs(original, compressed, layers, {"y": find_targets(original).layer("conv")},
                                  batches, judge, device="cpu", show_progress=False)  # fmt: skip
    assert model is compressed and record["no_activation"] == ["conv"] and record["refitted"] == 0


def test_waves_read_the_original_in_one_pass_or_several_with_the_same_result(monkeypatch):
    """Two refit layers in a row (two waves), their vectors sampled: the original's outputs computed for both
    waves in one pass, or one pass per wave where REFERENCE_BYTES holds only one, give the same model; and the
    refit brings both layers' outputs nearer the original's."""
    import onnx_dacomp.rectify as rectify

    rng = np.random.default_rng(6)
    first, second = rng.standard_normal((4, 4, 3, 3)), rng.standard_normal((5, 4, 1, 1))

    def model(w1, w2):
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
            helper.make_node("Relu", ["c2"], ["y"]),
        ]
        weights = [numpy_helper.from_array(np.asarray(w, np.float32), name) for name, w in (("w1", w1), ("w2", w2))]
        return _graph_model(nodes, weights)

    original = model(first, second)
    compressed = model(first + 0.3 * rng.standard_normal(first.shape), second + 0.3 * rng.standard_normal(second.shape))
    batches = [{"x": rng.standard_normal((16, 4, 6, 6)).astype(np.float32)} for _ in range(8)]
    judge = OutputError(original, batches[:2], "cpu")
    layers = find_targets(compressed).layers
    originals = {layer.output: find_targets(original).layer(layer.name) for layer in layers}
    monkeypatch.setattr(rectify, "VECTORS_PER_INPUT", 40)  # fewer than the 4,608 positions: a sample is taken
    passes = []
    monkeypatch.setattr(rectify._References, "_compute", lambda self, group, f=rectify._References._compute: (
        passes.append(list(group)), f(self, group))[1])  # fmt: skip

    def refit():
        return refit_outputs(original, compressed, layers, originals, batches, judge, device="cpu",
                             show_progress=False)  # fmt: skip

    together, record = refit()
    assert passes == [[0, 1]] and len(record["waves"]) == 2 and record["refitted"] == 2
    monkeypatch.setattr(rectify, "REFERENCE_BYTES", 1)
    apart, _ = refit()
    assert passes[1:] == [[0], [1]]
    for a, b in zip(together.graph.initializer, apart.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    x = batches[-1]["x"]
    reference = run(original, {"x": x})[0]
    before, after = (relative_error(run(candidate, {"x": x})[0], reference) for candidate in (compressed, together))
    assert after < before
