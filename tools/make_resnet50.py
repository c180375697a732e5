"""A ResNet-50-shaped ONNX model for speed and memory measurements (not for accuracy: its weights are random).

    python3 tools/make_resnet50.py [-o resnet50.onnx] [--seed 0]

ResNet-50 topology (He et al. 2016, torchvision layout): 7x7/2 stem, 3x3/2 max pool, bottleneck stages of
[3, 4, 6, 3] blocks (widths 64, 128, 256, 512, expansion 4, stride on the 3x3 conv), global average pool,
a 2048 -> 1000 Gemm: 53 Conv nodes (BatchNorm folded into their biases), 25.6 M parameters, 4.1 GMAC per
224x224 image. Input `input` float32 [N, 3, 224, 224], output `logits` [N, 1000]. Weights are seeded
He-normal; the last conv of each residual branch is scaled by 0.2 so activations stay finite through the
16 blocks (as zero-initialised residual branches do in training recipes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # width, blocks, stride of the first block
EXPANSION = 4
RESIDUAL_SCALE = 0.2


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []

    def conv(x: str, name: str, out_channels: int, in_channels: int, kernel: int, stride: int, scale: float = 1.0):
        weight = rng.standard_normal((out_channels, in_channels, kernel, kernel)) * np.sqrt(
            2.0 / (in_channels * kernel * kernel)
        )
        bias = 0.01 * rng.standard_normal(out_channels)
        initializers.append(numpy_helper.from_array((scale * weight).astype(np.float32), f"{name}.weight"))
        initializers.append(numpy_helper.from_array(bias.astype(np.float32), f"{name}.bias"))
        pad = kernel // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [f"{name}.out"],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        return f"{name}.out"

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"]))
        return f"{x}.relu"

    x = relu(conv("input", "conv1", 64, 3, 7, 2))
    nodes.append(helper.make_node("MaxPool", [x], ["pool1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, channels = "pool1", 64
    for stage, (width, blocks, first_stride) in enumerate(STAGES, start=1):
        for block in range(blocks):
            stride = first_stride if block == 0 else 1
            prefix = f"layer{stage}.{block}"
            branch = relu(conv(x, f"{prefix}.conv1", width, channels, 1, 1))
            branch = relu(conv(branch, f"{prefix}.conv2", width, width, 3, stride))
            branch = conv(branch, f"{prefix}.conv3", width * EXPANSION, width, 1, 1, RESIDUAL_SCALE)
            shortcut = x
            if block == 0:
                shortcut = conv(x, f"{prefix}.downsample", width * EXPANSION, channels, 1, stride)
            nodes.append(helper.make_node("Add", [branch, shortcut], [f"{prefix}.sum"]))
            x, channels = relu(f"{prefix}.sum"), width * EXPANSION
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], axis=1))
    fc = rng.standard_normal((1000, channels)) * np.sqrt(1.0 / channels)
    initializers.append(numpy_helper.from_array(fc.astype(np.float32), "fc.weight"))
    initializers.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes,
        "resnet50_shaped",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.doc_string = f"ResNet-50-shaped, seeded He-normal weights (seed {seed}); tools/make_resnet50.py"
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("resnet50_shaped.onnx"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    onnx.save(build(args.seed), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
