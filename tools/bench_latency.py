"""Accuracy against measured speed-up: what each way of asking for a smaller model buys in end-to-end time.

    python3 tools/bench_latency.py [--models resnet56,resnet20,convnext,efficientnet,resnet50]
                                   [--settings params,macs,latency,speedup1.2,speedup1.25,speedup1.5,speedup2,
                                               prune0.6,prune-speedup1.3-b32,prune-speedup1.5,params0.35,...]

Per model (data as in tools/benchmark.py: CIFAR-10 models calibrate on 2000 seeded-random train images and
are evaluated on the 10,000 test images; EfficientNet-Lite0 and the ResNet-50-shaped model of
tools/make_resnet50.py, whose weights are random, calibrate on 400 of the even-class half of the ImageNet
sample and are evaluated on the odd-class half) and per setting of the model (`MODEL_SETTINGS`, all by
default), `compress` with `--method auto` and the defaults otherwise: `--budget params|macs|latency --ratio
0.5`, or `--speedup X` (measured at batch 1), and `--method prune` at `--ratio 0.6`, `--speedup 1.3
--speedup-batch 32` and `--speedup 1.5`. Each compressed model is then timed against its original (the
interleaved A/B measurement of `evaluate --benchmark`: alternating rounds, the median ratio and its 95 %
interval, until +-3 % or the time cap) at batch 1 and 32 on the threads the defaults take (each model in each
round the faster of one thread per core and one thread: "2/1 thr" is the original mostly on two, the compressed
model on one) and at batch 1 on one thread per core for both,
and evaluated on the test data (top-1 with its Wilson interval). Every compression of a model shares one
`--cache-dir` (statistics, candidate tables and sensitivities are the same for every setting). Writes
bench/latency.json and bench/latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import onnx
from benchmark import MODELS, ROOT, cifar_sources, imagenet_sources

SETTINGS = {
    "params": dict(budget="params", ratio=0.5),
    "macs": dict(budget="macs", ratio=0.5),
    "latency": dict(budget="latency", ratio=0.5),
    "speedup1.2": dict(speedup=1.2),
    "speedup1.25": dict(speedup=1.25),
    "speedup1.5": dict(speedup=1.5),
    "speedup2": dict(speedup=2.0),
    # channel pruning: the layers computing the pruned channels compute only those
    "prune0.6": dict(method="prune", ratio=0.6),
    "prune-speedup1.3-b32": dict(method="prune", speedup=1.3, speedup_batch=32),
    "prune-speedup1.5": dict(method="prune", speedup=1.5),
    # the fits propagated through the model (the search times plain fits: the same chains)
    "speedup1.6-b32-propagate": dict(speedup=1.6, speedup_batch=32, propagate=True),
    "macs0.4-propagate": dict(budget="macs", ratio=0.4, propagate=True),
    "speedup1.6-b32-propagate-bias": dict(speedup=1.6, speedup_batch=32, propagate=True, bias_refit=True),
    "speedup1.65-b32-propagate-bias": dict(speedup=1.65, speedup_batch=32, propagate=True, bias_refit=True),
    # other parameter ratios (EfficientNet-Lite0 at 0.82 / 0.75 of its decomposable layers, ResNet-56 at 0.35)
    "params0.82": dict(budget="params", ratio=0.82),
    "params0.75": dict(budget="params", ratio=0.75),
    "params0.35": dict(budget="params", ratio=0.35),
}

# the settings each model is measured with (the targets; all of SETTINGS for models not named)
MODEL_SETTINGS = {
    "resnet56": ("params", "macs", "latency", "speedup1.25", "speedup1.5", "speedup2"),
    "resnet20": ("params", "macs", "latency", "speedup1.25", "speedup1.5", "speedup2"),
    "convnext": (
        "params",
        "macs",
        "latency",
        "speedup1.25",
        "speedup1.5",
        "speedup2",
        "prune0.6",
        "prune-speedup1.3-b32",
    ),  # fmt: skip
    "efficientnet": ("params", "macs", "speedup1.2"),
    "resnet50": ("params", "speedup1.5"),
}
IMAGENET_HOLDOUT = 100  # of the 500 even-class images: 400 calibrate
# (key, index into the batches of sizes 1 and 32, batch size, threads): the defaults' (None: each model in each
# round the faster of one per core and one), and batch 1 with both on one per core ("cores")
TIMINGS = (("1", 0, 1, None), ("1xN", 0, 1, "cores"), ("32", 1, 32, None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODEL_SETTINGS))
    parser.add_argument("--settings", default=None, help="comma-separated (default: each model's MODEL_SETTINGS)")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="timing cap per batch size (20)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-dacomp-bench")
    parser.add_argument("--keep", type=Path, default=None, help="save each compressed model as KEEP/MODEL-SETTING.onnx")
    args = parser.parse_args()
    today = date.today().isoformat()
    machine = f"{platform.machine()}{_vector_units()}, {os.cpu_count()} cores"

    import onnx_dacomp
    from onnx_dacomp.config import CompressConfig
    from onnx_dacomp.errors import UserError
    from onnx_dacomp.inputs import input_signature
    from onnx_dacomp.latency import compare_latency, default_threads
    from onnx_dacomp.load import load_model
    from onnx_dacomp.verify import benchmark_batches, compare_models

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "latency.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    for key in args.models.split(","):
        if key == "resnet50":
            import make_resnet50

            model = make_resnet50.build()
        else:
            model = load_model(MODELS[key])
        imagenet = key in ("efficientnet", "resnet50")
        if imagenet:
            calibration, evaluation, _ = imagenet_sources(args.workdir, model)
        else:
            calibration, evaluation, _ = cifar_sources(args.workdir, model, 2000, MODELS[key].parent != ROOT / "models")
        batches = benchmark_batches(evaluation, (1, 32), input_signature(model))
        cache = args.workdir / f"cache-{key}"
        settings = args.settings.split(",") if args.settings else MODEL_SETTINGS.get(key, tuple(SETTINGS))
        for setting in settings:
            options = {"method": "auto"} | SETTINGS[setting]
            config = CompressConfig(holdout=IMAGENET_HOLDOUT if imagenet else 0, cache_dir=str(cache), benchmark=False,
                                    **options)  # fmt: skip
            start = time.perf_counter()
            try:
                result = onnx_dacomp.compress(model, calibration, config, progress=False)
            except UserError as error:  # a speed-up no ratio reaches
                print(f"{key} {setting}: {error}", flush=True)
                row = {"model": key, "setting": setting, "error": str(error), "date": today, "machine": machine}
                results["rows"] = [r for r in results["rows"] if (r["model"], r["setting"]) != (key, setting)] + [row]
                continue
            seconds = time.perf_counter() - start
            if args.keep:  # for repeated measurements of the same pair (tools/bench_repeat.py)
                args.keep.mkdir(parents=True, exist_ok=True)
                onnx.save(result.model, args.keep / f"{key}-{setting}.onnx")
                if key == "resnet50":  # built here, not a file: saved beside for the same reason
                    onnx.save(model, args.keep / "resnet50-original.onnx")
            comparison = compare_models(model, result.model, evaluation, device="cpu", progress=False)
            latency = {
                key: compare_latency(
                    model,
                    result.model,
                    batches[index],
                    size,
                    device="cpu",
                    threads=default_threads() if threads == "cores" else threads,
                    max_seconds=args.latency_seconds,
                    show_progress=False,
                )  # fmt: skip
                for key, index, size, threads in TIMINGS
            }
            totals, classifier = result.report.totals, comparison.classifier
            row = {
                "model": key, "setting": setting, "ratio": result.report.target_ratio,
                "params_kept": totals["params_after"] / totals["params_before"],
                "macs_kept": totals["macs_after"] / totals["macs_before"],
                "top1": comparison.top1_compressed, "top1_interval": classifier.top1_compressed_interval,
                "top1_original": comparison.top1_original, "samples": comparison.samples,
                "rel_error": comparison.rel_output_error, "rel_error_high": comparison.rel_output_error_high,
                "labels_meaningful": key != "resnet50",  # random weights: only the output error means anything
                "latency": {
                    key: {"ratio": item.ratio, "interval": [item.ratio_low, item.ratio_high],
                          "rounds": item.rounds, "threads": item.threads,
                          "compressed_threads": item.compressed_threads, "other_work": item.other_work}
                    for key, item in latency.items()
                },
                "search": result.report.search, "seconds": seconds, "date": today, "machine": machine,
            }  # fmt: skip
            results["rows"] = [r for r in results["rows"] if (r["model"], r["setting"]) != (key, setting)] + [row]
            results |= {"machine": f"{machine}, onnxruntime CPU, {default_threads()} cores", "date": today}
            path.write_text(json.dumps(results, indent=2))
            print(line(row), flush=True)
    (args.out / "latency.md").write_text(table(results))
    print(table(results))


def _vector_units() -> str:
    """The widest x86 vector extension the CPU has (onnxruntime's kernels, and so the figures, depend on it)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return ""
    return " with AVX-512" if "avx512f" in flags else " with AVX2" if "avx2" in flags else ""


def line(row: dict) -> str:
    return (
        f"{row['model']} {row['setting']}: ratio {row['ratio']:.3f} params {row['params_kept']:.3f} MACs "
        f"{row['macs_kept']:.3f} top-1 {row['top1']:.2%} (original {row['top1_original']:.2%}) rel. error "
        f"{row['rel_error']:.4f} latency b1 {_ratio(row, '1')}, b1 on every core {_ratio(row, '1xN')}, b32 "
        f"{_ratio(row, '32')} in {row['seconds']:.0f} s"
    )


def _ratio(row: dict, key: str) -> str:
    item = row["latency"].get(key)  # rows of earlier runs have other timings
    if item is None:
        return ""
    counts = dict.fromkeys((item["threads"], item.get("compressed_threads") or item["threads"]))
    threads = f" ({'/'.join(map(str, counts))} thr)" if key != "1xN" else ""
    return f"{item['ratio']:.3f} [{item['interval'][0]:.3f}, {item['interval'][1]:.3f}]{threads}"


def table(results: dict) -> str:
    lines = [
        f"Latest run on {results.get('machine')} (each row on its date and, in latency.json, its machine; rows of "
        "earlier releases and other machines stay until run "
        "again): latency = compressed / original, median of "
        "interleaved rounds with its 95 % interval; top-1 on the test data with its 95 % interval (the "
        "ResNet-50-shaped model has random weights: its relative output error on the test data instead, with the "
        "upper end of its interval).",
        "",
        "| date | model | setting | ratio | params kept | MACs kept | top-1 (or output error) | latency b1 | latency "
        "b1, every core | latency b32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row.get('date', '')} | {row['model']} | {row['setting']} | | | | {row['error']} | | | |")
            continue
        low, high = row["top1_interval"]
        if row.get("labels_meaningful", True):
            drop = 100 * (row["top1"] - row["top1_original"])
            quality = f"{row['top1']:.2%} [{low:.1%}, {high:.1%}] ({drop:+.2f} points)"
        else:
            quality = f"rel. error {row['rel_error']:.4f} (<= {row['rel_error_high']:.4f})"
        cells = [
            row.get("date", ""), row["model"], row["setting"], f"{row['ratio']:.3f}", f"{row['params_kept']:.3f}",
            f"{row['macs_kept']:.3f}",
            quality,
            *(_ratio(row, key) for key, *_ in TIMINGS),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
