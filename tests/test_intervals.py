"""The verification figures' 95 % intervals: Wilson's interval against hand-computed values and its coverage
in simulation; the bootstrap intervals of a relative error and of a paired top-1 drop cover the true value;
compare_models attaches them; without held-out data the result is checked in-sample, said so; --eval-data
verifies on its own source."""

import numpy as np
import pytest
from builders import conv_stack, run
from onnx import numpy_helper

import onnx_dacomp
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.intervals import (
    paired_difference_interval,
    relative_difference_interval,
    relative_error_interval,
    wilson,
)
from onnx_dacomp.report import verification_line
from onnx_dacomp.verify import compare_models


def test_wilson_matches_hand_computed_values():
    z2 = 1.959963984540054**2
    assert wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # no successes: upper end z^2 / (n + z^2)
    assert wilson(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    low, high = wilson(95, 100)
    assert low < 0.95 < high and high < 1 and 0.95 - low > high - 0.95  # skewed away from the boundary


def test_wilson_covers_the_true_proportion_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for share, trials in ((0.9, 100), (0.6, 40)):
        hits = rng.binomial(trials, share, size=4000)
        covered = np.mean([low <= share <= high for low, high in (wilson(h, trials) for h in hits)])
        assert 0.92 <= covered <= 0.98, (share, trials, covered)


def test_bootstrap_intervals_cover_the_population_value():
    rng = np.random.default_rng(1)
    covered_error, covered_drop, trials = 0, 0, 200
    for trial in range(trials):
        energies = rng.gamma(2.0, 1.0, 200)
        errors = energies * rng.uniform(0, 0.02, 200)  # per sample a relative error energy of 0.01 on average
        low, high = relative_error_interval(errors, energies, seed=trial)
        covered_error += low <= np.sqrt(0.01) <= high
        original = rng.random(200) < 0.8
        compressed = original & (rng.random(200) > 0.05)  # loses 5 % of the right answers: drop 0.04
        low, high = paired_difference_interval(original, compressed, seed=trial)
        covered_drop += low <= 0.04 <= high
    assert covered_error / trials >= 0.88 and covered_drop / trials >= 0.88


def test_the_interval_of_two_models_error_difference_covers_it_and_tells_a_real_one_from_none():
    """Paired per-sample error energies of two models: the interval of the difference of their relative error
    energies covers the population's (here 0.002) about 95 % of the time; where the two errors are drawn alike it
    holds zero about as often; for identical errors it is exactly zero."""
    rng = np.random.default_rng(3)
    covered, zero_held, trials = 0, 0, 200
    for trial in range(trials):
        energies = rng.gamma(2.0, 1.0, 300)
        first = energies * rng.uniform(0, 0.02, 300)  # relative error energy 0.010 on average
        second = energies * rng.uniform(0, 0.016, 300)  # 0.008
        low, high = relative_difference_interval(first, second, energies, seed=trial)
        covered += low <= 0.002 <= high
        alike = energies * rng.uniform(0, 0.02, 300)
        low, high = relative_difference_interval(first, alike, energies, seed=trial)
        zero_held += low <= 0 <= high
    assert covered / trials >= 0.88 and zero_held / trials >= 0.88
    errors = rng.uniform(0, 1, 50)
    assert relative_difference_interval(errors, errors, np.ones(50)) == (0.0, 0.0)


def test_compare_models_gives_each_figure_its_interval():
    model = conv_stack(channels=8, size=(12, 12), input_channels=3)
    perturbed = conv_stack(channels=8, size=(12, 12), input_channels=3)
    weight = perturbed.graph.initializer[2]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.3), weight.name))
    x = np.random.default_rng(2).standard_normal((60, 3, 12, 12)).astype(np.float32)
    comparison = compare_models(model, perturbed, [{"x": x[:30]}, {"x": x[30:]}], progress=False)
    output = comparison.outputs[0]
    reference, changed = (run(m, {"x": x})[0].astype(np.float64).reshape(60, -1) for m in (model, perturbed))
    errors, energies = np.sum((changed - reference) ** 2, axis=1), np.sum(reference**2, axis=1)
    assert output.rel_error_interval == pytest.approx(relative_error_interval(errors, energies))
    assert output.rel_error_interval[0] < output.rel_error < output.rel_error_interval[1]
    assert comparison.rel_output_error_high == output.rel_error_interval[1]


def _npz(tmp_path, name, count, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 3, 4, 4)).repeat(3, axis=2).repeat(3, axis=3)
    path = tmp_path / name
    np.savez(path, x=(base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32))
    return path


def test_without_held_out_data_the_result_is_checked_in_sample(tmp_path):
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    data = _npz(tmp_path, "data.npz", 80, 0)
    config = CompressConfig(ratio=0.5, holdout=0, max_iter=5, benchmark=False)
    report = onnx_dacomp.compress(model, ArraySource(data, ["x"]), config, progress=False).report
    assert report.verification.in_sample and report.verification.samples == 80
    assert "IN-SAMPLE on 80 calibration samples" in verification_line(report.verification)


def test_eval_data_verifies_on_its_own_source_and_all_data_calibrates(tmp_path):
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    data, other = _npz(tmp_path, "data.npz", 80, 0), _npz(tmp_path, "other.npz", 36, 1)
    config = CompressConfig(ratio=0.5, max_iter=5, benchmark=False, eval_data=str(other))
    report = onnx_dacomp.compress(model, str(data), config, progress=False).report
    assert not report.verification.in_sample and report.verification.samples == 36
    assert report.settings["holdout"] == 0 and "80 samples" in report.calibration
