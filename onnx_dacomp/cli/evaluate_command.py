"""`onnx-dacomp evaluate ORIGINAL.onnx COMPRESSED.onnx --data SOURCE`: accuracy, agreement, latency."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..errors import UserError
from ..evaluate import benchmark_batches, compare_models, measure_latency
from ..load import load_model
from ..report import latency_line, verification_line
from ..shapes import graph_inputs, parse_input_shapes
from .data_options import add_data_arguments, add_runtime_arguments, positive_int, source_from_args


def add_parser(commands) -> None:
    parser = commands.add_parser("evaluate", help="compare a compressed model with its original on data")
    parser.add_argument("original", help="the original ONNX model")
    parser.add_argument("compressed", help="the compressed ONNX model")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--benchmark", action="store_true", help="also time both models in onnxruntime")
    parser.add_argument(
        "--benchmark-batch", type=_sizes, default=(1, 32), metavar="N[,N...]", help="batch sizes to time (1,32)"
    )
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed runs per model and batch (30)")
    add_data_arguments(parser, required=True)
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    input_shapes = parse_input_shapes(args.input_shape)
    original, compressed = load_model(args.original), load_model(args.compressed)
    names = [[value.name for value in graph_inputs(model)] for model in (original, compressed)]
    if names[0] != names[1]:
        raise UserError(
            f"the models have different inputs ({names[0]} and {names[1]}): compare a model with its own compression"
        )
    source = source_from_args(args, original, input_shapes)
    comparison = compare_models(original, compressed, source, device=args.device, progress=not args.quiet)
    latencies = []
    if args.benchmark:
        for batch in benchmark_batches(source, args.benchmark_batch):
            latencies.append(measure_latency(original, compressed, batch, device=args.device, repeats=args.repeats))
    if args.json:
        result = {
            **asdict(comparison),
            "top1_drop": comparison.top1_drop,
            "latency": [asdict(latency) | {"ratio": latency.ratio} for latency in latencies],
        }
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    lines = [verification_line(comparison).replace("held-out ", "")]
    lines.extend(latency_line(latency) for latency in latencies)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive batch sizes, got {text!r}")
    return sizes
