"""Verification of every output, not only the first: error, cosine and SNR per output against a numpy
computation; top-1 only for class scores; the --max-error search, which needs no labels."""

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, run
from onnx import TensorProto, helper, numpy_helper

import onnx_dacomp
from onnx_dacomp.cli import main
from onnx_dacomp.errors import UserError
from onnx_dacomp.verify import compare_models


def detector(seed=0) -> onnx.ModelProto:
    """Two outputs: a detector-shaped map `boxes [N, 84, 36]` (a conv head, reshaped) and class `scores
    [N, 10]` from a Gemm over pooled features."""
    rng = np.random.default_rng(seed)
    weights = {
        "w0": rng.standard_normal((32, 3, 3, 3)) * 0.3,
        "w1": rng.standard_normal((32, 32, 3, 3)) * 0.1,
        "head": rng.standard_normal((84, 32, 1, 1)) * 0.2,
        "fc": rng.standard_normal((10, 32)) * 0.3,
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inits.append(numpy_helper.from_array(np.array([0, 84, -1], np.int64), "shape"))
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "head"], ["map"], name="head"),
        helper.make_node("Reshape", ["map", "shape"], ["boxes"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "fc"], ["scores"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 84, 36]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((count, 3, 4, 4)).repeat(3, axis=2).repeat(3, axis=3)).astype(np.float32)


def test_every_output_is_compared_and_only_class_scores_get_top1():
    model = detector()
    perturbed = detector()
    weight = perturbed.graph.initializer[1]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.1), "w1"))
    x = _images(24)
    comparison = compare_models(model, perturbed, [{"x": x[:16]}, {"x": x[16:]}], progress=False)
    assert [o.name for o in comparison.outputs] == ["boxes", "scores"]
    for index, output in enumerate(comparison.outputs):
        reference = run(model, {"x": x})[index].astype(np.float64).reshape(24, -1)
        changed = run(perturbed, {"x": x})[index].astype(np.float64).reshape(24, -1)
        error = np.sum((changed - reference) ** 2)
        assert output.rel_error == pytest.approx(np.sqrt(error / np.sum(reference**2)), rel=1e-6)
        assert output.snr_db == pytest.approx(10 * np.log10(np.sum(reference**2) / error), rel=1e-6)
        cosines = np.sum(reference * changed, 1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(changed, axis=1)
        assert output.cosine == pytest.approx(cosines.mean(), rel=1e-6)
    boxes, scores = comparison.outputs
    assert not boxes.classes and boxes.top1_agreement is None  # a map: no argmax with a meaning
    predicted = [run(m, {"x": x})[1].argmax(1) for m in (model, perturbed)]
    assert scores.classes and scores.top1_agreement == pytest.approx(np.mean(predicted[0] == predicted[1]))
    assert comparison.top1_agreement == scores.top1_agreement
    assert comparison.rel_output_error == max(boxes.rel_error, scores.rel_error)
    declared = compare_models(model, perturbed, [{"x": x}], progress=False, classifier_outputs=["boxes"])
    assert declared.outputs[0].top1_agreement is not None  # declared: per position over the 84 channels
    with pytest.raises(UserError, match="--classifier-output names"):
        compare_models(model, perturbed, [{"x": x}], progress=False, classifier_outputs=["logits"])


@pytest.mark.parametrize("target", [None, "boxes"])
def test_max_error_finds_a_model_within_the_bound_without_labels(tmp_path, target):
    path = tmp_path / "data.npz"
    np.savez(path, x=_images(160, seed=1))
    options = dict(max_error=0.2, holdout=48, max_iter=5, rank_multiple=1, target_output=target)
    result = onnx_dacomp.compress(detector(), str(path), progress=False, **options)
    report = result.report
    # the bound holds on the upper end of the error's 95 % interval, which lies above the error itself
    output = report.verification.output(target) if target else report.verification.worst_output
    assert output.rel_error < output.rel_error_interval[1] <= 0.2 and report.ratio < 1.0
    probes = report.search["probes"]
    assert all((p["rel_output_error_high"] <= 0.2) == p["met"] for p in probes)
    assert all(p["rel_output_error"] < p["rel_output_error_high"] for p in probes)
    assert report.search["ratio"] == min(p["ratio"] for p in probes if p["met"])


def test_max_error_values_are_checked(tmp_path, capsys):
    for bad in ("0", "-0.1", "1.5", "abc"):
        assert main(["compress", "m.onnx", "-o", str(tmp_path / "o.onnx"), "--max-error", bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(UserError, match="one of --max-drop, --min-agreement and --max-error"):
        onnx_dacomp.CompressConfig(max_error=0.1, min_agreement=0.9)


def test_a_result_that_lost_the_function_is_recognised():
    from onnx_dacomp.verify import Comparison, OutputComparison

    def compared(error, agreement=None):
        output = OutputComparison("y", error, 1 - error, -20 * np.log10(error), agreement is not None, agreement)
        return Comparison(100, (output,))

    assert compared(0.6, agreement=0.84).lost_function is False  # EfficientNet-Lite0 at 0.75: logits move, top-1 holds
    assert compared(1.01, agreement=0.002).lost_function is True  # --speedup 1.2 on EfficientNet-Lite0
    assert compared(0.95).lost_function is True and compared(0.3).lost_function is False  # no class scores
