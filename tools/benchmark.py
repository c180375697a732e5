"""The results table: accuracy kept versus size and speed, on real models and real images.

    pip install -e ".[dev,bench]"
    python3 tools/benchmark.py [--models resnet20,resnet56,efficientnet] [--ratios 0.75,0.5,0.35]
                               [--methods frobenius-uniform,da-uniform,da-allocated,da-cp,auto,...] [--out bench/]

Data (`../shared/data`, extracted to a temporary folder): CIFAR-10 models calibrate on 2000 `train/` images
and are evaluated on all 10,000 `test/` images (the project's ConvNeXt-style model, models/, likewise);
EfficientNet-Lite0 uses disjoint halves of the ImageNet sample (even class indices calibrate, odd ones
evaluate). Statistics are gathered once per model and data and reused by every row; every row runs the
defaults but for its method's options and `holdout=0` (the test data verifies). Each row: params and MACs
kept (of the decomposable layers: convolutions and dense), top-1, drop against the original, top-1
agreement, onnxruntime CPU latency ratio (compressed / original, median of interleaved runs) at batch 1 and
32, the compression time, and for a propagated row run beside its base (`PAIRED`) the paired change of top-1
against it on the same images with its 95 % interval. Writes `results.md`, `results.json` (rows are merged
by model/ratio/method, so methods can be run separately) and `results.png` (top-1 versus MACs kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

MODELS = {
    "resnet20": SHARED / "models" / "cifar10_resnet20.onnx",
    "resnet56": SHARED / "models" / "cifar10_resnet56.onnx",
    "efficientnet": SHARED / "models" / "efficientnet_lite0_imagenet.onnx",
    "convnext": ROOT / "models" / "dacomp_cifar_convnext.onnx",  # MatMul pointwise layers (dense layers)
}
# name -> (CompressConfig fields, statistics: "in-domain" | "natural" | None)
METHODS = {
    "frobenius-uniform": (dict(method="tucker2", norm="frobenius", allocation="uniform"), None),
    "da-uniform": (dict(method="tucker2", allocation="uniform"), "in-domain"),
    "da-allocated": (dict(method="tucker2"), "in-domain"),
    "da-cp": (dict(method="cp"), "in-domain"),
    "auto": (dict(method="auto"), "in-domain"),
    "da-natural": (dict(method="tucker2"), "natural"),
    "da-bias-refit": (dict(method="tucker2", bias_refit=True), "in-domain"),
    "da-propagated": (dict(method="tucker2", bias_refit=True, propagate=True), "in-domain"),
    "auto-propagated": (dict(method="auto", propagate=True), "in-domain"),  # against `auto`: never worse?
    # the ratio counts the summed onnxruntime latency of the layers at batch 32 (every candidate timed)
    "da-latency": (dict(method="auto", budget="latency", speed_batch=32), "in-domain"),
    "da-macs": (dict(method="auto", budget="macs"), "in-domain"),  # the ratio counts multiply-accumulates
    "da-svd": (dict(method="svd"), "in-domain"),  # dense layers' DA-SVD against ...
    "frobenius-svd": (dict(method="svd", norm="frobenius"), None),  # ... the data-free truncated SVD
}
DEFAULT_METHODS = "frobenius-uniform,da-uniform,da-allocated,da-cp,auto"
# a row of the key is compared with the row of the value at its ratio on the same images, where both run:
# the paired change of top-1 with its 95 % interval (a difference of a few images is within it)
PAIRED = {"auto-propagated": "auto", "da-propagated": "da-bias-refit"}


def cifar_sources(workdir: Path, model, calibration: int, normalized: bool = True):
    """`normalized`: mean/std applied here (the shared ResNets); else images in [0, 1], as the project's own
    models take them (their normalization is inside the graph)."""
    from onnx_dacomp.calibration.sources import ArraySource, ImageFolderSource, ImagePreprocessing

    root = workdir / "cifar10"
    if not root.is_dir():
        with tarfile.open(SHARED / "data" / "cifar10_jpeg.tar.gz") as tar:
            tar.extractall(workdir, filter="data")
    pre = ImagePreprocessing(mean=CIFAR_MEAN, std=CIFAR_STD) if normalized else ImagePreprocessing()
    train = ImageFolderSource(root / "train", "input", (1, 3, 32, 32), pre, limit=calibration, seed=0)
    # the test images decoded once: every row evaluates on them
    cached = workdir / ("cifar10_test.npz" if normalized else "cifar10_test_unit.npz")
    if not cached.exists():
        test = ImageFolderSource(root / "test", "input", (1, 3, 32, 32), pre)
        images, labels = zip(*[(batch["input"], labels) for batch, labels in test.labelled()])
        np.savez(cached, input=np.concatenate(images), labels=np.concatenate(labels))
    return train, ArraySource(cached, ["input"], batch_size=256), pre


def imagenet_sources(workdir: Path, model):
    """Even class indices calibrate, odd ones evaluate: preprocessed once into .npz files with labels."""
    from PIL import Image

    from onnx_dacomp.calibration.sources import ArraySource, ImagePreprocessing

    root = workdir / "imagenet_sample"
    if not root.is_dir():
        with tarfile.open(SHARED / "data" / "imagenet_sample_1000.tar.gz") as tar:
            tar.extractall(workdir, filter="data")
    pre = ImagePreprocessing(resize=256, scale=1.0, mean=(127.0,) * 3, std=(128.0,) * 3)
    rows = [line.split("\t") for line in (root / "labels.tsv").read_text().splitlines()[1:]]
    halves = {}
    for parity, name in ((0, "calibration"), (1, "evaluation")):
        path = workdir / f"imagenet_{name}.npz"
        if not path.exists():
            chosen = [(file, int(index)) for file, index, _ in rows if int(index) % 2 == parity]
            arrays = []
            for file, _ in chosen:
                with Image.open(root / file) as image:
                    arrays.append(pre.apply(image, (224, 224), 3))
            np.savez(path, input=np.stack(arrays), labels=np.array([index for _, index in chosen]))
        halves[name] = ArraySource(path, ["input"], batch_size=32)
    return halves["calibration"], halves["evaluation"], pre


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratios", default="0.75,0.5,0.35")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--calibration", type=int, default=2000, help="CIFAR-10 calibration images (2000)")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="timing cap per batch size (20)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-dacomp-bench")
    args = parser.parse_args()

    import onnx_dacomp
    from onnx_dacomp.calibration.collect import collect_statistics
    from onnx_dacomp.calibration.natural import NaturalImageSource
    from onnx_dacomp.config import CompressConfig
    from onnx_dacomp.inputs import input_signature
    from onnx_dacomp.latency import compare_latency
    from onnx_dacomp.load import load_model
    from onnx_dacomp.targets import find_targets
    from onnx_dacomp.verify import benchmark_batches, compare_models

    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": [], "baselines": {}}
    methods = args.methods.split(",")
    for key in args.models.split(","):
        model = load_model(MODELS[key])
        if key == "efficientnet":
            calibration, evaluation, pre = imagenet_sources(args.workdir, model)
        else:
            normalized = MODELS[key].parent != ROOT / "models"
            calibration, evaluation, pre = cifar_sources(args.workdir, model, args.calibration, normalized)
        targets = find_targets(model).targets
        statistics, seconds, sources = {}, {}, {"in-domain": calibration}
        for kind in {METHODS[m][1] for m in methods} - {None}:
            start = time.perf_counter()
            if kind == "natural":
                sources[kind] = NaturalImageSource("input", tuple(targets[0].input_shape), pre, count=2000)
            statistics[kind] = collect_statistics(model, targets, sources[kind], device="cpu", progress=False)
            seconds[kind] = time.perf_counter() - start
            print(f"{key}: {kind} statistics in {seconds[kind]:.1f} s", flush=True)
        batches = benchmark_batches(evaluation, (1, 32), input_signature(model))
        for ratio in map(float, args.ratios.split(",")):
            bases = {}  # the base rows' models at this ratio (`PAIRED`'s values), for the paired comparisons
            for name in methods:
                fields, kind = METHODS[name]
                config = CompressConfig(ratio=ratio, holdout=0, device="cpu", **fields)  # otherwise the defaults
                start = time.perf_counter()
                # the statistics are given; the data serves the layer sensitivities and the propagated fit
                result = onnx_dacomp.compress(
                    model, sources.get(kind), config, statistics=statistics.get(kind), progress=False
                )
                elapsed = time.perf_counter() - start + seconds.get(kind, 0.0)
                comparison = compare_models(model, result.model, evaluation, device="cpu", progress=False)
                if name in PAIRED.values():
                    bases[name] = result.model
                paired = None
                if PAIRED.get(name) in bases:  # the base row's model as the "original": its drop is ours
                    against = compare_models(bases[PAIRED[name]], result.model, evaluation, device="cpu",
                                             progress=False).classifier  # fmt: skip
                    low, high = against.top1_drop_interval
                    paired = {"against": PAIRED[name], "change": against.top1_compressed - against.top1_original,
                              "interval": [-high, -low]}  # fmt: skip
                quiet = dict(device="cpu", show_progress=False)
                latency = [
                    compare_latency(model, result.model, batch, size, max_seconds=args.latency_seconds, **quiet)
                    for batch, size in zip(batches, (1, 32))
                ]
                totals = result.report.totals
                row = {
                    "model": key,
                    "ratio": ratio,
                    "method": name,
                    "params_kept": totals["params_after"] / totals["params_before"],
                    "macs_kept": totals["macs_after"] / totals["macs_before"],
                    "top1": comparison.top1_compressed,
                    "top1_original": comparison.top1_original,
                    "drop": comparison.top1_drop,
                    "agreement": comparison.top1_agreement,
                    "rel_output_error": comparison.rel_output_error,
                    "latency_b1": latency[0].ratio,
                    "latency_b32": latency[1].ratio,
                    "latency_b1_interval": [latency[0].ratio_low, latency[0].ratio_high],
                    "latency_b32_interval": [latency[1].ratio_low, latency[1].ratio_high],
                    "seconds": elapsed,
                    "samples": comparison.samples,
                    "paired": paired,
                }
                results["rows"] = [
                    r for r in results["rows"] if (r["model"], r["ratio"], r["method"]) != (key, ratio, name)
                ] + [row]
                results["baselines"][key] = comparison.top1_original
                print(
                    f"{key} ratio {ratio} {name}: params {row['params_kept']:.3f} MACs {row['macs_kept']:.3f} "
                    f"top-1 {row['top1']:.4f} (drop {row['drop']:.4f}) agreement {row['agreement']:.4f} "
                    f"latency b1 {row['latency_b1']:.3f} b32 {row['latency_b32']:.3f} {elapsed:.0f} s"
                    + (f"; against {paired['against']} {_paired(paired)}" if paired else ""),
                    flush=True,
                )
                results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime CPU"
                results["date"] = date.today().isoformat()
                results_path.write_text(json.dumps(results, indent=2))
    write_table(results, args.out / "results.md")
    write_plot(results, args.out / "results.png")


def write_table(results: dict, path: Path) -> None:
    order = list(METHODS)
    columns = ["model", "ratio", "method", "params kept", "MACs kept", "top-1", "change", "agreement"]
    columns += ["latency b1", "latency b32", "time", "paired change"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    rows = sorted(
        results["rows"],
        key=lambda r: (list(MODELS).index(r["model"]), -r["ratio"], order.index(r["method"])),
    )
    for model in dict.fromkeys(r["model"] for r in rows):
        lines.append(f"| {model} | 1.0 | original | 1.000 | 1.000 | {results['baselines'][model]:.2%} | | | | | | |")
        for r in (r for r in rows if r["model"] == model):
            lines.append(
                f"| {model} | {r['ratio']} | {r['method']} | {r['params_kept']:.3f} | {r['macs_kept']:.3f} | "
                f"{r['top1']:.2%} | {-r['drop'] * 100:+.2f} | {r['agreement']:.2%} | {r['latency_b1']:.2f} | "
                f"{r['latency_b32']:.2f} | {r['seconds']:.0f} s | "
                + (f"against {r['paired']['against']}: {_paired(r['paired'])} |" if r.get("paired") else "|")
            )
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


def _paired(paired: dict) -> str:
    """A paired change of top-1 in points with its 95 % interval."""
    low, high = paired["interval"]
    return f"{100 * paired['change']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] points"


def write_plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        for index, method in enumerate(METHODS):  # one fixed colour per method across the panels
            rows = sorted((r for r in results["rows"] if r["model"] == model and r["method"] == method),
                          key=lambda r: r["macs_kept"])  # fmt: skip
            x, y = [r["macs_kept"] for r in rows], [100 * r["top1"] for r in rows]
            axis.plot(x, y, "o-", color=f"C{index}", label=method if rows else None)
        axis.axhline(100 * results["baselines"][model], color="gray", linestyle="--", label="original")
        axis.set_title(model)
        axis.set_xlabel("MACs kept")
        axis.set_ylabel("top-1 (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table-only"]:  # rewrite results.md and results.png from results.json
        saved = json.loads((ROOT / "bench" / "results.json").read_text())
        write_table(saved, ROOT / "bench" / "results.md")
        write_plot(saved, ROOT / "bench" / "results.png")
        sys.exit(0)
    main()
