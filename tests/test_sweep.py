"""`sweep`: one calibration, a model per ratio, each the model `compress` gives at that ratio; the Pareto
marks; the CSV, JSON and sensitivity exports; the CLI's files."""

import csv
import io
import json

import numpy as np
import onnx
import pytest
from builders import conv_stack

import onnx_dacomp
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.cli import main
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.errors import UserError
from onnx_dacomp.sweep import pareto_flags, sweep


def _images(count, seed=0, channels=3, size=(12, 12)):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, channels, size[0] // 3, size[1] // 3))
    smooth = base.repeat(3, axis=2).repeat(3, axis=3)
    return (smooth + 0.05 * rng.standard_normal((count, channels, *size)) + 0.3).astype(np.float32)


@pytest.fixture
def stack(tmp_path):
    model = conv_stack(channels=12, size=(12, 12), input_channels=3)
    data = tmp_path / "data.npz"
    np.savez(data, x=_images(160))
    return model, data


def test_every_point_is_the_model_compress_gives_at_that_ratio(stack):
    model, data = stack
    config = CompressConfig(holdout=32, method="auto", max_iter=5, benchmark=False)
    ratios = (0.6, 0.35)
    models = {}
    result = sweep(
        model, ArraySource(data, ["x"]), ratios, config, progress=False,
        on_model=lambda ratio, point: models.__setitem__(ratio, point.model),
    )  # fmt: skip
    assert [point.ratio for point in result.points] == sorted(ratios)
    for point in result.points:
        alone = onnx_dacomp.compress(model, ArraySource(data, ["x"]), config.replace(ratio=point.ratio), progress=False)
        assert alone.model.SerializeToString() == models[point.ratio].SerializeToString()
        assert alone.report.totals == point.report.totals
        assert alone.report.verification == point.report.verification
        assert [row.ranks for row in alone.report.layers] == [row.ranks for row in point.report.layers]
    smaller, larger = result.points
    assert smaller.report.totals["params_after"] < larger.report.totals["params_after"]
    assert smaller.report.verification.rel_output_error > larger.report.verification.rel_output_error


def test_sweep_takes_ratios_not_targets(stack):
    model, data = stack
    with pytest.raises(UserError, match="give --ratios instead"):
        sweep(model, ArraySource(data, ["x"]), (0.5,), CompressConfig(ratio=0.5), progress=False)
    with pytest.raises(UserError, match=r"in \(0, 1\]"):
        sweep(model, ArraySource(data, ["x"]), (0.5, 1.5), CompressConfig(), progress=False)


def test_pareto_points_are_those_no_other_beats_everywhere():
    def row(params, latency, top1):
        return {"model_params": params, "macs": params / 10, "latency_b1": latency, "top1": top1}

    rows = [
        row(100, 0.9, 0.80),  # the smallest
        row(200, 0.8, 0.85),  # the fastest
        row(250, 0.95, 0.84),  # larger, slower and less accurate than the second: dominated
        row(300, 1.0, 0.88),  # the most accurate
        row(300, 1.0, 0.88),  # a tie dominates nothing
    ]
    assert pareto_flags(rows) == [True, True, False, True, True]
    # without labels the output error decides, lower being better
    rows = [
        {"model_params": 1, "macs": 1, "rel_output_error": 0.2},
        {"model_params": 1, "macs": 1, "rel_output_error": 0.1},
    ]
    assert pareto_flags(rows) == [False, True]


def test_cli_sweep_writes_the_table_models_and_exports(stack, tmp_path):
    model, data = stack
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    files = {name: tmp_path / name for name in ("points.csv", "sweep.json", "sensitivity.csv")}
    code = main([
        "-q", "sweep", str(path), "--data", str(data), "--holdout", "32", "--ratios", "0.4,0.7", "--max-iter", "5",
        "--save-dir", str(tmp_path / "models"), "--csv", str(files["points.csv"]),
        "--report", str(files["sweep.json"]), "--sensitivity-csv", str(files["sensitivity.csv"]),
        "--rank-multiple", "16",  # not the machine's block: with 8 a pruned layer slices one more (conv5)
    ])  # fmt: skip
    assert code == 0 and path.read_bytes() == before
    report = json.loads(files["sweep.json"].read_text())
    rows = list(csv.DictReader(io.StringIO(files["points.csv"].read_text())))
    assert [float(row["ratio"]) for row in rows] == [0.4, 0.7] == [point["ratio"] for point in report["points"]]
    for row, point in zip(rows, report["points"]):
        saved = onnx.load(tmp_path / "models" / f"model-params{point['ratio']:.2f}.onnx")
        params = sum(int(np.prod(init.dims)) for init in saved.graph.initializer)
        assert params == point["model_params"] == int(row["model_params"]) == point["report"]["model"]["params_after"]
        assert float(row["rel_output_error"]) == point["rel_output_error"]
        assert point["latency_b1"] == point["report"]["latency"][0]["ratio"]  # the closing measurement, batch 1
    # the sensitivity export: every candidate of every fitted layer, the added error = sensitivity x its error
    sensitivity = list(csv.DictReader(io.StringIO(files["sensitivity.csv"].read_text())))
    layers = {layer["name"]: layer for layer in report["points"][0]["report"]["layers"]}
    assert {row["layer"] for row in sensitivity} == set(layers)
    for row in sensitivity:
        # the report's row has the sensitivity of the option chosen: pruned (a probe of it pruned) or not
        if (row["method"] == "prune") == (layers[row["layer"]]["method"] == "prune"):
            assert float(row["sensitivity"]) == pytest.approx(layers[row["layer"]]["sensitivity"])
        assert float(row["added_output_error"]) == pytest.approx(
            float(row["sensitivity"]) * float(row["estimated_layer_error"])
        )
        assert int(row["params"]) < int(row["params_before"]) or int(row["macs"]) < int(row["macs_before"])
    # a layer's candidates of one method: more parameters, less estimated error
    compared = 0
    for name in layers:
        methods = {row["method"] for row in sensitivity if row["layer"] == name}
        for method in methods:
            candidates = [row for row in sensitivity if row["layer"] == name and row["method"] == method]
            candidates.sort(key=lambda row: int(row["params"]))
            errors = [float(row["estimated_layer_error"]) for row in candidates]
            if len(errors) > 1:
                assert errors[0] > errors[-1], (name, method)
                compared += 1
    assert compared >= len(layers)


def test_a_sweep_that_fails_midway_leaves_no_models(stack, tmp_path, monkeypatch):
    from onnx_dacomp.errors import UserError
    from onnx_dacomp.job import CompressionJob

    model, data = stack
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    real, calls = CompressionJob.result, []

    def failing(self, ratio, search=None):
        calls.append(ratio)
        if len(calls) == 2:
            raise UserError("the second point fails")
        return real(self, ratio, search)

    monkeypatch.setattr(CompressionJob, "result", failing)
    saved = tmp_path / "models"
    args = ["-q", "sweep", str(path), "--data", str(data), "--holdout", "32", "--ratios", "0.4,0.7", "--max-iter", "5",
            "--no-benchmark", "--save-dir", str(saved)]  # fmt: skip
    assert main(args) == 2 and calls == [0.4, 0.7]
    assert not saved.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "model.onnx"]
