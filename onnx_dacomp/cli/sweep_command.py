"""`onnx-dacomp sweep MODEL.onnx --data SOURCE [--ratios 0.3,0.5,0.75] [--save-dir DIR]`: one calibration, a
model per ratio, a table of the trade-off (terminal, CSV, JSON or HTML)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..calibration.statistics import load_statistics
from ..config import FitConfig, PlanConfig, RuntimeConfig, VerifyConfig, numbers
from ..errors import UserError
from ..exports import sensitivity_csv
from ..html_report import sweep_html
from ..load import load_model
from ..save import check_output, save_model
from ..sweep import DEFAULT_RATIOS, sweep
from .calibrate_command import DATA_HELP
from .compress_command import config_from_args
from .options import add_data_options, add_options
from .outputs import add_report_options, check_outputs, write_report, write_text


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "sweep",
        help="compress at several ratios from one calibration: the size/accuracy/speed trade-off",
        description="Calibrate once, then build, verify and time the model at each ratio (as `compress` would "
        "at that ratio); print the trade-off with the Pareto-optimal points marked.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="ONNX model file (never modified)")
    parser.add_argument(
        "--ratios", type=_ratios, default=DEFAULT_RATIOS, metavar="R,R,...",
        help=f"the ratios of --budget to build (default {','.join(map(str, DEFAULT_RATIOS))})",
    )  # fmt: skip
    parser.add_argument("--save-dir", metavar="DIR", help="write each point's model there as NAME-BUDGETRATIO.onnx")
    parser.add_argument("--csv", metavar="FILE.csv", help="write the points' table as CSV")
    add_report_options(parser, "every point's report")
    parser.add_argument("--data", metavar="SOURCE", help=DATA_HELP + " (default: natural)")
    parser.add_argument("--stats", metavar="STATS.npz", help="statistics from `onnx-dacomp calibrate`")
    add_data_options(parser)
    add_options(parser, PlanConfig, title="ranks", only=("method", "budget", "exclude", "layer_kinds",
                "rank_multiple", "sensitivity", "sensitivity_samples", "require_speedup"))  # fmt: skip
    add_options(parser, FitConfig, title="fit")
    add_options(parser, VerifyConfig, title="verification")
    add_options(parser, RuntimeConfig, title="runtime")


EXAMPLES = """examples:
  onnx-dacomp sweep model.onnx --data images/ --report sweep.html --csv sweep.csv
  onnx-dacomp sweep model.onnx --data images/ --ratios 0.4,0.5,0.6 --method auto --save-dir small/
"""


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = numbers(text)
    except ValueError:
        values = ()
    if not values or not all(0 < value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give ratios in (0, 1], comma-separated, e.g. 0.3,0.5,0.75")
    return values


def run(args: argparse.Namespace) -> int:
    check_outputs(args.report, (args.csv, args.sensitivity_csv), protect=args.model)
    folder = Path(args.save_dir) if args.save_dir else None
    if folder is not None:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--save-dir {folder} is a file; give a folder (it is created if missing)")
        check_output((folder if folder.is_dir() else folder.parent) / "probe.onnx", protect=args.model)
    config = config_from_args(args)
    model = load_model(args.model)
    statistics = load_statistics(args.stats) if args.stats else None
    # each point's model waits in a staging folder beside --save-dir and moves there only when the whole sweep
    # has succeeded: a failed or interrupted sweep leaves no partial output
    with tempfile.TemporaryDirectory(prefix=".onnx-dacomp-sweep-", dir=folder.parent if folder else None) as staging:
        names = []

        def save(ratio: float, result) -> None:
            if folder is not None:
                names.append(f"{Path(args.model).stem}-{config.plan.budget}{ratio:.2f}.onnx")
                save_model(result.model, Path(staging) / names[-1], protect=args.model)

        result = sweep(
            model, args.data, args.ratios, config, statistics=statistics, progress=not args.quiet, on_model=save
        )
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                os.replace(Path(staging) / name, folder / name)
    write_report(args.report, result.to_json, lambda: sweep_html(result, f"onnx-dacomp sweep {args.model}"))
    write_text(args.csv, result.to_csv())
    if args.sensitivity_csv and result.points:
        write_text(args.sensitivity_csv, sensitivity_csv(result.points[0].report.layers, result.tables, result.pruned))
    return 0
