"""`onnx-dacomp calibrate MODEL.onnx --data SOURCE -o stats.npz`: gather the statistics of every target."""

from __future__ import annotations

import argparse

from ..api import calibrate
from ..calibration.statistics import save_statistics
from ..config import RuntimeConfig
from ..log import logger
from ..save import check_output
from .options import add_data_options, add_options, data_config, values


def add_parser(commands) -> None:
    parser = commands.add_parser("calibrate", help="collect the input statistics of every decomposable layer")
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("-o", "--output", required=True, help="statistics file to write (.npz)")
    parser.add_argument("--data", required=True, metavar="SOURCE", help=DATA_HELP)
    add_data_options(parser)
    add_options(parser, RuntimeConfig, title="runtime", only=("device", "seed", "workers", "ray"))
    parser.add_argument(
        "--mode",
        choices=("auto", "graph", "numpy"),
        default="auto",
        help="sums inside onnxruntime (graph) or in numpy from exposed inputs (default auto: graph, else numpy)",
    )


DATA_HELP = (
    "folder of images (class sub-folders or flat), .npz/.npy file or folder, 'natural' (crops of photographs "
    "shipped with scikit-image) or 'random'"
)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, protect=args.model)  # fail before the slow part
    runtime = RuntimeConfig(**values(args, RuntimeConfig))
    statistics = calibrate(args.model, args.data, data_config(args), runtime, mode=args.mode, progress=not args.quiet)
    save_statistics(statistics, args.output)
    logger.info(
        "wrote statistics of %d layers (%d samples, %s) to %s",
        len(statistics.layers),
        statistics.samples,
        statistics.source,
        args.output,
    )
    return 0
