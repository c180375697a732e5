"""Loading refuses unusable files with one-line errors; saving is atomic, checked, and never hits the input."""

import os

import numpy as np
import onnx
import pytest
from builders import conv_model, run
from onnx import helper

from onnx_dacomp.cli import main
from onnx_dacomp.errors import UserError
from onnx_dacomp.load import load_model
from onnx_dacomp.save import save_model


@pytest.fixture
def small_model():
    return conv_model(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)), np.zeros(4), input_shape=(1, 3, 8, 8), pads=[1, 1, 1, 1]
    )


def _cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("onnx-dacomp: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_load_errors_are_one_line(tmp_path, capsys, small_model):
    assert "not found" in _cli_error(capsys, ["inspect", str(tmp_path / "missing.onnx")])
    assert "is a directory" in _cli_error(capsys, ["inspect", str(tmp_path)])

    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    assert "not a valid ONNX model" in _cli_error(capsys, ["inspect", str(text)])

    whole = tmp_path / "whole.onnx"
    onnx.save_model(small_model, str(whole))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert "not a valid ONNX model" in _cli_error(capsys, ["inspect", str(truncated)])

    old = tmp_path / "old.onnx"
    model = conv_model(np.ones((2, 3, 1, 1)), input_shape=(1, 3, 4, 4), opset=9)
    onnx.save_model(model, str(old))
    assert "opset 9" in _cli_error(capsys, ["inspect", str(old)])

    no_conv = tmp_path / "relu.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", 1, [1])],
        [helper.make_tensor_value_info("y", 1, [1])],
    )
    onnx.save_model(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), str(no_conv))
    assert "no Conv" in _cli_error(capsys, ["inspect", str(no_conv)])

    assert "bad --input-shape" in _cli_error(capsys, ["inspect", str(whole), "--input-shape", "x:1xax3"])


def test_external_data_round_trip_and_missing_file(tmp_path, small_model):
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        onnx.ModelProto.FromString(small_model.SerializeToString()),
        str(path),
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    loaded = load_model(path)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(loaded, {"x": x})[0], run(small_model, {"x": x})[0])
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(UserError, match="external data file 'ext.onnx.data'.*missing"):
        load_model(path)


def test_save_is_checked_atomic_and_protects_input(tmp_path, small_model):
    source = tmp_path / "in.onnx"
    onnx.save_model(small_model, str(source))
    before = source.read_bytes()
    with pytest.raises(UserError, match="is the input model"):
        save_model(small_model, tmp_path / "." / "in.onnx", protect=source)
    assert source.read_bytes() == before

    target = tmp_path / "out.onnx"
    target.write_bytes(b"old content")
    save_model(small_model, target, protect=source)
    assert onnx.load(str(target)).graph == small_model.graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]  # no staging leftovers

    with pytest.raises(UserError, match="does not exist"):
        save_model(small_model, tmp_path / "nowhere" / "out.onnx")
    with pytest.raises(UserError, match="is a directory"):
        save_model(small_model, tmp_path)


def test_save_switches_to_external_data_over_the_limit(tmp_path, small_model):
    # the 2 GB limit is simulated by a small threshold; the logic is the same
    snapshot = small_model.SerializeToString()
    path = save_model(small_model, tmp_path / "big.onnx", external_data_threshold=100)
    assert small_model.SerializeToString() == snapshot  # the caller's model is untouched
    assert (tmp_path / "big.onnx.data").is_file()
    raw = onnx.load(str(path), load_external_data=False)
    assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in raw.graph.initializer)
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(run(load_model(path), {"x": x})[0], run(small_model, {"x": x})[0])


def test_unwritable_folder(tmp_path, small_model, monkeypatch):
    # root ignores permission bits, so the refusal the OS would give is injected where it would occur
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    with pytest.raises(UserError, match="cannot write to output folder .*Permission denied"):
        save_model(small_model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []
