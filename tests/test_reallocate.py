"""Reallocation at the chosen plan: each layer's measured share of the output error corrects its weight, and
the plan allocated again is kept only where its model has the lower output error on data the fits did not see."""

import tempfile

import numpy as np
import pytest
from builders import conv_stack

import onnx_dacomp
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.prepare import prepare
from onnx_dacomp.reallocate import MIN_FACTOR, corrected_weights, layer_shares
from onnx_dacomp.runtime import create_session
from onnx_dacomp.workers import executor


def _data(tmp_path, count=200):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((count, 3, 4, 4))
    images = base.repeat(3, axis=2).repeat(3, axis=3) + 0.05 * rng.standard_normal((count, 3, 12, 12)) + 0.3
    path = tmp_path / "data.npz"
    np.savez(path, x=images.astype(np.float32))
    return path, images.astype(np.float32)


def _output_error(reference_model, images):
    """The relative output error energy of a model against `reference_model` on `images` (numpy)."""
    reference = np.asarray(create_session(reference_model, "cpu").run(None, {"x": images})[0], np.float64)

    def error(candidate) -> float:
        output = np.asarray(create_session(candidate, "cpu").run(None, {"x": images})[0], np.float64)
        return float(np.sum((output - reference) ** 2) / np.sum(reference**2))

    return error


def test_corrected_weights_scale_each_weight_by_its_measured_over_predicted_share():
    weights = {"a": 2.0, "b": 1.0, "c": 5.0}
    errors = {"a": 0.1, "b": 0.2}
    corrected = corrected_weights(weights, errors, {"a": 0.6, "b": 1e-4})
    assert corrected["a"] == pytest.approx(2.0 * 0.6 / (2.0 * 0.1))  # measured 3 times the prediction
    assert corrected["b"] == pytest.approx(1.0 * MIN_FACTOR)  # a share within the noise: held at the floor
    assert corrected["c"] == 5.0  # not measured: unchanged
    assert corrected_weights(weights, errors, {"a": -0.01})["a"] == pytest.approx(2.0 * MIN_FACTOR)


def test_layer_shares_are_leave_one_out_differences_of_the_output_error(tmp_path):
    """With one chain in place its share is the whole error (restoring it gives the original model); with all of
    them, each share is the total less the error of a model where that layer alone is the original."""
    path, images = _data(tmp_path)
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    config = CompressConfig(ratio=0.45, holdout=0, max_iter=10)
    error = _output_error(model, images[:64])
    with executor(1, None) as workers, tempfile.TemporaryDirectory() as scratch:
        job = prepare(model, ArraySource(path, ["x"]), config, None, False, workers, scratch)
        fits = job.build(job.plan_at(0.45))[1]
    chains = job.chains(fits)
    names = list(fits)
    assert len(names) >= 3

    first = {key: chain for key, chain in chains.items() if chain[0].name == names[0]}
    total, shares = layer_shares(model, first, error, names, show_progress=False)
    assert total > 0 and shares == {names[0]: pytest.approx(total, rel=1e-9, abs=1e-12)}

    total, shares = layer_shares(model, chains, error, names[1:], show_progress=False)
    assert set(shares) == set(names[1:])  # only the layers asked for
    compressed = onnx_dacomp.rewrite.replace_layers(model, chains)
    assert total == pytest.approx(error(compressed))
    for name in names[1:]:
        # the compressed model with this layer's original weights: its nodes restored from the original graph
        others = {key: chain for key, chain in chains.items() if chain[0].name != name}
        assert shares[name] == pytest.approx(total - error(onnx_dacomp.rewrite.replace_layers(model, others)))
    assert sum(shares.values()) != pytest.approx(0.0)


def test_the_reallocated_plan_is_kept_only_where_its_output_error_is_lower(tmp_path):
    """Without held-out data the judge is the seeded fifth of the calibration samples set aside: the written
    model's output error there (numpy) is the record's error of the plan it says it kept, the lower of the two;
    `--no-reallocate` writes the first plan's model."""
    path, images = _data(tmp_path)
    set_aside = images[np.random.default_rng(0).permutation(len(images))[: len(images) // 5]]
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    error = _output_error(model, set_aside)
    results = {}
    for reallocate in (True, False):
        config = CompressConfig(ratio=0.4, holdout=0, max_iter=10, compensate="none", reallocate=reallocate)
        results[reallocate] = onnx_dacomp.compress(model, ArraySource(path, ["x"]), config, progress=False)
    record = results[True].report.reallocation
    assert results[False].report.reallocation is None
    assert record["output_error"] == pytest.approx(error(results[False].model), rel=1e-4)
    assert set(record["shares"]) == {layer.name for layer in results[True].report.compressed} | set(record["moved"])
    assert record["moved"], "the corrected weights should move some layer of this stack"
    kept = record["output_error_reallocated"] if record["kept"] == "reallocated" else record["output_error"]
    assert kept == min(record["output_error"], record["output_error_reallocated"])
    assert error(results[True].model) == pytest.approx(kept, rel=1e-4)
    assert results[True].report.ratio <= 0.4 + 1e-9
