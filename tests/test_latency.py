"""The latency comparison: alternating rounds, the ratio's median and bootstrap interval, and what it
measures on models of known relative cost."""

import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
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


def test_the_two_level_interval_covers_the_variation_between_session_pairs():
    """Ratios from pairs of sessions of different speeds: the interval resamples the pairs, then rounds within
    them (against a direct loop of that bootstrap), and is wider than the rounds alone would say."""
    rng = np.random.default_rng(7)
    offsets = rng.normal(0, 0.04, 6)  # each pair's own speed
    labels = np.repeat(np.arange(6), 4)
    ratios = 0.8 + offsets[labels] + rng.normal(0, 0.01, len(labels))
    median, low, high = latency.median_interval(ratios, seed=3, sessions=list(labels))
    assert median == np.median(ratios)
    direct, loop = [], np.random.default_rng(11)
    groups = [ratios[labels == pair] for pair in range(6)]
    for _ in range(latency.BOOTSTRAP):
        picked = [groups[i] for i in loop.integers(0, 6, 6)]
        direct.append(np.median(np.concatenate([g[loop.integers(0, len(g), len(g))] for g in picked])))
    expected = np.quantile(direct, [0.025, 0.975])
    width = expected[1] - expected[0]
    assert abs(low - expected[0]) < 0.15 * width and abs(high - expected[1]) < 0.15 * width
    flat = latency.median_interval(ratios, seed=3)
    assert high - low > 1.2 * (flat[2] - flat[1])
    assert latency.median_interval([0.9, 0.8, 0.85], sessions=[0, 0, 0])[0] == 0.85  # one pair: its rounds


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
    assert same.rounds >= latency.MIN_ROUNDS and same.batch == 4
    assert {same.threads, same.compressed_threads} <= {1, latency.default_threads()}
    assert same.sessions == -(-same.rounds // latency.ROUNDS_PER_SESSION) >= 2  # a fresh pair every few rounds
    assert same.ratio_low <= same.ratio <= same.ratio_high and 0.75 < same.ratio < 1.33
    double = latency.compare_latency(
        single, _double(weight), batch, 4, device="cpu", max_seconds=5, show_progress=False
    )
    assert 1.4 < double.ratio < 2.8 and not double.faster and double.provider == "CPU"
    if latency.default_threads() > 1:  # both counts timed: the one-thread blocks measure the same cost
        assert double.one_thread_low <= double.one_thread_ratio <= double.one_thread_high
        assert 1.4 < double.one_thread_ratio < 2.8
    assert "ratio" in double.describe() and f"[{double.ratio_low:.3f}" in double.describe()


@pytest.mark.parametrize("one_thread_share, expected", [(0.8, 1), (0.95, 1), (0.97, 4)])
def test_timing_takes_one_thread_where_the_model_runs_clearly_faster_on_one(monkeypatch, one_thread_share, expected):
    """A model's serving threads: one per core (4 here) or one, whichever a deployment of it would take: one
    only where its blocks take at most ONE_THREAD_SHARE of the time (the
    timings faked by each session's thread count). Chosen once per model and batch; one core: one thread."""
    monkeypatch.setattr(latency, "default_threads", lambda: 4)
    monkeypatch.setattr(latency, "_serving", {})
    timed = []

    def fake_timed(run, runs):
        timed.append(threads := run.session.get_session_options().intra_op_num_threads)
        return one_thread_share if threads == 1 else 1.0

    monkeypatch.setattr(latency, "_timed", fake_timed)
    model = conv_model(np.ones((4, 4, 1, 1)), input_shape=("n", 4, 3, 3))
    batch = {"x": np.ones((2, 4, 3, 3), np.float32)}
    assert latency.serving_threads(model, batch, 2, "cpu") == expected
    assert sorted(set(timed)) == [1, 4] and timed.count(1) == timed.count(4)  # alternating blocks of each
    count = len(timed)
    assert latency.serving_threads(model, batch, 2, "cpu") == expected and len(timed) == count  # chosen once
    monkeypatch.setattr(latency, "default_threads", lambda: 1)
    assert latency.serving_threads(model, {"x": np.ones((3, 4, 3, 3), np.float32)}, 3, "cpu") == 1


def test_each_model_is_timed_on_its_fastest_threads_in_each_round(monkeypatch):
    """Without a thread count, each model runs a block on all cores (2 here) and one on one thread in every
    round, in sessions that stop spinning when a run returns, and its time in the round is the faster block:
    here the original is faster on two threads, the compressed model on one, except in every fourth block
    (the machine's state), so the ratio is the compressed model's one-thread time over the original's two-thread
    time in most rounds and the reported threads are the ones each took most often. A given count holds for both."""
    original, compressed, created, blocks = object(), object(), [], itertools.count()

    class Run:
        def __init__(self, session, batch):
            self.model, self.threads = session

        def __call__(self):
            pass

    def session(model, *args, threads=None, stop_spinning=False, **kwargs):
        created.append((model, threads, stop_spinning))
        return model, threads

    def timed(run, count):
        if run.model is original:
            return {2: 1.0, 1: 1.5}[run.threads] * 1e-3
        if run.threads == 2:  # every fourth block (another state of the machine) faster than on one thread
            return (0.5 if next(blocks) % 4 == 3 else 0.9) * 1e-3
        return 0.6e-3

    from onnx_dacomp.report import latency_line

    monkeypatch.setattr(latency, "default_threads", lambda: 2)
    monkeypatch.setattr(latency, "create_session", session)
    monkeypatch.setattr(latency, "provider_name", lambda session: "CPU")
    monkeypatch.setattr(latency, "BoundRun", Run)
    monkeypatch.setattr(latency, "_timed", timed)
    measured = latency.compare_latency(original, compressed, {}, 1, max_seconds=0, show_progress=False)
    assert set(created) == {(model, count, True) for model in (original, compressed) for count in (1, 2)}
    assert measured.ratio == pytest.approx(0.6) and measured.original_ms == pytest.approx(1.0)
    assert (measured.threads, measured.compressed_threads) == (2, 1)
    assert "the original on 2 threads, the compressed model on 1 thread" in measured.describe()
    assert "run the compressed model with intra_op_num_threads=1" in latency_line(measured)
    # the same rounds' one-thread blocks give both models on one thread, whatever the state
    assert measured.one_thread_ratio == pytest.approx(0.6 / 1.5)
    assert measured.one_thread_low <= 0.4 * (1 - latency.RESOLUTION) + 1e-12
    assert "both on one thread 0.400 [" in measured.describe()
    created.clear()
    given = latency.compare_latency(original, compressed, {}, 1, threads=1, max_seconds=0, show_progress=False)
    assert {threads for _, threads, _ in created} == {1} and given.ratio == pytest.approx(0.6 / 1.5)
    assert "(CPU, 1 thread)" in given.describe() and "intra_op_num_threads" not in latency_line(given)
    assert given.one_thread_ratio is None and "both on one thread" not in given.describe()


def test_a_session_that_stops_spinning_says_so_to_onnxruntime():
    from onnx_dacomp.runtime import create_session

    model = conv_model(np.ones((4, 4, 1, 1)), input_shape=("n", 4, 3, 3))
    stopping = create_session(model, "cpu", stop_spinning=True).get_session_options()
    assert stopping.get_session_config_entry("session.force_spinning_stop") == "1"
    default = create_session(model, "cpu").get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        default.get_session_config_entry("session.force_spinning_stop")


def test_a_bound_run_computes_the_model_on_the_bound_inputs():
    """The timed run (inputs and outputs bound to the provider's device) against a numpy 1x1 convolution."""
    from onnx_dacomp.runtime import create_session

    rng = np.random.default_rng(2)
    weight = rng.standard_normal((6, 4, 1, 1))
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    run = latency.BoundRun(create_session(conv_model(weight, input_shape=("n", 4, 5, 5)), "cpu"), {"x": x})
    run()
    expected = np.einsum("oi,nihw->nohw", weight[:, :, 0, 0], x.astype(np.float64))
    (output,) = run.outputs()
    assert output.shape == (3, 6, 5, 5) and np.allclose(output, expected, rtol=1e-5, atol=1e-5)


def test_with_a_threshold_a_narrow_interval_that_straddles_it_is_timed_on(monkeypatch):
    """Rounds of known times (the compressed model 0.99 or 1.01 of the original's, in turn): narrow at once, so
    without a threshold, or asked about 1.1, the fewest rounds; asked about 1.0, every interval straddles it:
    to the cap."""
    original, compressed, calls = object(), object(), itertools.count()
    monkeypatch.setattr(latency, "create_session", lambda model, *args, **kwargs: model)
    monkeypatch.setattr(latency, "provider_name", lambda session: "CPU")
    monkeypatch.setattr(latency, "BoundRun", lambda session, batch: session)
    monkeypatch.setattr(
        latency, "_timed", lambda run, runs: 1e-3 * (1 if run is original else (0.99, 1.01)[next(calls) % 2])
    )

    def rounds(threshold):
        measured = latency.compare_latency(
            original, compressed, {}, 1, threads=2, threshold=threshold, max_seconds=600, show_progress=False
        )
        return measured.rounds, measured

    assert rounds(None)[0] == latency.MIN_ROUNDS
    decided, measured = rounds(1.1)
    assert decided == latency.MIN_ROUNDS and measured.ratio_high <= 1.1
    undecided, measured = rounds(1.0)
    assert undecided == latency.MAX_ROUNDS and measured.ratio_low < 1.0 < measured.ratio_high


def test_an_interval_is_never_narrower_than_the_resolution_between_processes(monkeypatch):
    """Rounds without any spread (the compressed model always 0.9 of the original's time) still give an
    interval of +-RESOLUTION, and a speed target within it stays undecided: timed to the cap."""
    original, compressed = object(), object()
    monkeypatch.setattr(latency, "create_session", lambda model, *args, **kwargs: model)
    monkeypatch.setattr(latency, "provider_name", lambda session: "CPU")
    monkeypatch.setattr(latency, "BoundRun", lambda session, batch: session)
    monkeypatch.setattr(latency, "_timed", lambda run, runs: 1e-3 * (1 if run is original else 0.9))
    measured = latency.compare_latency(original, compressed, {}, 1, threads=1, show_progress=False)
    resolution = 0.9 * latency.RESOLUTION
    assert measured.ratio == pytest.approx(0.9) and measured.rounds == latency.MIN_ROUNDS
    assert (measured.ratio_low, measured.ratio_high) == pytest.approx((0.9 - resolution, 0.9 + resolution))
    near = latency.compare_latency(
        original, compressed, {}, 1, threads=1, threshold=0.905, max_seconds=600, show_progress=False
    )
    assert near.rounds == latency.MAX_ROUNDS


def _other_cpu_seconds(work, log=None) -> float:
    """The CPU seconds `OtherWork` counts as other processes' while `work()` runs (with `log`: warned to it)."""
    start, meter = time.monotonic(), latency.OtherWork()
    work()
    cores = meter.warn_if_busy(log=log) if log else meter.cores()
    return cores * (time.monotonic() - start)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="other processes' CPU time is read from /proc/stat")
def test_other_work_counts_the_cpu_time_of_other_processes_not_this_ones(monkeypatch):
    """Half a second of CPU spent by a child process is counted (and warned about), the same spent by this
    process (as onnxruntime's threads do while timing) is not. In CPU seconds, not cores, so that other work on
    the machine only adds to both figures alike."""
    spin = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    monkeypatch.setattr(latency, "BUSY_SHARE_WARNING", 0.0)
    warnings = []
    child = _other_cpu_seconds(
        lambda: subprocess.run([sys.executable, "-c", spin], check=True), lambda *args: warnings.append(args)
    )
    own = _other_cpu_seconds(lambda: exec(spin))
    assert child >= 0.45 and child - own > 0.25 and len(warnings) == 1
