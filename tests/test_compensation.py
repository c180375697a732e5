"""Next-layer compensation: the closed-form refit against least squares on samples, and the refit of a whole
model against perturbations whose exact inverse is known."""

import numpy as np
import onnx
import pytest
from builders import conv_stack, relative_error, run
from onnx import helper, numpy_helper

import onnx_dacomp
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.compensate import compensate, downstream
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.decompose.compensation import refit_loss, ridge_refit
from onnx_dacomp.propagate import OutputError
from onnx_dacomp.targets import find_targets, read_biases, read_weights

IR_VERSION = 8


def _moments(reference, observed):
    """(reference mean, E[x x~^T], E[x~ x~^T], E[x~]) of sample rows."""
    count = len(reference)
    return reference.mean(0), reference.T @ observed / count, observed.T @ observed / count, observed.mean(0)


def test_small_ridge_refit_is_the_affine_least_squares_fit():
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((5, 7)), rng.standard_normal(5)
    reference = rng.standard_normal((4000, 7)) @ rng.standard_normal((7, 7)) + 0.3
    observed = reference @ rng.standard_normal((7, 7)) * 0.3 + 0.1 * rng.standard_normal((4000, 7)) - 0.2
    refit, refit_bias = ridge_refit(weight, bias, *_moments(reference, observed), ridge=1e-12)
    design = np.hstack([observed, np.ones((len(observed), 1))])
    solution = np.linalg.lstsq(design, reference @ weight.T + bias, rcond=None)[0]  # independent: numpy's solver
    np.testing.assert_allclose(refit, solution[:-1].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(refit_bias, solution[-1], rtol=1e-6, atol=1e-8)


def test_refit_loss_is_the_sampled_output_error_less_the_output_energy():
    rng = np.random.default_rng(5)
    weight, bias = rng.standard_normal((4, 6)), rng.standard_normal(4)
    refit = (rng.standard_normal((4, 6)), rng.standard_normal(4))
    reference = rng.standard_normal((300, 6)) + 0.4
    observed = reference + 0.3 * rng.standard_normal((300, 6)) - 0.1
    outputs = reference @ weight.T + bias
    error = np.mean(np.sum((outputs - observed @ refit[0].T - refit[1]) ** 2, axis=1))
    expected = error - np.mean(np.sum(outputs**2, axis=1))  # numpy on the samples themselves
    assert refit_loss(weight, bias, refit, *_moments(reference, observed)) == pytest.approx(expected, rel=1e-9)


def test_stacked_groups_are_each_refit_and_measured_on_their_own():
    rng = np.random.default_rng(7)
    groups, samples = 5, 600
    weights, biases = rng.standard_normal((groups, 3, 2, 2, 2)), rng.standard_normal((groups, 3))
    references = rng.standard_normal((groups, samples, 8)) + 0.2
    observed = references + 0.4 * rng.standard_normal((groups, samples, 8))
    per_group = [_moments(r, o) for r, o in zip(references, observed)]
    stacked = [np.stack(parts) for parts in zip(*per_group)]
    refit = ridge_refit(weights, biases, *stacked, ridge=0.01)
    singles = [ridge_refit(w, b, *m, ridge=0.01) for w, b, m in zip(weights, biases, per_group)]
    np.testing.assert_allclose(refit[0], np.stack([w for w, _ in singles]), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(refit[1], np.stack([b for _, b in singles]), rtol=1e-9, atol=1e-12)
    expected = sum(refit_loss(w, b, r, *m) for w, b, r, m in zip(weights, biases, singles, per_group))
    assert refit_loss(weights, biases, refit, *stacked) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("ridge", [1e-6, 1.0, 1e6])
def test_an_unperturbed_input_keeps_the_layer_at_any_ridge(ridge):
    rng = np.random.default_rng(1)
    weight, bias = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    samples = rng.standard_normal((500, 27)) + 1.0
    refit, refit_bias = ridge_refit(weight, bias, *_moments(samples, samples), ridge=ridge)
    np.testing.assert_allclose(refit, weight, atol=1e-9)
    np.testing.assert_allclose(refit_bias, bias, atol=1e-9)


def test_a_strong_ridge_keeps_the_weight_and_moves_only_the_bias():
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((3, 6)), rng.standard_normal(3)
    reference = rng.standard_normal((800, 6))
    observed = 0.5 * reference + 0.7
    refit, refit_bias = ridge_refit(weight, bias, *_moments(reference, observed), ridge=1e9)
    np.testing.assert_allclose(refit, weight, atol=1e-6)
    np.testing.assert_allclose(refit_bias, bias + weight @ (reference.mean(0) - observed.mean(0)), atol=1e-6)


def _model(first, second, *, depthwise):
    """x (C channels) -> 1x1 conv `first` -> `second` (a 3x3 conv, or a depthwise 3x3 conv), no padding: the
    first conv's output only mixes channels, so an invertible change of it can be undone exactly by the second."""
    weights = [first[0], first[1], second[0], second[1]]
    names = ["w0", "b0", "w1", "b1"]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["h"], name="first", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["h", "w1", "b1"], ["y"], name="second", kernel_shape=[3, 3],
                         group=len(second[0]) if depthwise else 1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "pair",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", first[0].shape[1], 10, 10])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None] * 4)],
        [numpy_helper.from_array(np.asarray(w, np.float32), n) for w, n in zip(weights, names)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


@pytest.mark.parametrize("depthwise", [False, True])
def test_compensation_undoes_an_invertible_change_of_the_layer_before(depthwise):
    rng = np.random.default_rng(3)
    channels = 6
    # orthogonal: the second layer's input is well conditioned, so the ridge barely moves its refit weight
    first = (np.linalg.qr(rng.standard_normal((channels, channels)))[0][..., None, None], rng.standard_normal(channels))
    group_in = 1 if depthwise else channels
    second = (rng.standard_normal((5 if not depthwise else channels, group_in, 3, 3)), rng.standard_normal(5 if not
              depthwise else channels))  # fmt: skip
    # the "compressed" first layer: its output mixed by a well-conditioned M (diagonal for a depthwise successor)
    # and shifted
    scales = np.diag(rng.uniform(0.8, 1.25, channels))
    mixing = scales if depthwise else np.linalg.qr(rng.standard_normal((channels, channels)))[0] @ scales
    shift = rng.standard_normal(channels)
    changed = (np.einsum("ij,jkab->ikab", mixing, first[0]), mixing @ first[1] + shift)
    original, compressed = _model(first, second, depthwise=depthwise), _model(changed, second, depthwise=depthwise)
    batches = [{"x": rng.standard_normal((8, channels, 10, 10)).astype(np.float32)} for _ in range(4)]
    scan = find_targets(original)
    layers = downstream(original, [scan.layer("second")], ["h"])
    assert [layer.name for layer in layers] == ["second"] and layers[0].refittable
    judge = OutputError(original, batches[:2], "cpu")
    assert judge(compressed) > 0.1
    model, record = compensate(
        original, compressed, layers, read_weights(original, layers), read_biases(original, layers), batches, judge,
        device="cpu", show_progress=False,
    )  # fmt: skip
    assert record["refitted"] == 1 and record["waves"][0]["refit"]
    assert judge(model) < 1e-4  # from > 0.1: what is left is the smallest ridge's pull and float32
    # the refit weight is the second layer's composed with the inverse mixing (x~ = M x + s  =>  x = M^-1 (x~ - s))
    inverse = np.linalg.inv(mixing)
    expected = (
        np.einsum("ojab,jk->okab", second[0], inverse)
        if not depthwise
        else second[0] / np.diag(mixing)[:, None, None, None]
    )
    refit = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    weight = next(
        value
        for name, value in refit.items()
        if name.endswith(".weight") and value.shape == expected.shape and "refit" in name
    )
    np.testing.assert_allclose(weight, expected, rtol=1e-3, atol=1e-3)
    x = batches[0]["x"]
    assert relative_error(run(model, {"x": x})[0], run(original, {"x": x})[0]) < 1e-3


def test_layers_upstream_of_every_change_are_not_compensated():
    rng = np.random.default_rng(4)
    first = (rng.standard_normal((4, 4, 1, 1)), rng.standard_normal(4))
    second = (rng.standard_normal((4, 4, 3, 3)), rng.standard_normal(4))
    model = _model(first, second, depthwise=False)
    scan = find_targets(model)
    assert downstream(model, scan.layers, ["y"]) == []
    assert [layer.name for layer in downstream(model, scan.layers, ["h"])] == ["second"]


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 3, 4, 4)).repeat(3, axis=2).repeat(3, axis=3)
    return (base + 0.05 * rng.standard_normal((count, 3, 12, 12)) + 0.3).astype(np.float32)


# a plan with kept layers between compressed ones, to tell `tail` from `all`: `auto` prunes one layer of this
# stack (slicing the one before) and compresses nothing else, reallocation moves the others to the end; the
# rank multiple fixed, as the plan must not follow the machine's channel block (with 8 none was kept between)
LOW_RANK = dict(method="tucker2", reallocate=False, rank_multiple=1)


def test_compress_compensates_the_kept_layers_and_never_raises_the_judged_error(tmp_path):
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    path = tmp_path / "images.npz"
    np.savez(path, x=_images(160))
    source = ArraySource(path, ["x"])
    results = {
        mode: onnx_dacomp.compress(
            model,
            source,
            CompressConfig(ratio=0.85, holdout=40, max_iter=10, compensate=mode, **LOW_RANK),
            progress=False,
        )
        for mode in ("none", "tail", "all")
    }
    assert results["none"].report.compensation is None
    rows = results["all"].report.layers
    order = [row.name for row in rows]  # a chain: graph order is the data flow
    last_compressed = max(order.index(row.name) for row in rows if row.method is not None)
    kept_after = [row.name for row in rows if row.method is None and order.index(row.name) > order.index(rows[0].name)]
    chosen = {mode: [name for wave in results[mode].report.compensation["waves"] for name in wave["layers"]]
              for mode in ("tail", "all")}  # fmt: skip
    # all: every kept layer behind the first compressed one; tail: only those behind the last one
    first_compressed = min(order.index(row.name) for row in rows if row.method is not None)
    assert chosen["all"] == [name for name in kept_after if order.index(name) > first_compressed]
    assert chosen["tail"] == [name for name in chosen["all"] if order.index(name) > last_compressed]
    assert len(chosen["tail"]) < len(chosen["all"])
    for mode in ("tail", "all"):
        record = results[mode].report.compensation
        errors = [wave["output_error"] for wave in record["waves"]]
        assert all(after <= before for before, after in errors)
        assert all(earlier[1] == later[0] for earlier, later in zip(errors, errors[1:]))
        assert results[mode].report.to_dict()["compensation"] == record
        refit = {name for wave in record["waves"] if wave["refit"] for name in wave["layers"]}
        assert refit == {
            row.name for row in results[mode].report.layers if "refit (compensation)" in (row.reason or "")
        }
        if record["refitted"]:
            assert errors[-1][1] < errors[0][0]
            assert results[mode].model.SerializeToString() != results["none"].model.SerializeToString()
