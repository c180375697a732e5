"""How the convergence and sensitivity settings trade accuracy for time: the measurement behind the defaults.

    python3 tools/bench_defaults.py [--models resnet20,resnet56,efficientnet] [--max-iter 5,10,20,40,100]
                                    [--sensitivity-samples 16,32,128] [--methods tucker2,auto]

For each model, statistics are gathered once on the same data as tools/benchmark.py (CIFAR-10: 2000
train images, all 10,000 test images; EfficientNet-Lite0: even / odd classes of the ImageNet sample); then
every setting compresses with the defaults except that one option (ratio 0.5; 0.75 for EfficientNet-Lite0)
and is evaluated on the test data. Printed: top-1, its change against the original, and the seconds of the
compression after the shared statistics (2-core machine: the solver work is single-threaded BLAS).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import MODELS, cifar_sources, imagenet_sources  # noqa: E402

RATIOS = {"resnet20": 0.5, "resnet56": 0.5, "efficientnet": 0.75}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56,efficientnet")
    parser.add_argument("--methods", default="tucker2,auto")
    parser.add_argument("--max-iter", default="5,10,20,40,100")
    parser.add_argument("--sensitivity-samples", default="16,32,128")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-dacomp-bench")
    args = parser.parse_args()

    import onnx_dacomp
    from onnx_dacomp.calibration.collect import collect_statistics
    from onnx_dacomp.config import CompressConfig, FitConfig, PlanConfig
    from onnx_dacomp.load import load_model
    from onnx_dacomp.targets import find_targets
    from onnx_dacomp.verify import compare_models

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = ["| model | method | setting | top-1 | change | compress time |", "|---|---|---|---|---|---|"]
    for key in args.models.split(","):
        model = load_model(MODELS[key])
        if key == "efficientnet":
            calibration, evaluation, _ = imagenet_sources(args.workdir, model)
        else:
            calibration, evaluation, _ = cifar_sources(args.workdir, model, 2000)
        statistics = collect_statistics(model, find_targets(model).targets, calibration, device="cpu", progress=False)
        settings = [("max_iter", int(v)) for v in args.max_iter.split(",")]
        settings += [("sensitivity_samples", int(v)) for v in args.sensitivity_samples.split(",")]
        methods = ["auto"] if key == "efficientnet" else args.methods.split(",")
        for method in methods:
            for option, value in settings:
                config = CompressConfig(
                    plan=PlanConfig(method=method, ratio=RATIOS[key]), fit=FitConfig(), holdout=0, device="cpu"
                ).replace(**{option: value})
                start = time.perf_counter()
                result = onnx_dacomp.compress(model, calibration, config, statistics=statistics, progress=False)
                seconds = time.perf_counter() - start
                comparison = compare_models(model, result.model, evaluation, device="cpu", progress=False)
                row = (
                    f"| {key} | {method} | {option.replace('_', '-')} {value} | {comparison.top1_compressed:.2%} | "
                    f"{-100 * comparison.top1_drop:+.2f} | {seconds:.0f} s |"
                )
                rows.append(row)
                print(row, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
