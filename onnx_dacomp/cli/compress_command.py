"""`onnx-dacomp compress MODEL.onnx -o OUT.onnx [--data SOURCE | --stats STATS.npz]`: the main job."""

from __future__ import annotations

import argparse
import time

from ..calibration.statistics import load_statistics
from ..config import GROUPS, CompressConfig, FitConfig, PlanConfig, RuntimeConfig, VerifyConfig
from ..exports import sensitivity_csv
from ..html_report import compress_html
from ..load import load_model
from ..log import logger
from ..pipeline import compress
from ..save import check_output, file_size, save_model
from .calibrate_command import DATA_HELP
from .options import add_data_options, add_options, data_config, values
from .outputs import add_report_options, check_outputs, write_report, write_text


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compress",
        help="write a smaller model: calibrate, decompose, rewrite, verify",
        description="Calibrate on data, choose ranks for a budget or an accuracy target, fit each chosen layer "
        "as a chain of smaller layers, rewrite, verify on held-out data and save.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="ONNX model file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="compressed model to write")
    add_report_options(parser)
    parser.add_argument(
        "--data", metavar="SOURCE", help=DATA_HELP + " (default: natural, unless --stats or --norm frobenius)"
    )
    parser.add_argument(
        "--stats", metavar="STATS.npz", help="statistics from `onnx-dacomp calibrate` instead of --data"
    )
    add_data_options(parser)
    add_options(parser, PlanConfig, title="ranks")
    add_options(parser, FitConfig, title="fit")
    add_options(parser, VerifyConfig, title="verification")
    add_options(parser, RuntimeConfig, title="runtime")


EXAMPLES = """examples:
  onnx-dacomp compress model.onnx -o small.onnx --data images/ --ratio 0.5
  onnx-dacomp compress model.onnx -o small.onnx --data images/ --mean 0.485,0.456,0.406 \\
      --std 0.229,0.224,0.225 --method auto --max-drop 1.0 --report report.html
  onnx-dacomp compress model.onnx -o small.onnx --data samples.npz --input-shape input:-1x512 \\
      --batch-axis state:1 --budget macs --ratio 0.6
  onnx-dacomp compress model.onnx -o small.onnx --stats stats.npz --ranks ranks.json
"""


def config_from_args(args: argparse.Namespace) -> CompressConfig:
    stages = {name: cls(**values(args, cls)) for name, cls in GROUPS.items() if name != "data"}
    return CompressConfig(data=data_config(args), **stages)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    check_output(args.output, protect=args.model)  # fail before the slow part
    check_outputs(args.report, (args.sensitivity_csv,), protect=args.model)
    config = config_from_args(args)
    model = load_model(args.model)
    statistics = load_statistics(args.stats) if args.stats else None
    result = compress(model, args.data, config, statistics=statistics, progress=not args.quiet)
    save_model(result.model, args.output, protect=args.model)
    report = result.report
    write_report(args.report, report.to_json, lambda: compress_html(report, f"onnx-dacomp compress {args.model}"))
    if args.sensitivity_csv:
        write_text(args.sensitivity_csv, sensitivity_csv(report.layers, result.tables, result.pruned))
    before, after = file_size(args.model), file_size(args.output)
    logger.info(
        "%s: %.2f MB -> %.2f MB (%.1f%%) in %.0f s",
        args.output,
        before / 1e6,
        after / 1e6,
        100 * after / max(before, 1),
        time.perf_counter() - start,
    )
    return 0
