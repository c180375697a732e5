"""`onnx-dacomp calibrate MODEL.onnx --data SOURCE -o stats.npz`: gather the patch statistics of every target."""

from __future__ import annotations

import argparse

from ..calibrate.collect import collect_statistics
from ..calibrate.statistics import save_statistics
from ..load import load_model
from ..log import logger
from ..save import check_output
from ..shapes import parse_input_shapes
from ..targets import find_targets
from .data_options import add_data_arguments, add_runtime_arguments, source_from_args


def add_parser(commands) -> None:
    parser = commands.add_parser("calibrate", help="collect the input-patch statistics of every Conv layer")
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("-o", "--output", required=True, help="statistics file to write (.npz)")
    add_data_arguments(parser, required=True)
    add_runtime_arguments(parser)
    parser.add_argument(
        "--mode",
        choices=("auto", "graph", "numpy"),
        default="auto",
        help="patch sums inside onnxruntime (graph) or in numpy from exposed inputs",
    )


def run(args: argparse.Namespace) -> int:
    check_output(args.output, protect=args.model)  # fail before the slow part
    input_shapes = parse_input_shapes(args.input_shape)
    model = load_model(args.model)
    scan = find_targets(model, input_shapes)
    source = source_from_args(args, model, input_shapes)
    statistics = collect_statistics(
        model, scan.targets, source, device=args.device, mode=args.mode, progress=not args.quiet
    )
    save_statistics(statistics, args.output)
    logger.info(
        "wrote statistics of %d layers (%d samples, %s) to %s",
        len(statistics.layers),
        statistics.samples,
        statistics.source,
        args.output,
    )
    return 0
