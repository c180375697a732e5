"""Train the project's own small CIFAR-10 CNN (models/dacomp_cifar_cnn.onnx) on the CPU and export it.

    pip install torch==2.13.0   # only this script needs it; onnx-dacomp itself does not
    python3 tools/train_cifar_cnn.py --data /tmp/cifar/cifar10 --epochs 8 --threads 1 -o models/dacomp_cifar_cnn.onnx

`--data` is the extracted `../shared/data/cifar10_jpeg.tar.gz` (train/ and test/ class folders). The model
takes RGB images scaled to [0, 1] (N, 3, 32, 32): the mean/std normalization is part of the graph, so the
tool's default image preprocessing (x / 255) feeds it correctly. BatchNorm is folded into the convolutions
by the export (eval mode, constant folding). Seeded; prints the test accuracy for models/README.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
            labels.append(index)
    return np.stack(images), np.array(labels)


def build_model():
    import torch
    from torch import nn

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
            self.features = nn.Sequential(
                *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
                *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                *block(64, 128), *block(128, 128), nn.MaxPool2d(2),
                *block(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )  # fmt: skip
            self.classifier = nn.Linear(256, 10)

        def forward(self, x):
            return self.classifier(self.features((x - self.mean) / self.std))

    return Net()


def train_and_export(build, optimizer_for, epochs: int, description: str) -> None:
    """The command line, training loop and ONNX export shared by the project's CIFAR-10 models: `build()` makes
    the network, `optimizer_for(parameters)` its optimizer with the schedule's (peak rate, warm-up share)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, type=Path, help="folder with train/ and test/")
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--epochs", type=int, default=epochs)
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

    model = build()
    steps = args.epochs * (len(train_x) // args.batch_size)
    optimizer, peak, warmup = optimizer_for(model.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=steps, pct_start=warmup)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train_x))
        for step in range(len(train_x) // args.batch_size):
            index = order[step * args.batch_size : (step + 1) * args.batch_size]
            images = train_x[index]
            # augmentation: random crop with 4 px padding and horizontal flips
            padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
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
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}, test top-1 {accuracy:.2%}, {time.time() - start:.0f} s",
            flush=True,
        )

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


def sgd(parameters):
    import torch

    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True), 0.1, 0.25


def main() -> None:
    train_and_export(build_model, sgd, 8, __doc__.splitlines()[0])


def evaluate(model, tensor, images, labels) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 500):
            logits = model(tensor(images[start : start + 500]))
            correct += int((logits.argmax(1).numpy() == labels[start : start + 500]).sum())
    return correct / len(images)


if __name__ == "__main__":
    main()
