"""Train the project's ConvNeXt-style CIFAR-10 network (models/dacomp_cifar_convnext.onnx) on the CPU: a model
whose pointwise layers export as MatMul (+ Add) on channels-last activations, as ConvNeXt, MLP-Mixer and
hybrid CNN/transformer exports do, so that dense-layer compression is tested on a real trained network.

    pip install torch==2.13.0   # only this script needs it; onnx-dacomp itself does not
    python3 tools/train_cifar_convnext.py --data /tmp/cifar/cifar10 --epochs 12 --threads 2 \\
        -o models/dacomp_cifar_convnext.onnx

Architecture: a 2x2/2 patchify stem (3 -> 64, 16x16), two ConvNeXt blocks (depthwise 5x5 conv, LayerNorm,
Linear 64 -> 256, GELU, Linear 256 -> 64, residual), a 2x2/2 downsampling conv to 128 channels (8x8), two
blocks at 128 (Linear 128 -> 512 -> 128), global average pool, LayerNorm, Linear 128 -> 10. The Linear layers
act on [N, H, W, C] tensors: 8 MatMul + Add pairs on 4-D activations and the 2-D classifier. Input and
training recipe as tools/train_cifar_cnn.py (RGB in [0, 1], normalization inside the graph; AdamW here).
"""

from __future__ import annotations

from train_cifar_cnn import MEAN, STD, train_and_export


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


def adamw(parameters):
    import torch

    return torch.optim.AdamW(parameters, lr=4e-3, weight_decay=0.05), 4e-3, 0.2


def main() -> None:
    train_and_export(build_model, adamw, 12, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
