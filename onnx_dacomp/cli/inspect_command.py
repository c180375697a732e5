"""`onnx-dacomp inspect MODEL.onnx [--json]`: the Conv layers of a model, what can be decomposed and why not."""

from __future__ import annotations

import argparse
import json
import sys

from ..api import inspect
from ..config import DataConfig
from ..targets import TargetScan
from .options import add_options, values


def add_parser(commands) -> None:
    parser = commands.add_parser("inspect", help="list the Conv layers of a model with params and MACs")
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_options(parser, DataConfig, only=("input_shapes",))


def run(args: argparse.Namespace) -> int:
    scan = inspect(args.model, DataConfig(**values(args, DataConfig)))
    if args.json:
        json.dump(scan_to_json(args.model, scan), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(scan))
    return 0


def _totals(layers) -> dict:
    params = [layer.params for layer in layers]
    macs = [layer.macs for layer in layers]
    return {
        "layers": len(layers),
        "params": sum(p for p in params if p is not None),
        "macs": None if any(m is None for m in macs) else sum(macs),
    }


def scan_to_json(model_path: str, scan: TargetScan) -> dict:
    return {
        "model": str(model_path),
        "layers": [layer.describe() for layer in scan.layers],
        "totals": {
            "all": _totals(scan.layers),
            "decomposable": _totals(scan.targets),
        },
    }


def _fmt(value) -> str:
    return "?" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def format_table(scan: TargetScan) -> str:
    header = ("layer", "kernel", "in", "out", "stride", "group", "params", "MACs", "decomposable")
    rows = []
    for layer in scan.layers:
        info = layer.describe()
        rows.append(
            (
                info["name"],
                "x".join(map(str, info["kernel"])) or "?",
                _fmt(info["in_channels"]),
                _fmt(info["out_channels"]),
                "x".join(map(str, info["stride"])) or "?",
                str(info["group"]),
                _fmt(info["params"]),
                _fmt(info["macs"]),
                "yes" if info["decomposable"] else f"no: {info['reason']}",
            )
        )
    totals = {"all": _totals(scan.layers), "decomposable": _totals(scan.targets)}
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    numeric = {2, 3, 6, 7}

    def line(row) -> str:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells + [row[-1]]).rstrip() + "\n"

    out = [line(header), line(tuple("-" * w for w in widths) + ("-" * 12,))]
    out += [line(row) for row in rows]
    out.append("\n")
    for label, total in totals.items():
        out.append(
            f"{label:>13}: {total['layers']} layers, {_fmt(total['params'])} params, "
            f"{_fmt(total['macs'])} MACs per image\n"
        )
    if totals["all"]["macs"] is None:
        out.append("MACs marked ? depend on dynamic input dims: pass --input-shape NAME:NxCxHxW\n")
    return "".join(out)
