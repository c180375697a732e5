"""`onnx-dacomp compress MODEL.onnx -o OUT.onnx (--data SOURCE | --stats STATS.npz)`: the main job."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..calibrate.statistics import load_statistics
from ..config import ALLOCATIONS, BUDGETS, METHODS, NORMS, CompressConfig
from ..errors import UserError
from ..load import load_model
from ..log import logger
from ..pipeline import NATURAL_NOTICE, compress
from ..save import check_output, save_model, write_atomically
from ..shapes import parse_input_shapes
from .data_options import add_data_arguments, add_runtime_arguments, positive_int, source_from_args


def add_parser(commands) -> None:
    parser = commands.add_parser("compress", help="write a smaller model: calibrate, decompose, rewrite, verify")
    parser.add_argument("model", help="ONNX model file (never modified)")
    parser.add_argument("-o", "--output", required=True, help="compressed model to write")
    parser.add_argument(
        "--stats", metavar="STATS.npz", help="statistics from `onnx-dacomp calibrate` instead of --data"
    )
    parser.add_argument("--method", choices=METHODS, default="tucker2", help="decomposition (default tucker2)")
    parser.add_argument(
        "--norm", choices=NORMS, default="sigma", help="sigma: distribution-aware (default); frobenius: data-free"
    )
    parser.add_argument("--ratio", type=_ratio, help="target size of the conv part relative to before (default 0.5)")
    parser.add_argument(
        "--max-drop", type=float, metavar="POINTS", help="instead of --ratio: smallest model within this top-1 drop"
    )
    parser.add_argument(
        "--min-agreement", type=float, metavar="FRACTION", help="instead of --ratio: smallest model with this agreement"
    )
    parser.add_argument("--budget", choices=BUDGETS, default="params", help="what --ratio counts (default params)")
    parser.add_argument(
        "--allocation", choices=ALLOCATIONS, default="allocated", help="ranks across layers (default allocated)"
    )
    parser.add_argument("--ranks", metavar="RANKS.json", help='exact ranks per layer, e.g. {"conv1": [16, 8]}')
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="glob patterns of layers to keep")
    parser.add_argument(
        "--rank-multiple",
        type=_rank_multiple,
        default=None,
        metavar="N|auto",
        help="round ranks to multiples of N (default auto: the execution provider's channel block)",
    )
    parser.add_argument(
        "--holdout", type=int, default=500, help="samples kept out of calibration for verification (default 500)"
    )
    parser.add_argument("--max-iter", type=int, default=100, help="ALS sweeps per layer at most (default 100)")
    parser.add_argument("--bias-refit", action="store_true", help="refit biases (centered covariance); never worse")
    parser.add_argument(
        "--propagate", action="store_true", help="fit each layer on the input the compressed layers before it give"
    )
    parser.add_argument(
        "--no-sensitivity",
        dest="sensitivity",
        action="store_false",
        help="count every layer's error alike in the allocation (default: weighted by measured output sensitivity)",
    )
    parser.add_argument(
        "--require-speedup",
        action="store_true",
        help="time each chain against its layer in onnxruntime; keep the layer where the chain is not faster",
    )
    parser.add_argument("--benchmark", action="store_true", help="time both models end to end (in the report)")
    parser.add_argument(
        "--speed-batch", type=positive_int, default=1, help="batch size for --require-speedup timing (default 1)"
    )
    parser.add_argument("--report", metavar="REPORT.json", help="write the report as JSON")
    add_data_arguments(parser, required=False)
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, protect=args.model)  # fail before the slow part
    if args.report:
        check_output(args.report, protect=args.model)
    input_shapes = parse_input_shapes(args.input_shape)
    ranks = _read_ranks(args.ranks) if args.ranks else {}
    targeted = args.max_drop is not None or args.min_agreement is not None
    if targeted and args.ratio is not None:
        raise UserError("--ratio and --max-drop/--min-agreement exclude each other: the search sets the ratio")
    ratio = args.ratio if args.ratio is not None else (None if ranks or targeted else 0.5)
    random_data = args.data == "random"
    config = CompressConfig(
        method=args.method,
        norm=args.norm,
        ratio=ratio,
        budget=args.budget,
        allocation=args.allocation,
        ranks=ranks,
        exclude=tuple(args.exclude),
        rank_multiple=args.rank_multiple,
        device=args.device,
        seed=args.seed,
        holdout=args.holdout,
        limit=None if random_data else args.limit,
        max_iter=args.max_iter,
        bias_refit=args.bias_refit,
        propagate=args.propagate,
        sensitivity=args.sensitivity,
        max_drop=args.max_drop,
        min_agreement=args.min_agreement,
        require_speedup=args.require_speedup,
        benchmark=args.benchmark,
        speed_batch=args.speed_batch,
        input_shapes=input_shapes,
    )
    model = load_model(args.model)
    statistics = load_statistics(args.stats) if args.stats else None
    if args.data is None and statistics is None and args.norm == "sigma":
        logger.info(NATURAL_NOTICE)
        args.data = "natural"
    data = source_from_args(args, model, input_shapes, apply_limit=random_data) if args.data else None
    result = compress(model, data, config, statistics=statistics, progress=not args.quiet)
    save_model(result.model, args.output, protect=args.model)
    if args.report:
        write_atomically(args.report, lambda stream: stream.write(result.report.to_json().encode()))
    return 0


def _read_ranks(path: str) -> dict:
    try:
        ranks = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read --ranks file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--ranks file {path} is not valid JSON: {exc}") from None
    if not isinstance(ranks, dict):
        raise UserError(f"--ranks file {path} must hold an object mapping layer names to ranks")
    return ranks


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _rank_multiple(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}") from None
