"""Models that do not take one image tensor: several inputs with their batch on other axes, scalars given
once, `-1` batch dims, fixed batches; and the errors that name the input and what to pass."""

import numpy as np
import onnx
import pytest
from builders import IR_VERSION, conv_stack, relative_error, run
from onnx import TensorProto, helper, numpy_helper

import onnx_dacomp
from onnx_dacomp.cli import main
from onnx_dacomp.errors import UserError
from onnx_dacomp.inputs import input_signature

T = 64  # samples per sequence


def voice_activity_model(seed=0) -> onnx.ModelProto:
    """The signature of a voice-activity detector: `input [B, T]`, `state [2, B, 128]` (batch on axis 1),
    a scalar int64 `sr`; 1-D convolutions over the signal, gated by the state and scaled by the rate."""
    rng = np.random.default_rng(seed)
    weights = {
        "w0": rng.standard_normal((16, 1, 5)) * 0.5,
        "w1": rng.standard_normal((24, 16, 3)) * 0.25,
        "w2": rng.standard_normal((24, 24, 3)) * 0.2,
        "b2": rng.standard_normal(24) * 0.1,
    }
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    initializers.append(numpy_helper.from_array(np.array([0, 2], np.int64), "state_axes"))
    initializers.append(numpy_helper.from_array(np.array([1, 2], np.int64), "gate_axes"))
    initializers.append(numpy_helper.from_array(np.array(1 / 16000, np.float32), "per_hertz"))
    nodes = [
        helper.make_node("Unsqueeze", ["input", "axis1"], ["signal"]),  # [B, 1, T]
        helper.make_node("Conv", ["signal", "w0"], ["c0"], name="conv0", pads=[2, 2]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[2, 2], dilations=[2]),
        helper.make_node("ReduceMean", ["state", "state_axes"], ["gate"], keepdims=0),  # [B]
        helper.make_node("Unsqueeze", ["gate", "gate_axes"], ["gate3"]),  # [B, 1, 1]
        helper.make_node("Cast", ["sr"], ["rate"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["rate", "per_hertz"], ["scale"]),
        helper.make_node("Add", ["c2", "gate3"], ["gated"]),
        helper.make_node("Mul", ["gated", "scale"], ["output"]),
        helper.make_node("Identity", ["state"], ["state_out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", 128]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 24, "T"]),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "B", 128]),
        ],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)


def _signals(count, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(T) / 16000
    tones = np.sin(2 * np.pi * rng.uniform(200, 2000, (count, 1)) * t) + 0.1 * rng.standard_normal((count, T))
    return tones.astype(np.float32)


def _vad_data(tmp_path, count=96):
    path = tmp_path / "vad.npz"
    state = np.random.default_rng(1).standard_normal((2, count, 128)).astype(np.float32)
    np.savez(path, input=_signals(count), state=state, sr=np.array(16000, np.int64))
    return path


def test_batch_axes_come_from_the_models_dims():
    signature = input_signature(voice_activity_model(), {"input": (-1, T)})
    assert [(s.name, s.batch_axis) for s in signature.specs] == [("input", 0), ("state", 1), ("sr", None)]
    assert signature.spec("input").dims == (None, T)
    assert input_signature(voice_activity_model(), batch_axes={"state": None}).spec("state").batch_axis is None
    fixed = conv_stack()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert input_signature(fixed).fixed_batch == 1 and input_signature(fixed).spec("x").batch_axis == 0


def test_voice_activity_model_compresses_from_npz_on_the_cli(tmp_path, capsys):
    model_path, out = tmp_path / "vad.onnx", tmp_path / "small.onnx"
    onnx.save(voice_activity_model(), model_path)
    data = _vad_data(tmp_path)
    argv = ["compress", str(model_path), "-o", str(out), "--data", str(data), "--input-shape", f"input:-1x{T}"]
    assert main([*argv, "--ratio", "0.8", "--holdout", "16"]) == 0, capsys.readouterr().err
    compressed = onnx.load(out)

    def params(model):
        return sum(int(np.prod(init.dims)) for init in model.graph.initializer)

    assert params(compressed) < 0.9 * params(voice_activity_model())  # chains or pruned layers replaced layers
    feeds = {"input": _signals(5, seed=9), "state": np.ones((2, 5, 128), np.float32), "sr": np.array(16000, np.int64)}
    reference, state = run(voice_activity_model(), feeds)
    output, state_out = run(compressed, feeds)
    assert np.array_equal(state, state_out) and relative_error(output, reference) < 0.35


def test_stft_voice_model_with_lstm_state_compresses_in_seconds(tmp_path, capsys):
    """The Silero-shaped model of tools/make_voice_model.py (an STFT conv of 256 taps at stride 128, 1-D convs,
    an LSTM over the state): its statistics graph took minutes to load; now the whole run takes seconds."""
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import make_voice_model

    model_path, data, out = tmp_path / "voice.onnx", tmp_path / "voice.npz", tmp_path / "small.onnx"
    onnx.save(make_voice_model.build(), model_path)
    np.savez(data, **make_voice_model.calibration_data(160))
    start = time.perf_counter()
    assert main(["compress", str(model_path), "-o", str(out), "--data", str(data), "--ratio", "0.75"]) == 0
    assert time.perf_counter() - start < 60
    err = capsys.readouterr().err
    assert "patch sums in graph" in err and "stft" in err
    feeds = make_voice_model.calibration_data(32, seed=7)
    reference, compressed = run(onnx.load(model_path), feeds), run(onnx.load(out), feeds)
    assert relative_error(compressed[0], reference[0]) < 0.2


def test_voice_activity_model_compresses_from_python_at_full_rank_exactly(tmp_path):
    model = voice_activity_model()
    ranks = {"conv1": [24, 16], "conv2": [24, 24]}
    result = onnx_dacomp.compress(
        model, str(_vad_data(tmp_path)), ratio=None, ranks=ranks, input_shapes={"input": (-1, T)}, holdout=8,
        progress=False,
    )  # fmt: skip
    feeds = {"input": _signals(4, seed=3), "state": np.zeros((2, 4, 128), np.float32), "sr": np.array(8000, np.int64)}
    assert relative_error(run(result.model, feeds)[0], run(model, feeds)[0]) < 1e-5
    assert result.report.verification.samples == 8


def test_a_minus_one_batch_dim_is_dynamic(tmp_path, capsys):
    model = conv_stack(channels=8, size=(12, 12), input_channels=3)
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # as Paddle exports write it
    model_path, out = tmp_path / "paddle.onnx", tmp_path / "small.onnx"
    onnx.save(model, model_path)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((40, 3, 12, 12)).astype(np.float32))
    base = ["compress", str(model_path), "-o", str(out), "--data", str(data), "--holdout", "8"]
    assert main(base) == 0, capsys.readouterr().err
    assert main([*base, "--input-shape", "x:1x3x12x12"]) == 0
    assert main([*base, "--input-shape", "x:-1x3x12x12"]) == 0


def test_input_errors_name_the_input_and_what_to_pass(tmp_path):
    model = voice_activity_model()
    with pytest.raises(UserError, match=r"--input-shape input:NxD1"):
        onnx_dacomp.compress(model, str(_vad_data(tmp_path)), progress=False)  # T is dynamic
    with pytest.raises(UserError, match=r"--input-shape input: 3 dims given, the model declares 2"):
        input_signature(model, {"input": (1, 3, T)})
    with pytest.raises(UserError, match=r"the model's inputs are \['input', 'sr', 'state'\]"):
        input_signature(model, {"audio": (1, T)})
    signature = input_signature(model, {"input": (-1, T)})
    good = {"input": _signals(4), "state": np.zeros((2, 4, 128), np.float32), "sr": np.array(16000)}
    assert signature.length(signature.check(good, 0)) == 4
    with pytest.raises(UserError, match=r"batch axes must hold the same number of samples, got input 4, state 3"):
        signature.check({**good, "state": np.zeros((2, 3, 128), np.float32)}, 0)
    with pytest.raises(UserError, match=r"input 'state' in batch 0: shape \[4, 2, 128\] .*batch on axis 1"):
        signature.check({**good, "state": np.zeros((4, 2, 128), np.float32)}, 0)
