"""The latency comparison: alternating rounds, the ratio's median and bootstrap interval, and what it
measures on models of known relative cost."""

import numpy as np
from builders import conv_model
from onnx import helper, numpy_helper

from onnx_dacomp import latency


def test_median_interval_against_a_direct_bootstrap():
    rng = np.random.default_rng(5)
    ratios = rng.normal(0.8, 0.05, 40)
    median, low, high = latency.median_interval(ratios, seed=3)
    assert median == np.median(ratios)
    draws = np.random.default_rng(3).choice(ratios, size=(latency.BOOTSTRAP, 40), replace=True)
    medians = np.median(draws, axis=1)
    assert (low, high) == (np.quantile(medians, 0.025), np.quantile(medians, 0.975))
    assert low < median < high and high - low < 0.1
    assert latency.median_interval([1.2] * 12) == (1.2, 1.2, 1.2)  # no spread, no width
    wide = latency.median_interval(rng.normal(0.8, 0.3, 40), seed=3)
    assert wide[2] - wide[1] > high - low  # more noise, a wider interval


def _double(weight):
    """Two copies of the conv one after the other: about twice the work of one."""
    model = conv_model(weight, input_shape=("n", 32, 32, 32), pads=[1, 1, 1, 1])
    model.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), "W2"))
    model.graph.node[0].output[0] = "mid"
    model.graph.node.append(helper.make_node("Conv", ["mid", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]))
    return model


def test_compare_latency_measures_relative_cost():
    weight = np.random.default_rng(0).standard_normal((32, 32, 3, 3)) * 0.05
    single = conv_model(weight, input_shape=("n", 32, 32, 32), pads=[1, 1, 1, 1])
    batch = {"x": np.random.default_rng(1).standard_normal((4, 32, 32, 32)).astype(np.float32)}
    same = latency.compare_latency(single, single, batch, 4, device="cpu", max_seconds=5, show_progress=False)
    assert same.rounds >= latency.MIN_ROUNDS and same.threads == latency.default_threads() and same.batch == 4
    assert same.ratio_low <= same.ratio <= same.ratio_high and 0.75 < same.ratio < 1.33
    double = latency.compare_latency(
        single, _double(weight), batch, 4, device="cpu", max_seconds=5, show_progress=False
    )
    assert 1.4 < double.ratio < 2.8 and not double.faster and double.provider == "CPU"
    assert "ratio" in double.describe() and f"[{double.ratio_low:.3f}" in double.describe()
