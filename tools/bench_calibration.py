"""Benchmark of statistics collection on a real model and real images.

    python3 tools/bench_calibration.py [--model ../shared/models/cifar10_resnet56.onnx] [--images 2000]

Each measurement runs in its own process (peak memory = that process's max RSS). Prints images/s of plain
inference, of statistics collection inside onnxruntime (graph: the default sampled positions; graph-all: every
position) and with exposed inputs (numpy), of a naive reference (activations out of onnxruntime, numpy im2col
in float64, P.T @ P), the whole `calibrate` command against the naive path, and the effective FLOP rate of
the all-position patch Gram arithmetic against numpy.matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def load_batches(folder: Path, model, images: int, batch_size: int):
    from onnx_dacomp.calibration.sources import ImagePreprocessing, open_source

    pre = ImagePreprocessing(mean=tuple(map(float, MEAN.split(","))), std=tuple(map(float, STD.split(","))))
    return list(open_source(folder, model, preprocessing=pre, batch_size=batch_size, limit=images))


def part(name: str, model_path: str, folder: str, images: int, batch_size: int) -> dict:
    """One measurement, run in a child process."""
    from onnx_dacomp.calibration.collect import collect_statistics
    from onnx_dacomp.load import load_model
    from onnx_dacomp.runtime import create_session
    from onnx_dacomp.targets import find_targets

    model = load_model(model_path)
    layers = [layer for layer in find_targets(model).targets if layer.kind == "conv"]  # the patch Grams
    batches = load_batches(Path(folder), model, images, batch_size)
    start = time.perf_counter()
    if name == "inference":
        session = create_session(model, "cpu")
        for batch in batches:
            session.run(None, batch)
    elif name in ("graph", "graph-all", "numpy"):
        mode = "numpy" if name == "numpy" else "graph"
        positions = "sampled" if name == "graph" else "all"
        collect_statistics(model, layers, batches, device="cpu", mode=mode, progress=False, positions=positions)
    elif name == "naive":
        import onnx

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        names = list(dict.fromkeys(layer.input for layer in layers))
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        session = create_session(probe, "cpu")
        for batch in batches:
            values = dict(zip(names, session.run(names, batch)))
            for layer in layers:
                matrix = layer.input_vectors(values[layer.input])[0].T  # (positions, n) float64
                _ = matrix.T @ matrix, matrix.sum(0)
    elif name == "gram_flops":
        return {"flops": gram_flops(model, layers, images)}
    elif name == "matmul":
        return {"flops_per_s": matmul_rate()}
    return {"seconds": time.perf_counter() - start}


def gram_flops(model, layers, images: int) -> float:
    """Arithmetic of the plain patch Gram P^T P over all layers and images (2 * positions * n^2)."""
    total = 0.0
    for layer in layers:
        positions = int(np.prod(layer.output_shape[2:]))
        total += 2.0 * positions * layer.vector_length**2 * layer.group * images
    return total


def matmul_rate() -> float:
    """float32 numpy.matmul FLOP rate on a Gram-shaped product (n x K) @ (K x n)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((576, 32 * 64)).astype(np.float32)
    best = 0.0
    for _ in range(20):
        start = time.perf_counter()
        a @ a.T
        best = max(best, 2 * 576 * 576 * a.shape[1] / (time.perf_counter() - start))
    return best


def run_part(name: str, args, folder: Path) -> tuple[dict, float]:
    command = [
        sys.executable,
        __file__,
        "--part",
        name,
        "--model",
        str(args.model),
        "--folder",
        str(folder),
        "--images",
        str(args.images),
        "--batch-size",
        str(args.batch_size),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"part {name} failed")
    return json.loads(output.strip().splitlines()[-1]), usage.ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "cifar10_resnet56.onnx")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--part")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.part:
        print(json.dumps(part(args.part, str(args.model), args.folder, args.images, args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        with tarfile.open(SHARED / "data" / "cifar10_jpeg.tar.gz") as tar:
            tar.extractall(
                scratch, members=[m for m in tar.getmembers() if "/train/" in m.name or m.isdir()], filter="data"
            )
        folder = Path(scratch) / "cifar10" / "train"
        print(
            f"{args.model.name}, {args.images} CIFAR-10 train images, batch {args.batch_size}, onnxruntime CPU; "
            f"{platform.machine()}, {os.cpu_count()} cores"
        )
        results = {}
        for name in ("inference", "graph", "graph-all", "numpy", "naive"):
            results[name], memory = run_part(name, args, folder)
            print(
                f"  {name:<10} {args.images / results[name]['seconds']:8.1f} img/s   "
                f"({results[name]['seconds']:.2f} s, peak RSS {memory:.2f} GiB)"
            )
        flops = run_part("gram_flops", args, folder)[0]["flops"]
        rate = run_part("matmul", args, folder)[0]["flops_per_s"]
        gram_seconds = max(results["graph-all"]["seconds"] - results["inference"]["seconds"], 1e-9)
        print(
            f"  patch Gram arithmetic (counted as the full im2col Gram): {flops / 1e9:.0f} GFLOP; graph-all path "
            f"{flops / gram_seconds / 1e9:.0f} GFLOP/s effective "
            f"beyond inference vs numpy.matmul float32 {rate / 1e9:.0f} GFLOP/s "
            f"= {flops / gram_seconds / rate:.0%} (goal >= 50%)"
        )
        command = [
            sys.executable,
            "-m",
            "onnx_dacomp",
            "-q",
            "calibrate",
            str(args.model),
            "--data",
            str(folder),
            "--limit",
            str(args.images),
            "--mean",
            MEAN,
            "--std",
            STD,
            "-o",
            str(Path(scratch) / "s.npz"),
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        whole = time.perf_counter() - start
        naive = results["naive"]["seconds"]
        print(
            f"  whole `calibrate` command (load, decode, collect, save): {whole:.2f} s; naive collection alone "
            f"{naive:.2f} s -> {naive / whole:.1f}x faster (goal >= 4x)"
        )


if __name__ == "__main__":
    main()
