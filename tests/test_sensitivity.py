"""Layer sensitivity: output error energy per unit of layer error, against closed forms and numpy convs."""

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, conv_model, conv_reference
from onnx import helper, numpy_helper

import onnx_dacomp
from onnx_dacomp.calibration.collect import collect_statistics
from onnx_dacomp.decompose.svd import da_svd, svd_rank_errors
from onnx_dacomp.inputs import input_signature
from onnx_dacomp.sensitivity import PROBE_ERROR, measure_sensitivities, probe_batches, probe_rank
from onnx_dacomp.targets import find_targets, read_weights

SHAPE = (2, 6, 7, 8)
DECLARED = ["n", 6, 7, 8]


def _batches(seed=0, count=3):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((6, 6))  # correlated channels: a covariance far from the identity
    return [
        {"x": np.einsum("dc,nchw->ndhw", mixing, rng.standard_normal(SHAPE)).astype(np.float32)} for _ in range(count)
    ]


def _residual_model(weight) -> onnx.ModelProto:
    """y = x + Conv(x): the conv's error is diluted by the skip path."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, DECLARED)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def _probe(model, batches, rank):
    layer = find_targets(model).targets[0]
    weight = read_weights(model, [layer])[layer.name]
    sigma = collect_statistics(model, [layer], batches, device="cpu", progress=False).layers[layer.name].covariance[0]
    fit = da_svd(weight, sigma, rank)
    return layer, weight, {layer.name: (layer, [fit.factors], None, fit.rel_error)}


def test_a_layer_that_is_the_output_has_sensitivity_one():
    # on the calibration samples, ||dW x||^2 / ||W x||^2 over all patches is the Sigma-error itself
    weight = np.random.default_rng(1).standard_normal((5, 6, 3, 3))
    model = conv_model(weight, input_shape=DECLARED, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    batches = _batches()
    layer, _, probes = _probe(model, batches, rank=2)
    assert probes[layer.name][3] > 0.01
    sensitivity = measure_sensitivities(model, probes, batches, device="cpu")
    assert abs(sensitivity[layer.name] - 1.0) < 1e-3


def test_a_skip_path_dilutes_the_error_by_the_output_energy_ratio():
    weight = 0.05 * np.random.default_rng(2).standard_normal((6, 6, 3, 3))
    model = _residual_model(weight)
    batches = _batches(seed=3)
    layer, _, probes = _probe(model, batches, rank=3)
    sensitivity = measure_sensitivities(model, probes, batches, device="cpu")[layer.name]
    # the output error is the conv's own; the output energy is that of x + conv(x) (numpy reference)
    conv_energy = total_energy = 0.0
    for batch in batches:
        conv = conv_reference(batch["x"], weight, strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1))
        conv_energy += float(np.sum(conv**2))
        total_energy += float(np.sum((batch["x"] + conv) ** 2))
    assert abs(sensitivity - conv_energy / total_energy) < 1e-3 * conv_energy / total_energy
    assert sensitivity < 0.5


def test_probe_rank_is_the_largest_rank_still_above_the_probe_error():
    weight = np.random.default_rng(4).standard_normal((8, 6, 3, 3))
    errors = svd_rank_errors(weight, None)
    rank = probe_rank(errors)
    assert errors[rank - 1] >= PROBE_ERROR and (rank == len(errors) or errors[rank] < PROBE_ERROR)
    assert probe_rank(np.array([0.01, 0.0])) == 1  # every rank below: the smallest
    assert probe_rank(np.array([0.0])) == 1


def test_probe_batches_take_whole_batches_up_to_the_sample_count():
    batches = _batches(count=5)  # 2 samples each
    signature = input_signature(conv_model(np.ones((6, 6, 3, 3)), input_shape=DECLARED, pads=[1, 1, 1, 1]))
    assert len(probe_batches(batches, samples=3, signature=signature)) == 2
    assert len(probe_batches(batches, samples=100, signature=signature)) == 5


def test_a_layer_fitted_from_few_vectors_is_probed_on_unseen_data_where_its_fit_is_worse():
    """A dense layer with 30 calibration vectors in 60 dims fits those 30 far better than other samples: probed
    on held-out samples, its sensitivity (output error per unit of estimated layer error) comes out larger
    than on the calibration samples; a layer with many vectors per dim keeps its calibration probe."""
    from onnx_dacomp.fit import FitSettings
    from onnx_dacomp.problems import build_problems
    from onnx_dacomp.sensitivity import sensitivities

    rng = np.random.default_rng(3)
    weights = {"A": rng.standard_normal((60, 64)), "B": rng.standard_normal((4, 4))}
    shape = numpy_helper.from_array(np.array([0, 16, 4], np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["a"], name="wide"),  # one 60-dim vector per sample: few
        helper.make_node("Reshape", ["a", "shape"], ["r"]),
        helper.make_node("Relu", ["r"], ["h"]),
        helper.make_node("MatMul", ["h", "B"], ["y"], name="narrow"),  # sixteen 4-dim vectors per sample: many
    ]
    graph = helper.make_graph(
        nodes, "dense", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 60])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()] + [shape],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    mixing = rng.standard_normal((60, 60)) * np.logspace(0, -1, 60)
    seen = [{"x": (rng.standard_normal((30, 60)) @ mixing).astype(np.float32)}]
    unseen = [{"x": (rng.standard_normal((30, 60)) @ mixing).astype(np.float32)}]
    layers = {layer.name: layer for layer in find_targets(model).targets}
    statistics = collect_statistics(model, list(layers.values()), seen, device="cpu", progress=False).layers
    problems = build_problems(list(layers.values()), read_weights(model, layers.values()), {n: None for n in layers},
                              statistics)  # fmt: skip
    assert problems["wide"].shrinkage > 0 and problems["narrow"].shrinkage == 0
    common = dict(samples=30, signature=input_signature(model), device="cpu", show_progress=False)
    in_sample = sensitivities(model, layers, problems, seen, FitSettings(max_iter=5, seed=0), **common)
    held_out = sensitivities(model, layers, problems, seen, FitSettings(max_iter=5, seed=0), unseen=unseen, **common)
    assert held_out["wide"] > 1.5 * in_sample["wide"]
    assert held_out["narrow"] == in_sample["narrow"]


def test_the_report_predicts_the_output_error_from_the_layers_errors_and_sensitivities():
    """Two convs in a chain with a ReLU between: the report's predicted output error is sqrt(sum of sensitivity
    times fit error) of its own rows, and close to the output error measured on the same samples (the errors of
    two fits made independently add up nearly independently)."""
    rng = np.random.default_rng(7)
    first, second = rng.standard_normal((8, 6, 3, 3)), rng.standard_normal((6, 8, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="first", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["y"], name="second", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, DECLARED)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in (("W1", first), ("W2", second))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    result = onnx_dacomp.compress(
        model, _batches(seed=8, count=8), ratio=0.5, method="tucker2", holdout=0, rank_multiple=1,
        progress=False, benchmark=False, compensate="none",
    )  # fmt: skip
    report = result.report
    fitted = [row for row in report.layers if row.method]
    assert len(fitted) == 2 and all(row.sensitivity > 0 and row.rel_error > 1e-3 for row in fitted)
    assert report.predicted_output_error == pytest.approx(
        np.sqrt(sum(row.sensitivity * row.rel_error for row in fitted)), rel=1e-9
    )
    measured = report.verification.worst_output.rel_error  # in-sample: the samples the probes ran on
    assert abs(report.predicted_output_error - measured) < 0.15 * measured
    assert f"predicted relative output error {report.predicted_output_error:.4f}" in report.table()
