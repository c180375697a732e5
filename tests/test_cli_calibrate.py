"""`onnx-dacomp calibrate`: writes a statistics file; bad input gives one line, exit 2, no file."""

import numpy as np
import onnx
import pytest
from builders import conv_model, conv_stack
from test_calibrate import _write_images

from onnx_dacomp.calibration.statistics import load_statistics
from onnx_dacomp.cli import main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "stack.onnx"
    onnx.save_model(conv_stack(channels=4, size=(9, 11)), str(path))
    return path


def _error(capsys, argv, output):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("onnx-dacomp: error: "), err
    assert not output.exists()
    if output.parent.exists():
        assert not any(p.name.startswith(".") for p in output.parent.iterdir())  # no staging leftovers
    return err[0]


def test_calibrate_writes_statistics(tmp_path, model_path):
    data = np.random.default_rng(0).standard_normal((10, 4, 9, 11)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=data)
    out = tmp_path / "stats.npz"
    assert (
        main(
            [
                "-q",
                "calibrate",
                str(model_path),
                "--data",
                str(tmp_path / "data.npz"),
                "-o",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    stats = load_statistics(out)
    assert stats.samples == 10 and len(stats.layers) == 6 and "data.npz" in stats.source


def test_calibrate_on_images_and_random(tmp_path, model_path):
    _write_images(tmp_path / "images" / "a", 3, size=(12, 14))
    rgb_model = tmp_path / "rgb.onnx"
    onnx.save_model(conv_stack(channels=4, input_channels=3), str(rgb_model))
    out = tmp_path / "stats.npz"
    assert (
        main(["-q", "calibrate", str(rgb_model), "--data", str(tmp_path / "images"), "-o", str(out), "--size", "9x11"])
        == 0
    )
    assert load_statistics(out).samples == 3
    assert (
        main(
            [
                "calibrate",
                str(model_path),
                "--data",
                "random",
                "--input-shape",
                "x:1x4x9x11",
                "-o",
                str(out),
                "--limit",
                "8",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    assert load_statistics(out).samples == 8


def test_calibrate_errors(tmp_path, capsys):
    model_path = tmp_path / "rgb.onnx"
    onnx.save_model(conv_stack(channels=4, input_channels=3), str(model_path))
    out = tmp_path / "stats.npz"
    base = ["calibrate", str(model_path), "-o", str(out)]
    assert "data not found: " in _error(capsys, base + ["--data", str(tmp_path / "nothing")], out)
    (tmp_path / "empty").mkdir()
    assert "no images" in _error(capsys, base + ["--data", str(tmp_path / "empty")], out)
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 5, 9, 11), np.float32))
    assert "shape [2, 5, 9, 11]" in _error(capsys, base + ["--data", str(tmp_path / "wrong.npz")], out)
    np.savez(tmp_path / "names.npz", a=np.zeros((2, 3, 9, 11), np.float32), b=np.zeros((2, 3, 9, 11), np.float32))
    assert "key the arrays by input name" in _error(capsys, base + ["--data", str(tmp_path / "names.npz")], out)
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save_model(conv_model(np.ones((2, 3, 3, 3)), input_shape=("n", 3, "h", "w")), str(dynamic))
    assert "needs fixed input dims" in _error(
        capsys, ["calibrate", str(dynamic), "-o", str(out), "--data", "random"], out
    )
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "bad.png").write_bytes(b"not a png")
    assert "cannot read image" in _error(capsys, base + ["--data", str(tmp_path / "pics")], out)
    assert "image folders feed 1 or 3 channels" in _error(
        capsys, base + ["--data", str(tmp_path / "pics"), "--nhwc"], out
    )
    missing_folder = tmp_path / "no" / "stats.npz"
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 3, 9, 11), np.float32))
    assert "does not exist" in _error(
        capsys,
        ["calibrate", str(model_path), "-o", str(missing_folder), "--data", str(tmp_path / "ok.npz")],
        missing_folder,
    )
