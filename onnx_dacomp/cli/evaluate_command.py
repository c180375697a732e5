"""`onnx-dacomp evaluate ORIGINAL.onnx COMPRESSED.onnx --data SOURCE`: accuracy, agreement, latency."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..api import evaluate
from ..config import RuntimeConfig, VerifyConfig, positive_int
from ..report import latency_line, verification_line
from .calibrate_command import DATA_HELP
from .options import add_data_options, add_options, data_config, values


def add_parser(commands) -> None:
    parser = commands.add_parser("evaluate", help="compare a compressed model with its original on data")
    parser.add_argument("original", help="the original ONNX model")
    parser.add_argument("compressed", help="the compressed ONNX model")
    parser.add_argument("--data", required=True, metavar="SOURCE", help=DATA_HELP)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--benchmark", action="store_true", help="also time both models in onnxruntime")
    parser.add_argument(
        "--benchmark-batch", type=_sizes, default=(1, 32), metavar="N[,N...]", help="batch sizes to time (1,32)"
    )
    parser.add_argument(
        "--benchmark-seconds", type=_positive, default=30, metavar="S",
        help="at most this long per batch size: models are timed in alternating rounds until the ratio's 95%% "
        "interval is within +-3%% (30)",
    )  # fmt: skip
    add_options(parser, VerifyConfig, only=("classifier_outputs",))
    add_data_options(parser)
    add_options(parser, RuntimeConfig, title="runtime", only=("device", "seed", "timing_threads"))


def run(args: argparse.Namespace) -> int:
    runtime = RuntimeConfig(**values(args, RuntimeConfig))
    result = evaluate(
        args.original,
        args.compressed,
        args.data,
        data_config(args),
        runtime,
        benchmark_batch=args.benchmark_batch if args.benchmark else (),
        max_seconds=args.benchmark_seconds,
        progress=not args.quiet,
        classifier_outputs=VerifyConfig(**values(args, VerifyConfig)).classifier_outputs,
    )
    comparison = result.comparison
    if args.json:
        output = {
            **comparison.to_dict(),
            "latency": [asdict(latency) for latency in result.latency],
        }
        json.dump(output, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    lines = []
    if comparison.top1_original is not None:  # first: it checks the data and its preprocessing
        lines.append(
            f"original model: top-1 {comparison.top1_original:.2%} on {comparison.samples} labelled samples (far "
            "below its known accuracy means wrong preprocessing: check --scale, --mean, --std, --channel-order)"
        )
    lines.append(verification_line(comparison).replace("held-out ", ""))
    lines.extend(latency_line(latency) for latency in result.latency)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _positive(text: str) -> int:
    try:
        return positive_int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive batch sizes, got {text!r}")
    return sizes
