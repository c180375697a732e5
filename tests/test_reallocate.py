"""Reallocation at the chosen plan: each layer's measured share of the output error corrects its weight, the
plan allocated again (freely, or with each layer's error kept within reach) is kept only where its model has the
lower output error on data the fits did not see, and a kept plan is measured and reallocated again."""

import tempfile
from dataclasses import replace

import numpy as np
import pytest
from builders import conv_stack

import onnx_dacomp
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.geometry import Cost
from onnx_dacomp.prepare import prepare
from onnx_dacomp.ranks.candidates import Candidate, CandidateTable
from onnx_dacomp.ranks.plan import RankPlan
from onnx_dacomp.reallocate import MIN_FACTOR, ROUNDS, corrected_weights, layer_shares, within_reach
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


def test_within_reach_keeps_a_compressed_layers_method_and_errors_near_its_own():
    def table(name, *candidates):
        options = tuple(Candidate(method, (rank,), Cost(rank, 10 * rank), e) for method, rank, e in candidates)
        return CandidateTable(name, Cost(100, 1000), options)

    tables = {
        "a": table("a", ("svd", 8, 0.4), ("svd", 16, 0.2), ("svd", 24, 0.11), ("svd", 32, 0.04), ("cp", 16, 0.1)),
        "b": table("b", ("prune", 4, 0.5), ("prune", 8, 0.3), ("prune", 12, 0.05), ("svd", 8, 0.3)),
        "c": table("c", ("svd", 8, 0.1)),  # computes b's input channels
        "d": table("d", ("svd", 8, 0.9), ("svd", 16, 0.01)),  # not compressed: free
    }
    plan = RankPlan({"a": tables["a"].candidates[1], "b": tables["b"].candidates[1], "c": None, "d": None}, 0.5)
    near = within_reach(tables, plan, ["a", "b"], 2.0, {"b": ("c",)})
    assert [(c.method, c.ranks) for c in near["a"].candidates] == [("svd", (8,)), ("svd", (16,)), ("svd", (24,))]
    assert [(c.method, c.ranks) for c in near["b"].candidates] == [("prune", (4,)), ("prune", (8,))]
    assert near["c"].candidates == () and near["d"] == tables["d"]
    assert tables["c"].candidates  # the input tables are not changed

    # a chain realized as `cp-fused` (where the target is time) keeps the candidates of the `cp` fit it realizes
    fused = RankPlan({**plan.choices, "a": replace(tables["a"].candidates[4], method="cp-fused")}, 0.5)
    assert [(c.method, c.ranks) for c in within_reach(tables, fused, ["a"], 2.0)["a"].candidates] == [("cp", (16,))]


def test_the_reallocated_plan_is_kept_only_where_its_output_error_is_lower(tmp_path):
    """Without held-out data the judge is the seeded fifth of the calibration samples set aside: the written
    model's output error there (numpy) is the lowest of the plans the rounds measured, each kept plan is the
    next round's starting point, and `--no-reallocate` writes the first plan's model."""
    path, images = _data(tmp_path)
    set_aside = images[np.random.default_rng(0).permutation(len(images))[: len(images) // 5]]
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    error = _output_error(model, set_aside)
    results = {}
    for reallocate in (True, False):
        config = CompressConfig(
            ratio=0.4, holdout=0, max_iter=10, compensate="none", refit_outputs=False, reallocate=reallocate
        )
        results[reallocate] = onnx_dacomp.compress(model, ArraySource(path, ["x"]), config, progress=False)
    record = results[True].report.reallocation
    assert results[False].report.reallocation is None
    rounds = record["rounds"]
    assert 1 <= len(rounds) <= ROUNDS and record["output_error"] == rounds[0]["output_error"]
    assert record["output_error"] == pytest.approx(error(results[False].model), rel=1e-4)
    first_compressed = {layer.name for layer in results[False].report.compressed}
    assert set(rounds[0]["shares"]) == first_compressed
    assert any(t["moved"] for t in rounds[0]["tries"]), "the corrected weights should move some layer of this stack"
    for this, after in zip(rounds, rounds[1:]):
        assert after["output_error"] == pytest.approx(this["output_error_reallocated"], rel=1e-9)  # measured again
    for this in rounds:
        kept = [t["output_error"] for t in this["tries"] if t["output_error"] < this["output_error"]]
        assert this.get("output_error_reallocated") == (kept[0] if kept else None)  # the first better try
    kept_errors = [r["output_error_reallocated"] for r in rounds if "output_error_reallocated" in r]
    measured = [record["output_error"], *kept_errors]
    assert error(results[True].model) == pytest.approx(min(measured), rel=1e-4)
    assert record["kept"] == ("reallocated" if len(measured) > 1 else "first")
    final = {layer.name for layer in results[True].report.compressed}
    assert final ^ first_compressed <= set(record["moved"])
    assert results[True].report.ratio <= 0.4 + 1e-9
