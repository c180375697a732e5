"""Train the project's ConvNeXt-style CIFAR-10 network (models/dacomp_cifar_convnext.onnx) on the CPU: a model
whose pointwise layers export as MatMul (+ Add) on channels-last activations, as ConvNeXt, MLP-Mixer and
hybrid CNN/transformer exports do, so that dense-layer compression is tested on a real trained network.

    pip install torch==2.13.0   # only this script needs it; onnx-dacomp itself does not
    python3 tools/train_cifar_convnext.py --data /tmp/cifar/cifar10 --epochs 6 --threads 1 \\
        -o models/dacomp_cifar_convnext.onnx

Architecture: a 2x2/2 patchify stem (3 -> 64, 16x16), two ConvNeXt blocks (depthwise 5x5 conv, LayerNorm,
Linear 64 -> 256, GELU, Linear 256 -> 64, residual), a 2x2/2 downsampling conv to 128 channels (8x8), two
blocks at 128 (Linear 128 -> 512 -> 128), global average pool, LayerNorm, Linear 128 -> 10. The Linear layers
act on [N, H, W, C] tensors: 8 MatMul + Add pairs on 4-D activations and the 2-D classifier. Input and
training recipe as tools/train_cifar_cnn.py (RGB in [0, 1], normalization inside the graph; AdamW here).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from train_cifar_cnn import MEAN, STD, evaluate, load_split


def build_model():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.depthwise = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
            self.norm = nn.LayerNorm(channels)
            self.expand = nn.Linear(channels, 4 * channels)
            self.project = nn.Linear(4 * channels, channels)

        def forward(self, x):
            y = self.depthwise(x).permute(0, 2, 3, 1)  # channels last: the Linear layers export as MatMul
            y = self.project(nn.functional.gelu(self.expand(self.norm(y))))
            return x + y.permute(0, 3, 1, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
            self.stem = nn.Conv2d(3, 64, 2, stride=2)
            self.stage1 = nn.Sequential(Block(64), Block(64))
            self.down = nn.Conv2d(64, 128, 2, stride=2)
            self.stage2 = nn.Sequential(Block(128), Block(128))
            self.norm = nn.LayerNorm(128)
            self.classifier = nn.Linear(128, 10)

        def forward(self, x):
            x = self.stage2(self.down(self.stage1(self.stem((x - self.mean) / self.std))))
            return self.classifier(self.norm(x.mean(dim=(2, 3))))

    return Net()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="folder with train/ and test/")
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    train_x, train_y = load_split(args.data / "train")
    test_x, test_y = load_split(args.data / "test")
    print(f"loaded {len(train_x)} train / {len(test_x)} test images", flush=True)

    def tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)

    model = build_model()
    steps = args.epochs * (len(train_x) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps, pct_start=0.2)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train_x))
        for step in range(len(train_x) // args.batch_size):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            padded = np.pad(train_x[index], ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
            dy, dx = rng.integers(0, 9, 2)
            images = padded[:, dy : dy + 32, dx : dx + 32]
            flip = rng.random(len(images)) < 0.5
            images[flip] = images[flip, :, ::-1]
            loss = F.cross_entropy(model(tensor(images)), torch.from_numpy(train_y[index]), label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = evaluate(model, tensor, test_x, test_y)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test top-1 {accuracy:.2%}, {time.time() - start:.0f} s")

    model.eval()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        torch.zeros(1, 3, 32, 32),
        str(args.output),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    print(f"wrote {args.output}; test top-1 {evaluate(model, tensor, test_x, test_y):.2%}", flush=True)


if __name__ == "__main__":
    main()
