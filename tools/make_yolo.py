"""A YOLO-style detector (YOLOv8n-shaped) with seeded weights, for benchmarks of vendor-like models.

    python3 tools/make_yolo.py [-o yolo.onnx] [--size 320]

Backbone of strided 3x3 convs and C2f blocks (a 1x1 conv split in two halves, bottlenecks of two 3x3 convs
with a residual on the second half, all halves concatenated and mixed by a 1x1 conv), an SPPF block (three
chained 5x5 max-pools), a PAN neck (upsampling, concatenation, C2f) and three detection heads (strides 8, 16,
32), each with a box branch (64 channels: 4 sides x 16 bins) and a class branch (80 classes). Every conv is
followed by SiLU written as Sigmoid and Mul, as exporters write it; batch norms are folded into conv biases.
Output `output0 [N, 144, H/8*W/8 + H/16*W/16 + H/32*W/32]` (2,100 anchors at 320x320). The weights are seeded
random (He-scaled), not trained: the model is for timing and for output-error measurements.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTHS = (16, 32, 64, 128, 256)  # YOLOv8n
CLASSES, BOX_BINS = 80, 16


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"/{stem}_{self.count}"

    def const(self, value, dtype=np.float32) -> str:
        name = self.name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], stem: str, outputs: int = 1, **attrs) -> list[str]:
        base = self.name(stem)
        names = [f"{base}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=f"{base}/{op}", **attrs))
        return names

    def conv(self, x: str, fan_in: int, fan_out: int, kernel: int = 1, stride: int = 1, act: bool = True) -> str:
        gain = 1.6 if act else 1.0  # SiLU halves the variance, roughly
        weight = self.rng.standard_normal((fan_out, fan_in, kernel, kernel)) * gain / np.sqrt(fan_in * kernel**2)
        bias = 0.1 * self.rng.standard_normal(fan_out)
        pad = kernel // 2
        (y,) = self.node("Conv", [x, self.const(weight), self.const(bias)], "conv", kernel_shape=[kernel] * 2,
                         strides=[stride] * 2, pads=[pad] * 4)  # fmt: skip
        if not act:
            return y
        (gate,) = self.node("Sigmoid", [y], "act")
        return self.node("Mul", [y, gate], "act")[0]

    def c2f(self, x: str, fan_in: int, fan_out: int, blocks: int, shortcut: bool = True) -> str:
        half = fan_out // 2
        y = self.conv(x, fan_in, 2 * half)
        parts = self.node("Split", [y, self.const([half, half], np.int64)], "split", outputs=2, axis=1)
        current = parts[1]
        for _ in range(blocks):
            inner = self.conv(self.conv(current, half, half, 3), half, half, 3)
            current = self.node("Add", [current, inner], "residual")[0] if shortcut else inner
            parts.append(current)
        joined = self.node("Concat", parts, "concat", axis=1)[0]
        return self.conv(joined, (2 + blocks) * half, fan_out)

    def sppf(self, x: str, channels: int) -> str:
        half = channels // 2
        pooled = [self.conv(x, channels, half)]
        for _ in range(3):
            pooled.append(self.node("MaxPool", [pooled[-1]], "pool", kernel_shape=[5, 5], pads=[2] * 4)[0])
        return self.conv(self.node("Concat", pooled, "concat", axis=1)[0], 4 * half, channels)

    def upsample(self, x: str) -> str:
        scales = self.const([1.0, 1.0, 2.0, 2.0])
        return self.node("Resize", [x, "", scales], "upsample", mode="nearest")[0]


def build(size: int = 320, seed: int = 0) -> onnx.ModelProto:
    b = _Builder(seed)
    w = WIDTHS
    x = b.conv("images", 3, w[0], 3, 2)
    x = b.conv(x, w[0], w[1], 3, 2)
    x = b.c2f(x, w[1], w[1], 1)
    x = b.conv(x, w[1], w[2], 3, 2)
    p3 = b.c2f(x, w[2], w[2], 2)
    x = b.conv(p3, w[2], w[3], 3, 2)
    p4 = b.c2f(x, w[3], w[3], 2)
    x = b.conv(p4, w[3], w[4], 3, 2)
    x = b.c2f(x, w[4], w[4], 1)
    p5 = b.sppf(x, w[4])
    # neck (PAN): top-down, then bottom-up
    up = b.node("Concat", [b.upsample(p5), p4], "concat", axis=1)[0]
    n4 = b.c2f(up, w[4] + w[3], w[3], 1, shortcut=False)
    up = b.node("Concat", [b.upsample(n4), p3], "concat", axis=1)[0]
    out3 = b.c2f(up, w[3] + w[2], w[2], 1, shortcut=False)
    down = b.node("Concat", [b.conv(out3, w[2], w[2], 3, 2), n4], "concat", axis=1)[0]
    out4 = b.c2f(down, w[2] + w[3], w[3], 1, shortcut=False)
    down = b.node("Concat", [b.conv(out4, w[3], w[3], 3, 2), p5], "concat", axis=1)[0]
    out5 = b.c2f(down, w[3] + w[4], w[4], 1, shortcut=False)
    # detection heads: box and class branches per level, flattened over positions and concatenated
    box_width, class_width = max(16, w[2] // 4, 4 * BOX_BINS), max(w[2], min(CLASSES, 100))
    flat = []
    for level, channels in zip((out3, out4, out5), (w[2], w[3], w[4])):
        box = b.conv(b.conv(b.conv(level, channels, box_width, 3), box_width, box_width, 3), box_width, 4 * BOX_BINS,
                     act=False)  # fmt: skip
        cls = b.conv(b.conv(b.conv(level, channels, class_width, 3), class_width, class_width, 3), class_width,
                     CLASSES, act=False)  # fmt: skip
        joined = b.node("Concat", [box, cls], "concat", axis=1)[0]
        shape = b.const([0, 4 * BOX_BINS + CLASSES, -1], np.int64)
        flat.append(b.node("Reshape", [joined, shape], "flatten")[0])
    b.nodes.append(helper.make_node("Concat", flat, ["output0"], name="/detect/Concat", axis=2))
    graph = helper.make_graph(
        b.nodes, "yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 * BOX_BINS + CLASSES, None])],
        b.inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.doc_string = f"a YOLOv8n-shaped detector, {size}x{size}, seeded weights (tools/make_yolo.py)"
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("yolo.onnx"))
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    onnx.save(build(args.size, args.seed), str(args.output))


if __name__ == "__main__":
    main()
