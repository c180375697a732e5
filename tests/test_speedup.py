"""--speedup: the largest ratio (most accurate model) whose measured end-to-end speed-up meets the target, on
the pessimistic end of the interval; wiring through compress with a latency that follows the MACs."""

import math
from dataclasses import replace

import numpy as np
import pytest
from builders import conv_stack

import onnx_dacomp
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.errors import UserError
from onnx_dacomp.latency import Latency
from onnx_dacomp.search import largest_ratio_at_speed


def _latency(ratio: float, width: float = 0.02) -> Latency:
    return Latency(1, 1.0, ratio, "CPU", ratio, ratio - width, ratio + width, 20, 2)


def test_the_search_finds_the_largest_ratio_that_is_fast_enough():
    # a model at budget ratio r runs at 0.2 + 0.8 r of the original's time (fixed costs stay)
    probed = []

    def probe(ratio):
        probed.append(ratio)
        return _latency(0.2 + 0.8 * ratio)

    ratio, record = largest_ratio_at_speed(probe, 1.5)
    # met where 0.2 + 0.8 r + 0.02 <= 1 / 1.5: r <= 0.5583
    assert 0.5583 - 0.02 <= ratio <= 0.5584 and record["ratio"] == ratio
    assert all(item["met"] == (item["interval"][1] <= 1 / 1.5) for item in record["probes"])
    assert len(probed) == len(record["probes"]) <= 10
    with pytest.raises(UserError, match="--speedup 6 not reached: the fastest model probed"):
        largest_ratio_at_speed(probe, 6)  # 0.2 of the time is fixed: 5x at most


def test_a_search_whose_misses_stop_getting_faster_ends_there():
    """Where the time is per node (a GPU: ResNet-56's chains ran 1.49x the original's time at half its MACs),
    halving the ratio changes nothing: the search stops at the second such miss instead of bisecting down to
    models that lost their accuracy for no speed. A time that still follows the ratio is searched on."""
    probed = []

    def flat(ratio):
        probed.append(ratio)
        return _latency(1.49 - 0.01 * ratio)  # 1.485 at 0.5, 1.4875 at 0.25: slower still

    with pytest.raises(UserError, match=r"not reached.*ratio 0.2500 took 1.488 .* where ratio 0.5000 took 1.485"):
        largest_ratio_at_speed(flat, 1.3)
    assert probed == [0.5, 0.25]
    probed.clear()

    def slowly(ratio):  # 5 % faster per halving: still following the ratio
        probed.append(ratio)
        return _latency(1.2 * 0.95 ** -math.log2(ratio))

    with pytest.raises(UserError, match="not reached: the fastest model probed"):
        largest_ratio_at_speed(slowly, 5)
    assert len(probed) > 2


def test_a_model_faster_as_a_whole_is_probed_at_ratio_one_first_and_kept_there_if_fast_enough():
    # folded Pads make the uncompressed model run at 0.6 of the time: 1.5x needs no compression at all
    probed = []

    def probe(ratio):
        probed.append(ratio)
        return _latency(0.6 * (0.2 + 0.8 * ratio))

    ratio, record = largest_ratio_at_speed(probe, 1.5, faster_whole=True)
    assert ratio == 1.0 and probed == [1.0] and record["probes"][0]["met"]
    probed.clear()
    ratio, _ = largest_ratio_at_speed(probe, 2.5, faster_whole=True)  # 0.4: met where 0.12 + 0.48 r <= 0.38
    assert probed[0] == 1.0 and 0.5417 - 0.05 <= ratio <= 0.5417


def test_a_closing_measurement_that_misses_the_speed_the_probe_met_is_said(caplog, monkeypatch):
    from onnx_dacomp import log
    from onnx_dacomp.search import closing_measurement

    monkeypatch.setattr(log.logger, "propagate", True)  # CLI tests turn it off; caplog listens at the root

    record = {"target": "1.25x faster at batch 1", "ratio": 0.5, "probes": []}
    drifted = closing_measurement(record, [_latency(0.85), replace(_latency(0.7), batch=32)], 1.25, 1)
    assert drifted["closing"] == {"latency_ratio": 0.85, "interval": [0.83, 0.87], "met": False}
    assert "misses the 1.25x its probe met" in caplog.text
    caplog.clear()
    steady = closing_measurement(record, [_latency(0.7)], 1.25, 1)
    assert steady["closing"]["met"] and not caplog.text and record.get("closing") is None


def _macs(model):
    from onnx_dacomp.targets import find_targets

    return sum(layer.macs for layer in find_targets(model).layers)


def _compressed_at_speed(tmp_path, monkeypatch, thresholds=None):
    """A conv stack compressed with `--speedup 1.25`, its times faked in proportion to its MACs (each
    measurement's threshold appended to `thresholds`)."""
    from onnx_dacomp import job

    def fake_latency(original, compressed, source, sizes, signature, runtime, *args, threshold=None):
        if thresholds is not None:
            thresholds.append(threshold)
        return tuple(_latency(_macs(compressed) / _macs(original), 0.01) for _ in sizes)

    monkeypatch.setattr(job, "end_to_end_latency", fake_latency)
    model = conv_stack(channels=16, size=(12, 12), input_channels=3)
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((96, 3, 12, 12)).astype(np.float32))
    options = dict(speedup=1.25, holdout=16, max_iter=3, progress=False, rank_multiple=1)
    return model, onnx_dacomp.compress(model, ArraySource(path, ["x"]), **options), path


def test_compress_with_speedup_counts_macs_and_records_its_probes(tmp_path, monkeypatch):
    thresholds = []
    model, result, path = _compressed_at_speed(tmp_path, monkeypatch, thresholds)
    report = result.report
    assert report.budget == "macs" and report.search["target"] == "1.25x faster at batch 1"
    met = [item for item in report.search["probes"] if item["met"]]
    assert met and report.search["ratio"] == max(item["ratio"] for item in met)
    assert _macs(result.model) / _macs(model) <= 1 / 1.25 - 0.01  # the pessimistic end meets the target
    assert report.search["closing"]["met"] and report.search["closing"]["latency_ratio"] == report.latency[0].ratio
    # each probe is timed until decided against the target; the closing measurement until its interval is narrow
    assert thresholds == [1 / 1.25] * len(report.search["probes"]) + [None]
    assert all(row.latency_after is not None for row in report.layers if row.method)  # the layers' times shown
    with pytest.raises(UserError, match="--speedup sets the ratio itself"):
        onnx_dacomp.compress(model, ArraySource(path, ["x"]), speedup=1.25, ratio=0.5, progress=False)


def test_a_reallocated_plan_that_misses_the_speed_target_gives_way_to_the_first(tmp_path, monkeypatch):
    """The search timed the first plan; reallocation keeps its cost in parameters or MACs, not its time. Where
    the reallocated plan's model is not fast enough (fake times in proportion to MACs, and a reallocation that
    keeps a compressed layer whole), the first plan is written and the report says why."""
    from onnx_dacomp import job

    restored = []

    def reallocated(self, ratio, rank_plan, kept):
        restored.append(next(name for name, choice in rank_plan.choices.items() if choice is not None))
        summary = {"output_error": 0.2, "predicted": 0.1, "moved": restored[-1:], "rounds": [], "kept": "reallocated"}
        return rank_plan.without(restored[-1:]), kept, summary

    monkeypatch.setattr(job.CompressionJob, "reallocated", reallocated)
    model, result, _ = _compressed_at_speed(tmp_path, monkeypatch)
    report = result.report
    assert report.reallocation["kept"] == "first" and report.reallocation["too_slow"] > 1 / 1.25
    assert {row.name: row.method for row in report.layers}[restored[0]] is not None  # compressed, as first planned
    assert _macs(result.model) / _macs(model) <= 1 / 1.25 - 0.01 and report.search["closing"]["met"]
    assert "the reallocated one ran at" in report.table()


def test_planned_chains_take_the_realization_that_runs_the_model_faster():
    """CP's fits as separable or fused depthwise convs: per (method, kernel) group, the realization whose model
    the comparison finds faster wins, its cost the fused chain's; a later plan follows the decision without
    timing again; a layer named in --ranks keeps its method; Tucker-2 has no other realization."""
    from onnx_dacomp.geometry import original_cost
    from onnx_dacomp.methods import get
    from onnx_dacomp.ranks.candidates import Candidate
    from onnx_dacomp.ranks.plan import RankPlan
    from onnx_dacomp.speed import LayerCosts, faster_realizations
    from onnx_dacomp.targets import find_targets

    layers = {layer.name: layer for layer in find_targets(conv_stack(channels=16, size=(12, 12))).targets}
    names = ["conv0", "conv2"]  # 3x3 kernels both (conv1's is 3x2)
    compared = []

    def compare(plan, other):  # a model runs faster the more of its chains are fused
        compared.append((plan, other))
        fused = [sum(c.method == "cp-fused" for c in p.choices.values() if c is not None) for p in (plan, other)]
        return 1.0 - 0.1 * (fused[1] - fused[0])

    def choice(name, method, ranks):
        return Candidate(method, ranks, get(method).cost(layers[name].geometry, ranks), 0.1)

    costs = LayerCosts(layers)
    plan = RankPlan({names[0]: choice(names[0], "cp", (8,)), names[1]: choice(names[1], "cp", (8,))}, 0.5)
    decided = {}
    realized = faster_realizations(plan, costs, {}, decided, compare)
    assert len(compared) == 1 and decided == {("cp", (3, 3)): "cp-fused"}
    for name in names:
        chosen = realized.get(name)
        assert (chosen.method, chosen.ranks, chosen.error) == ("cp-fused", (8,), 0.1)
        assert chosen.cost == get("cp-fused").cost(layers[name].geometry, (8,))
        assert chosen.cost.params > plan.get(name).cost.params  # 9 taps per rank instead of 3 + 3, one node fewer
        assert original_cost(layers[name].geometry).params > chosen.cost.params
    later = RankPlan({names[0]: choice(names[0], "cp", (4,))}, 0.3)
    assert faster_realizations(later, costs, {}, decided, compare).get(names[0]).method == "cp-fused"
    assert len(compared) == 1  # decided once
    kept = faster_realizations(plan, costs, {names[0]: None}, {}, compare)
    assert [kept.get(name).method for name in names] == ["cp", "cp-fused"]
    slower = faster_realizations(plan, costs, {}, {}, lambda plan, other: 1.02)
    assert [slower.get(name).method for name in names] == ["cp", "cp"]
    tucker = RankPlan({names[0]: choice(names[0], "tucker2", (8, 8))}, 0.5)
    assert faster_realizations(tucker, costs, {}, {}, compare).get(names[0]) is tucker.get(names[0])
    two_kernels = RankPlan({name: choice(name, "cp", (8,)) for name in ("conv0", "conv1")}, 0.5)
    decided, compared[:] = {}, []
    faster_realizations(two_kernels, costs, {}, decided, compare)
    assert len(compared) == 2 and set(decided) == {("cp", (3, 3)), ("cp", (3, 2))}


def test_a_variant_is_fitted_as_the_method_it_realizes():
    """`cp-fused` on a layer whose CP fit is cached reuses that fit, its kernels the outer products of the
    separable factors: the same weight reconstructed, bit for bit close."""
    from onnx_dacomp.decompose.factors import CPFactors, FusedCPFactors, reconstruct
    from onnx_dacomp.fit import FitSettings, fit_all
    from onnx_dacomp.geometry import LayerGeometry
    from onnx_dacomp.methods import get
    from onnx_dacomp.problems import LayerProblem
    from onnx_dacomp.ranks.candidates import Candidate

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 6, 3, 3))
    geometry = LayerGeometry(8, 6, 1, (3, 3), (8, 8), (8, 8), False)
    problem = LayerProblem("layer", geometry, [weight], [weight], None, None, None)
    settings = FitSettings(max_iter=30, seed=0)
    cache = {}
    separable = fit_all({"layer": problem}, {"layer": Candidate("cp", (5,), None, 0.0)}, settings, cache=cache,
                        show_progress=False)["layer"]  # fmt: skip
    fused = fit_all({"layer": problem}, {"layer": Candidate("cp-fused", (5,), None, 0.0)}, settings, cache=cache,
                    show_progress=False)["layer"]  # fmt: skip
    assert list(cache) == [("layer", "cp", (5,))]  # one fit for both
    assert type(separable.factors[0]) is CPFactors and type(fused.factors[0]) is FusedCPFactors
    assert fused.rel_error == separable.rel_error
    np.testing.assert_allclose(reconstruct(fused.factors[0]), reconstruct(separable.factors[0]), atol=1e-12)
    direct = get("cp-fused").solve(weight, None, (5,), max_iter=30, seed=0).factors  # what propagation fits
    np.testing.assert_allclose(reconstruct(direct), reconstruct(separable.factors[0]), atol=1e-12)


def test_layer_timings_are_the_one_layer_time_less_its_baseline(monkeypatch):
    """What a one-layer model pays besides the layer (its baseline model's time) is taken off every timing,
    floored above zero; the baseline is measured once per layer kind and input."""
    from onnx_dacomp import speed
    from onnx_dacomp.targets import find_targets

    layer = find_targets(conv_stack(channels=16, size=(12, 12))).targets[0]
    baselines = []

    def fake_session_latency(model, feeds, device, threads):
        if model.graph.node[0].name == "baseline":
            baselines.append(model)
            return 0.010, "CPU"
        return 0.050, "CPU"

    monkeypatch.setattr(speed, "session_latency", fake_session_latency)
    monkeypatch.setattr(
        speed, "layer_latency", lambda *args, **kwargs: speed.LayerTiming(0.050, 0.0105, "CPU")
    )  # fmt: skip
    table = speed.LatencyTable(batch=1, device="cpu", opset=17)
    assert table.original(layer) == pytest.approx(0.040)
    assert table.chain(layer, "cp", (8,)) == pytest.approx(0.0005)
    monkeypatch.setattr(speed, "layer_latency", lambda *args, **kwargs: speed.LayerTiming(0.050, 0.005, "CPU"))
    assert table.chain(layer, "cp", (4,)) == speed.MIN_LAYER_MS  # below the baseline: the floor
    assert len(baselines) == 1 and baselines[0].graph.node[0].op_type == "Conv"  # depthwise 1x1: same layout
    assert baselines[0].graph.node[0].attribute[0].i == layer.input_shape[1] or any(
        a.name == "group" and a.i == layer.input_shape[1] for a in baselines[0].graph.node[0].attribute
    )


def test_auto_leaves_out_the_variants_and_a_variant_that_does_not_apply_gives_way_to_its_method():
    from onnx_dacomp.geometry import LayerGeometry
    from onnx_dacomp.methods import methods_for, realizations

    square = LayerGeometry(16, 16, 1, (3, 3), (8, 8), (8, 8), False)
    line = LayerGeometry(16, 16, 1, (3,), (8,), (8,), False)  # one kernel axis: both CP chains are the same nodes
    assert methods_for("auto", square) == ("svd", "tucker2", "cp")
    assert methods_for("cp-fused", square) == ("cp-fused",) and methods_for("cp-fused", line) == ("cp",)
    assert realizations("cp", square) == ("cp", "cp-fused") and realizations("cp-fused", square) == ("cp-fused", "cp")
    assert realizations("cp", line) == ("cp",) and realizations("tucker2", square) == ("tucker2",)
