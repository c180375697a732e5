"""Error propagation, bias refit and the accuracy-targeted search: against numpy references and measured
output errors."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, conv_model, conv_stack, reference_patches, run
from onnx import numpy_helper

import onnx_dacomp
from onnx_dacomp.calibration.collect import exposing
from onnx_dacomp.calibration.cross import collect_cross_statistics
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.decompose.covariance import sigma_error
from onnx_dacomp.decompose.factors import reconstruct
from onnx_dacomp.fit import FitSettings, fit_layer
from onnx_dacomp.geometry import Cost
from onnx_dacomp.moments import Moments as LayerStatistics
from onnx_dacomp.problems import LayerProblem
from onnx_dacomp.ranks.candidates import Candidate
from onnx_dacomp.targets import find_targets


def _images(count, seed=0, channels=3, size=(12, 12)):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, channels, size[0] // 3, size[1] // 3))
    smooth = base.repeat(3, axis=2).repeat(3, axis=3)
    return (smooth + 0.05 * rng.standard_normal((count, channels, *size)) + 0.3).astype(np.float32)


def _perturbed(model, name="w0", scale=0.2, seed=1):
    """The same graph with one weight changed: stands in for a model compressed up to some layer."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, init in enumerate(copy.graph.initializer):
        if init.name == name:
            weight = numpy_helper.to_array(init)
            noise = np.random.default_rng(seed).standard_normal(weight.shape).astype(weight.dtype)
            copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(weight + scale * noise, name))
    return copy


def test_cross_statistics_match_numpy_reference():
    model = conv_stack(channels=4, size=(9, 11), input_channels=3)
    perturbed = _perturbed(model)
    layers = [find_targets(model).layer(name) for name in ("conv1", "conv4")]  # conv4: dilation and groups
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((n, 3, 9, 11)).astype(np.float32)} for n in (2, 3)]
    measured = collect_cross_statistics(model, perturbed, layers, batches, device="cpu")
    for layer in layers:
        cross = second = first = 0.0
        count = 0
        for batch in batches:
            x, x_tilde = reference_patches(model, layer, batch), reference_patches(perturbed, layer, batch)
            cross = cross + np.einsum("pgi,pgj->gij", x, x_tilde)
            second = second + np.einsum("pgi,pgj->gij", x_tilde, x_tilde)
            first = first + x_tilde.sum(0)
            count += len(x)
        got = measured[layer.name]
        assert got.count == count
        for actual, expected in ((got.cross, cross), (got.second, second), (got.first, first)):
            assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()


def test_exposing_keeps_only_the_nodes_the_tensors_need():
    # the initializers listed as graph inputs too (models before IR 4): dropped ones leave the inputs as well
    model = conv_stack(channels=4, size=(9, 11), input_channels=3)
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
    )
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((2, 3, 9, 11)).astype(np.float32)}
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.output.extend(onnx.ValueInfoProto(name=name) for name in ("r0", "c1"))
    expected = run(full, batch)[1:]  # the whole model with the two tensors as outputs

    exposed = exposing(model, ["r0", "c1"])
    assert [node.name or node.op_type for node in exposed.graph.node] == ["conv0", "Relu", "conv1"]
    assert sorted(t.name for t in exposed.graph.initializer) == ["b0", "b1", "w0", "w1"]
    assert [value.name for value in exposed.graph.input] == ["x", "w0", "b0", "w1", "b1"]
    for actual, wanted in zip(run(exposed, batch), expected):
        np.testing.assert_array_equal(actual, wanted)
    assert len(model.graph.node) == 12  # the model itself is untouched


def _layer_problem(seed=0, bias_refit=False, samples=4000):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((6, 5, 3, 3))
    n = 45
    patches = rng.standard_normal((samples, n)) @ (rng.standard_normal((n, n)) * np.logspace(0, -1, n)) + 0.5
    statistics = LayerStatistics((patches.T @ patches)[None], patches.sum(0)[None], samples)
    layer = find_targets(conv_model(weight, np.ones(6), input_shape=[1, 5, 8, 8], pads=[1, 1, 1, 1])).targets[0]

    plain = LayerProblem.plain(layer.name, layer.geometry, weight, np.ones(6), statistics, bias_refit=bias_refit)
    return plain, statistics, patches, weight


@pytest.mark.parametrize("bias_refit", [False, True])
def test_propagation_with_unchanged_input_equals_the_plain_fit(bias_refit):
    plain, statistics, _, weight = _layer_problem(bias_refit=bias_refit)
    same = type("Cross", (), {})()
    same.cross_moment, same.covariance, same.mean = statistics.covariance, statistics.covariance, statistics.mean
    propagated = LayerProblem.propagated(plain, statistics, same, bias_refit)
    # W1 Sigma Sigma^-1 = W1 (up to the solver's 1e-8 regularization, in the norm that matters)
    assert sigma_error(weight, propagated.targets[0], statistics.covariance[0]) < 1e-8
    assert propagated.residual <= 1e-6 * np.einsum(
        "ij,ij->", weight.reshape(6, -1) @ statistics.covariance[0], weight.reshape(6, -1)
    )
    choice = Candidate("tucker2", (3, 2), Cost(0, 0), 0.0)
    settings = FitSettings.of(CompressConfig())
    a, b = fit_layer(plain, choice, settings), fit_layer(propagated, choice, settings)
    assert b.rel_error == pytest.approx(a.rel_error, rel=1e-4)
    assert np.allclose(reconstruct(a.factors[0]), reconstruct(b.factors[0]), atol=1e-4 * np.abs(weight).max())
    if bias_refit:
        assert np.allclose(a.bias, b.bias, atol=1e-5)


def test_bias_refit_never_increases_the_output_error_on_the_calibration_data():
    _, _, patches, weight = _layer_problem()
    matrix = weight.reshape(6, -1)
    outputs = patches @ matrix.T + 1.0
    for ranks in [(1, 1), (3, 2), (5, 4)]:
        errors = {}
        for bias_refit in (False, True):
            problem, *_ = _layer_problem(bias_refit=bias_refit)
            fit = fit_layer(problem, Candidate("tucker2", ranks, Cost(0, 0), 0.0), FitSettings.of(CompressConfig()))
            bias = fit.bias if fit.bias is not None else np.ones(6)
            approximation = patches @ reconstruct(fit.factors[0]).reshape(6, -1).T + bias
            errors[bias_refit] = np.mean(np.sum((outputs - approximation) ** 2, axis=1))
            # the reported error is the measured one, relative to E||W1 x||^2
            assert fit.rel_error == pytest.approx(
                errors[bias_refit] / np.mean(np.sum((patches @ matrix.T) ** 2, 1)), rel=1e-3
            )
        assert errors[True] <= errors[False] * (1 + 1e-9)


def _npz(tmp_path, count=192):
    path = tmp_path / "data.npz"
    np.savez(path, x=_images(count), labels=np.arange(count) % 10)
    return path


def test_propagated_bias_refit_fit_lowers_the_whole_model_error(tmp_path, monkeypatch):
    from onnx_dacomp import prepare

    positions, collect = [], prepare.collect_statistics

    def recorded(*args, **options):
        positions.append(options["positions"])
        return collect(*args, **options)

    monkeypatch.setattr(prepare, "collect_statistics", recorded)
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    path = _npz(tmp_path)
    errors = {}
    for options in (dict(), dict(bias_refit=True, propagate=True)):
        config = CompressConfig(ratio=0.45, holdout=40, max_iter=10, **options)
        report = onnx_dacomp.compress(model, ArraySource(path, ["x"]), config, progress=False).report
        errors[bool(options)] = report.verification.rel_output_error
    assert errors[True] < errors[False]
    assert positions == ["sampled", "all"]  # the cross statistics take every position: with them, the plain ones


def test_min_agreement_search_meets_the_target_and_reports_its_probes(tmp_path):
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    path = _npz(tmp_path)
    config = CompressConfig(ratio=None, min_agreement=0.7, holdout=48, max_iter=5, classifier_outputs=("r5",))
    result = onnx_dacomp.compress(model, ArraySource(path, ["x"]), config, progress=False)
    report = result.report
    assert report.verification.top1_agreement_low >= 0.7  # the lower end of its 95 % interval
    assert report.search["ratio"] < 1 and 1 <= len(report.search["probes"]) <= 10
    met = [p["ratio"] for p in report.search["probes"] if p["met"]]
    missed = [p["ratio"] for p in report.search["probes"] if not p["met"]]
    assert report.search["ratio"] == min(met) and all(r < report.search["ratio"] for r in missed)
    assert report.ratio <= report.search["ratio"] + 1e-9


def test_max_drop_needs_labels_and_holdout(tmp_path):
    model = conv_stack(channels=8, size=(12, 12), input_channels=3)
    path = tmp_path / "nolabels.npz"
    np.savez(path, x=_images(64))
    from onnx_dacomp.errors import UserError

    with pytest.raises(UserError, match="labeled"):
        onnx_dacomp.compress(
            model, ArraySource(path, ["x"]), CompressConfig(ratio=None, max_drop=1.0, holdout=16), progress=False
        )
    with pytest.raises(UserError, match="held-out"):
        onnx_dacomp.compress(
            model, ArraySource(path, ["x"]), CompressConfig(ratio=None, max_drop=1.0, holdout=0), progress=False
        )
    with pytest.raises(UserError):
        CompressConfig(max_drop=1.0, min_agreement=0.9)


def test_propagation_that_verifies_worse_gives_way_to_the_plain_fit(tmp_path, monkeypatch):
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    source = ArraySource(_npz(tmp_path), ["x"])
    config = CompressConfig(ratio=0.45, holdout=40, max_iter=10, propagate=True, compensate="none", refit_outputs=False)
    report = onnx_dacomp.compress(model, source, config, progress=False).report
    assert report.propagation["kept"] == "propagated"  # on this stack propagation helps (test above)
    errors = report.propagation["output_error"]  # on every held-out sample: the verification's
    assert report.propagation["samples"] == report.verification.samples >= 32
    assert errors["propagated"] == pytest.approx(report.verification.rel_output_error**2, rel=1e-6)
    assert errors["propagated"] < errors["plain"] and report.propagation["difference_interval"][1] < 0

    real = LayerProblem.propagated

    def broken(plain, original, perturbed, bias_refit):  # a propagated target that is far off
        problem = real(plain, original, perturbed, bias_refit)
        return replace(problem, targets=[-target for target in problem.targets])

    monkeypatch.setattr(LayerProblem, "propagated", staticmethod(broken))
    result = onnx_dacomp.compress(model, source, config, progress=False)
    plain = onnx_dacomp.compress(model, source, replace(config, propagate=False), progress=False)
    # every wave's broken propagated fits lose to its plain ones on the held-out samples: the plain model
    waves = result.report.propagation["waves"]
    assert waves["waves"] == len(waves["choices"]) > 1 and waves["propagated_waves"] == 0
    assert all(wave["output_error"][0] > wave["output_error"][1] for wave in waves["choices"])
    assert result.report.verification == plain.report.verification
    assert result.model.SerializeToString() == plain.model.SerializeToString()


def test_a_layer_fitted_from_few_vectors_keeps_its_plain_fit_under_propagation(tmp_path):
    """A classifier after pooling sees one vector per image (80 vectors, 48 dims: shrunk): its propagated target
    would invert the perturbed input's covariance from those same vectors. It takes its plain fit, the one the
    run without --propagate writes, while the conv's wave is fitted propagated and judged."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal((48, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal((10, 48)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc_bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_bias"], ["y"], name="classifier", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    data = [{"x": _images(80, seed=5)}]
    ranks = {"conv": [16, 3], "classifier": 6}
    runs = {
        propagate: onnx_dacomp.compress(
            model,
            data,
            ratio=None,
            ranks=ranks,
            method="tucker2",
            holdout=0,
            rank_multiple=1,
            propagate=propagate,
            progress=False,
            benchmark=False,
            compensate="none",
        )  # fmt: skip
        for propagate in (False, True)
    }
    rows = {name: {row.name: row for row in runs[name].report.layers} for name in runs}
    assert rows[True]["classifier"].shrinkage > 0 and rows[True]["conv"].shrinkage == 0
    waves = {tuple(wave["layers"]): wave for wave in runs[True].report.propagation["waves"]["choices"]}
    assert waves[("classifier",)] == {"layers": ["classifier"], "propagated": False, "output_error": None}

    def weights(model, prefix):
        return [numpy_helper.to_array(init) for init in model.graph.initializer if init.name.startswith(prefix)]

    classifier = [weights(runs[p].model, "classifier") for p in (False, True)]
    assert classifier[0] and all(np.array_equal(a, b) for a, b in zip(*classifier))
    assert len(waves[("conv",)]["output_error"]) == 2  # the conv's wave was fitted propagated and judged


def test_without_held_out_data_propagation_is_judged_on_calibration_samples_it_did_not_fit(tmp_path, monkeypatch):
    """No held-out data: a seeded fifth of the calibration samples (the first of the source's seeded order) is
    set aside; propagation's cross statistics never see it, and the waves and the whole model are judged on it
    (the kept model's recorded error is its output error there, computed here with numpy)."""
    from onnx_dacomp import propagate

    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    path = _npz(tmp_path)
    images = np.load(path)["x"]
    set_aside = images[np.random.default_rng(0).permutation(len(images))[: len(images) // 5]]
    seen, collect = [], propagate.collect_cross_statistics

    def recording(original, compressed, layers, batches, **options):
        seen.append(np.concatenate([batch["x"] for batch in batches]))
        return collect(original, compressed, layers, batches, **options)

    monkeypatch.setattr(propagate, "collect_cross_statistics", recording)
    config = CompressConfig(ratio=0.45, holdout=0, max_iter=10, propagate=True, compensate="none", refit_outputs=False)
    result = onnx_dacomp.compress(model, ArraySource(path, ["x"]), config, progress=False)

    assert seen and all(len(batches) == len(images) - len(set_aside) for batches in seen)
    fitted_on = {sample.tobytes() for sample in seen[0]}
    assert not any(sample.tobytes() in fitted_on for sample in set_aside)
    record = result.report.propagation
    assert record["samples"] == len(set_aside)
    assert all(len(wave["output_error"]) == 2 for wave in record["waves"]["choices"])

    def outputs(candidate):
        session = onnx_dacomp.runtime.create_session(candidate, "cpu")
        return np.asarray(session.run(None, {"x": set_aside})[0], np.float64)

    reference = outputs(model)
    error = np.sum((outputs(result.model) - reference) ** 2) / np.sum(reference**2)
    assert record["output_error"][record["kept"]] == pytest.approx(error, rel=1e-4)
    assert record["kept"] == "propagated" and record["difference_interval"][1] < 0
    assert record["output_error"]["propagated"] < record["output_error"]["plain"]


def test_the_whole_model_keeps_propagation_only_where_its_error_is_lower_beyond_doubt():
    """`keep_better` on real sessions: a model whose error is far lower on every sample is kept; one whose error
    differs from the other's by chance, and the same model twice, give way to the plain model."""
    from onnx_dacomp.propagate import OutputError, keep_better

    model = conv_stack(channels=8, size=(12, 12), input_channels=3)
    rng = np.random.default_rng(7)
    batches = [{"x": rng.standard_normal((20, 3, 12, 12)).astype(np.float32)} for _ in range(3)]
    judge = OutputError(model, batches, "cpu")
    assert len(judge.energies) == 60
    # the same change of a weight with either sign: to first order the same error energy on every sample
    near, far, other = (_perturbed(model, "w2", scale, seed) for scale, seed in ((0.02, 1), (0.2, 2), (-0.02, 1)))
    kept, record = keep_better(near, far, judge)
    assert kept and record["kept"] == "propagated" and record["difference_interval"][1] < 0
    errors = judge.sample_errors(near), judge.sample_errors(far)
    assert record["output_error"]["propagated"] == pytest.approx(errors[0].sum() / judge.energies.sum())
    assert np.all(errors[0] < errors[1])
    assert keep_better(far, near, judge)[0] is False
    kept, record = keep_better(near, other, judge)
    assert not kept and record["kept"] == "plain"
    assert record["difference_interval"][0] < 0 < record["difference_interval"][1]
    assert keep_better(near, near, judge) == (False, keep_better(near, near, judge)[1])
    assert keep_better(near, near, judge)[1]["difference_interval"] == [0.0, 0.0]


def _linear_classifier(weight, bias):
    """x [N, 16] -> Gemm -> class scores [N, 10]."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "classifier",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.float32(weight), "w"), numpy_helper.from_array(np.float32(bias), "b")],
    )  # fmt: skip
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=IR_VERSION)


def test_a_classifier_keeps_propagation_only_where_its_top1_agreement_is_not_lower():
    """A lower output error beyond doubt is not enough for a classifier: a candidate whose error is lower on
    the whole but whose top-1 differs from the original's on some samples gives way; one that changes no
    top-1 is kept. The agreements recorded are the share of samples whose argmax matches the original's."""
    from onnx_dacomp.propagate import OutputError, keep_better

    rng = np.random.default_rng(3)
    weight, bias = rng.standard_normal((10, 16)), np.zeros(10)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    model = _linear_classifier(weight, bias)
    judge = OutputError(model, [{"x": x[:100]}, {"x": x[100:]}], "cpu", classes={"y": False})
    shifted = bias + np.eye(10)[0] * 0.5  # a small error on every sample; class 0 wins where it was close
    flipping = _linear_classifier(weight, shifted)
    scaled, near = _linear_classifier(1.1 * weight, bias), _linear_classifier(1.02 * weight, bias)
    logits = x @ weight.T
    agreement = np.mean(np.argmax(logits + shifted, axis=1) == np.argmax(logits, axis=1))
    assert 0.9 < agreement < 1  # some samples change their class, most do not

    kept, record = keep_better(flipping, scaled, judge)
    assert record["difference_interval"][1] < 0  # its output error alone would have kept it
    assert not kept and record["kept"] == "plain"
    assert record["top1_agreement"]["propagated"] == pytest.approx(agreement)
    assert record["top1_agreement"]["plain"] == 1.0  # scaling logits changes no argmax
    assert record["agreement_difference_interval"][0] < 0

    kept, record = keep_better(near, scaled, judge)
    assert kept and record["top1_agreement"] == {"propagated": 1.0, "plain": 1.0}
    assert "top1_agreement" not in keep_better(near, scaled, OutputError(model, [{"x": x}], "cpu"))[1]
