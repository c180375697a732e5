"""A stateful voice-activity detector shaped like the ones audio pipelines ship (Silero-VAD style).

    python3 tools/make_voice_model.py [-o voice.onnx] [--data voice.npz --samples 256]

Inputs `input [B, T]` (T = 512 samples of 16 kHz audio), `state [2, B, 128]` (the recurrent state, stored
along its batch axis 1) and a scalar `sr` (the sample rate); outputs the speech probability `output [B, 1]`
and the new state `stateN [2, B, 128]`. The front end is an STFT as a strided 1-D conv: the input is
reflect-padded, convolved with 258 windowed Fourier kernels of length 256 at stride 128 (the real and the
imaginary parts of 129 frequencies) and turned into magnitudes; then four small 1-D convs, an LSTM step
over the state, and a 1x1 conv with a sigmoid. Weights are seeded; the Fourier kernels are the real ones.
`--data` writes calibration data as an `.npz`: band-limited noise bursts of random loudness and a state
from running the model over a few previous frames.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FRAME = 512
WINDOW, HOP, FREQUENCIES = 256, 128, 129
HIDDEN = 128
ENCODER = [(FREQUENCIES, 128, 1), (128, 64, 2), (64, 64, 2), (64, 128, 1)]  # (in, out, stride), kernel 3


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name: str, value, dtype=np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    # the sample rate scales nothing at 16 kHz but is a real (scalar, batch-less) input of the graph
    rate = node("Div", [node("Cast", ["sr"], "sr_float", to=TensorProto.FLOAT), const("rate_16k", 16000.0)], "rate")
    audio = node("Mul", ["input", rate], "audio")
    audio = node("Unsqueeze", [audio, const("axis_1", [1], np.int64)], "audio_channel")
    pads = const("reflect_pads", [0, 0, HOP // 2, 0, 0, HOP // 2], np.int64)
    audio = node("Pad", [audio, pads], "audio_padded", mode="reflect")
    time = np.arange(WINDOW)
    window = np.hanning(WINDOW + 1)[:-1]
    angles = 2 * np.pi * np.outer(np.arange(FREQUENCIES), time) / WINDOW
    basis = np.concatenate([np.cos(angles) * window, -np.sin(angles) * window])[:, None, :]
    spectrum = node("Conv", [audio, const("stft_basis", basis)], "stft", kernel_shape=[WINDOW], strides=[HOP])
    real = node("Slice", [spectrum, const("re_start", [0], np.int64), const("re_end", [FREQUENCIES], np.int64),
                          const("ch_axis", [1], np.int64)], "real")  # fmt: skip
    imag = node("Slice", [spectrum, const("im_start", [FREQUENCIES], np.int64),
                          const("im_end", [2 * FREQUENCIES], np.int64), "ch_axis"], "imag")  # fmt: skip
    power = node("Add", [node("Mul", [real, real], "real2"), node("Mul", [imag, imag], "imag2")], "power")
    current = node("Sqrt", [node("Add", [power, const("eps", 1e-6)], "power_eps")], "magnitude")
    for index, (fan_in, fan_out, stride) in enumerate(ENCODER):
        weight = rng.standard_normal((fan_out, fan_in, 3)) * np.sqrt(2 / (3 * fan_in))
        bias = 0.05 * rng.standard_normal(fan_out)
        conv = node("Conv", [current, const(f"enc{index}_w", weight), const(f"enc{index}_b", bias)], f"enc{index}",
                    kernel_shape=[3], strides=[stride], pads=[1, 1])  # fmt: skip
        current = node("Relu", [conv], f"enc{index}_relu")
    features = node("Squeeze", [current, const("axis_2", [2], np.int64)], "features")  # [B, 128]
    sequence = node("Unsqueeze", [features, const("axis_0", [0], np.int64)], "sequence")  # [1, B, 128]
    split = const("split_state", [1, 1], np.int64)
    nodes.append(helper.make_node("Split", ["state", split], ["h0", "c0"], name="state_split", axis=0))
    scale = 1 / np.sqrt(HIDDEN)
    nodes.append(helper.make_node(
        "LSTM",
        [sequence, const("lstm_w", rng.uniform(-scale, scale, (1, 4 * HIDDEN, HIDDEN))),
         const("lstm_r", rng.uniform(-scale, scale, (1, 4 * HIDDEN, HIDDEN))),
         const("lstm_b", rng.uniform(-scale, scale, (1, 8 * HIDDEN))), "", "h0", "c0"],
        ["", "h1", "c1"], name="lstm", hidden_size=HIDDEN,
    ))  # fmt: skip
    node("Concat", ["h1", "c1"], "stateN", axis=0)
    hidden = node("Relu", [node("Squeeze", ["h1", "axis_0"], "h1_flat")], "decoder_relu")
    hidden = node("Unsqueeze", [hidden, "axis_2"], "decoder_in")  # [B, 128, 1]
    logit = node("Conv", [hidden, const("dec_w", rng.standard_normal((1, HIDDEN, 1)) * scale),
                          const("dec_b", [0.0])], "decoder", kernel_shape=[1])  # fmt: skip
    node("Squeeze", [node("Sigmoid", [logit], "probability")], "output")
    nodes[-1].input.append("axis_2")
    graph = helper.make_graph(
        nodes,
        "voice_activity",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", FRAME]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", HIDDEN]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", HIDDEN]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.doc_string = "a Silero-VAD-shaped stateful voice-activity model (tools/make_voice_model.py)"
    onnx.checker.check_model(model)
    return model


def calibration_data(samples: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Frames of band-limited noise bursts at random loudness, and zero states (a stream's first frame)
    perturbed the way running states are: `{input [N, 512], state [2, N, 128], sr}`."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((samples, FRAME))
    spectrum = np.fft.rfft(noise, axis=1)
    low = rng.uniform(0, 0.3, (samples, 1))
    band = np.linspace(0, 1, spectrum.shape[1])[None, :]
    spectrum *= (band > low) & (band < low + rng.uniform(0.05, 0.5, (samples, 1)))
    audio = np.fft.irfft(spectrum, FRAME, axis=1) * rng.uniform(0.01, 1.0, (samples, 1)) * 10
    state = np.tanh(0.3 * rng.standard_normal((2, samples, HIDDEN)))
    return {"input": audio.astype(np.float32), "state": state.astype(np.float32), "sr": np.array(16000, np.int64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("voice.onnx"))
    parser.add_argument("--data", type=Path, help="also write calibration data (.npz)")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    onnx.save(build(), str(args.output))
    if args.data:
        np.savez(args.data, **calibration_data(args.samples))


if __name__ == "__main__":
    main()
