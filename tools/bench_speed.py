"""Where `compress` spends its time and memory, on real-size models, in units that compare across machines.

    python3 tools/bench_speed.py [--models resnet56,efficientnet,resnet50,yolo] [--method auto]

Each model is compressed by the CLI with its defaults (`--method auto`, the ratio below) in a child
process; the report gives every stage's wall and CPU seconds, and the peak RSS of the child and its worker
processes together is sampled from /proc. In the same run, one plain onnxruntime inference pass over the
same calibration data (same batch size) is timed, so every stage is also given in units of that pass.

| model | data | ratio |
|---|---|---|
| resnet56 | 2000 CIFAR-10 train images (seeded subset) | 0.5 |
| efficientnet | the 500 even-class images of the ImageNet sample (the odd ones evaluate) | 0.75 of the convolutions |
| resnet50 | ResNet-50-shaped model (tools/make_resnet50.py), the 1000 ImageNet-sample images | 0.5 |
| yolo | YOLO-style detector, 320x320 (tools/make_yolo.py), all defaults (natural crops, no --method) | 0.75 |
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tools"))

CIFAR = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
IMAGENET = ["--resize", "256", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


def prepare(key: str, workdir: Path):
    """(model path, --data spec and preprocessing options, --limit or None, ratio (and options), evaluation
    --data or None)."""
    from benchmark import cifar_sources, imagenet_sources

    from onnx_dacomp.load import load_model

    if key == "resnet56":
        model = SHARED / "models" / "cifar10_resnet56.onnx"
        cifar_sources(workdir, None, 1)  # extracts the archive
        return model, [str(workdir / "cifar10" / "train"), *CIFAR], 2000, ["0.5"], [str(workdir / "cifar10" / "test")]
    if key == "efficientnet":
        model = SHARED / "models" / "efficientnet_lite0_imagenet.onnx"
        imagenet_sources(workdir, load_model(model))  # writes the even/odd halves as .npz with labels
        evaluation = [str(workdir / "imagenet_evaluation.npz")]
        # the ratio counts the convolutions, as when this row was first measured (all layers: tools/benchmark.py)
        return model, [str(workdir / "imagenet_calibration.npz")], None, ["0.75", "--layer-kinds", "conv"], evaluation
    if key == "yolo":  # a vendor-like model and a user with no data of its own: the defaults
        import make_yolo
        import onnx

        model = workdir / "yolo.onnx"
        onnx.save(make_yolo.build(), model)
        return model, ["natural"], None, ["0.75"], None
    import make_resnet50

    model = workdir / "resnet50_shaped.onnx"
    if not model.exists():
        import onnx

        onnx.save(make_resnet50.build(0), model)
    if not (workdir / "imagenet_sample").is_dir():
        with tarfile.open(SHARED / "data" / "imagenet_sample_1000.tar.gz") as tar:
            tar.extractall(workdir, filter="data")
    return model, [str(workdir / "imagenet_sample"), *IMAGENET], None, ["0.5"], None


def run_child(argv: list[str], log: Path):
    """Run a child process with its output in `log`; its wall seconds and the peak of the summed RSS of it
    and its worker processes (sampled every 0.2 s from /proc)."""
    start, peak = time.perf_counter(), 0
    with open(log, "w") as stream:
        child = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT)
        while child.poll() is None:
            peak = max(peak, sum(_rss(pid) for pid in _process_tree(child.pid)))
            time.sleep(0.2)
    if child.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start, peak / 2**30


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
        except (OSError, ValueError):
            continue
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def inference_pass(model: Path, data: list[str], limit: int | None) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain inference pass over the calibration data, batch 32, in a child."""
    options = ["--data", *data, *(["--limit", str(limit)] if limit else [])]
    code = f"""
import json, sys, time
from onnx_dacomp.calibration.sources import open_data
from onnx_dacomp.cli.options import data_config
from onnx_dacomp.cli import build_parser
from onnx_dacomp.load import load_model
from onnx_dacomp.runtime import create_session
args = build_parser().parse_args(["calibrate", "m", "-o", "x", *{options!r}])
model = load_model({str(model)!r})
batches = list(open_data(args.data, model, data_config(args), 0, limit={limit!r}))
session = create_session(model, "cpu")
session.run(None, batches[0])
wall, cpu = time.perf_counter(), time.process_time()
for batch in batches:
    session.run(None, batch)
print(json.dumps([time.perf_counter() - wall, time.process_time() - cpu]))
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(output.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56,efficientnet,resnet50,yolo")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-dacomp-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.models.split(","):
        model, data, limit, ratio, evaluation = prepare(key, args.workdir)
        inference_wall, inference_cpu = inference_pass(model, data, limit)
        output, report = args.workdir / f"{key}_small.onnx", args.workdir / f"{key}_report.json"
        argv = [sys.executable, "-m", "onnx_dacomp", "compress", str(model), "-o", str(output), "--data", *data]
        argv += ["--method", args.method] if key != "yolo" else []  # yolo: a user who gives nothing but a ratio
        argv += ["--ratio", *ratio, "--report", str(report), "--device", "cpu"]
        argv += ["--limit", str(limit)] if limit else []
        elapsed, peak = run_child(argv, args.workdir / f"{key}_compress.log")
        result = json.loads(report.read_text())
        print(f"\n## {key}: `{' '.join(argv[3:])}`", flush=True)
        print(f"whole command {elapsed:.0f} s, peak RSS {peak:.2f} GiB; one inference pass over the calibration "
              f"data: {inference_wall:.1f} s wall, {inference_cpu:.1f} CPU-s")  # fmt: skip
        print("| stage | wall s | CPU-s | inference passes (wall) |\n|---|---|---|---|")
        for stage, seconds in result["seconds"].items():
            cpu = result["cpu_seconds"][stage]
            print(f"| {stage} | {seconds:.1f} | {cpu:.1f} | {seconds / inference_wall:.1f} |")
        verification = result["verification"]
        line = "no verification"
        if verification:
            agreement = verification["top1_agreement"]
            line = f"verification: relative output error {verification['rel_output_error']:.4f}" + (
                f", agreement {agreement:.2%}" if agreement is not None else ""
            )
        if evaluation:
            argv = [sys.executable, "-m", "onnx_dacomp", "evaluate", str(model), str(output), "--data", *evaluation]
            argv += CIFAR + ["--json"] if key == "resnet56" else ["--json"]
            check = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
            line += f"; top-1 on {evaluation[0]}: {check['top1_original']:.2%} -> {check['top1_compressed']:.2%}"
        print(line, flush=True)
        rows.append((key, elapsed, peak, inference_wall))
    print("\n| model | whole command | peak RSS | in inference passes |\n|---|---|---|---|")
    for key, elapsed, peak, inference in rows:
        print(f"| {key} | {elapsed:.0f} s | {peak:.2f} GiB | {elapsed / inference:.1f} |")


if __name__ == "__main__":
    main()
