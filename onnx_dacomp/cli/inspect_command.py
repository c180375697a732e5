"""`onnx-dacomp inspect MODEL.onnx [--json]`: the Conv layers of a model, what can be decomposed and why not."""

from __future__ import annotations

import argparse
import json
import sys

from ..load import load_model
from ..shapes import parse_input_shapes
from ..targets import ConvLayer, TargetScan, find_targets


def add_parser(commands) -> None:
    parser = commands.add_parser("inspect", help="list the Conv layers of a model with params and MACs")
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:NxCxHxW",
        help="fix dynamic input dims, e.g. input:1x3x224x224 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    input_shapes = parse_input_shapes(args.input_shape)
    scan = find_targets(load_model(args.model), input_shapes)
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
        "layers": [_layer_json(layer) for layer in scan.layers],
        "totals": {
            "all": _totals(scan.layers),
            "decomposable": _totals(scan.targets),
        },
    }


def _layer_json(layer: ConvLayer) -> dict:
    return {
        "name": layer.name,
        "op_type": layer.op_type,
        "kernel": list(layer.kernel_shape),
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "stride": list(layer.strides),
        "dilation": list(layer.dilations),
        "group": layer.group,
        "dtype": layer.dtype,
        "params": layer.params,
        "macs": layer.macs,
        "decomposable": layer.decomposable,
        "reason": layer.skip_reason,
    }


def _fmt(value) -> str:
    return "?" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def format_table(scan: TargetScan) -> str:
    header = ("layer", "kernel", "in", "out", "stride", "group", "params", "MACs", "decomposable")
    rows = []
    for layer in scan.layers:
        rows.append(
            (
                layer.name,
                "x".join(map(str, layer.kernel_shape)) or "?",
                _fmt(layer.in_channels),
                _fmt(layer.out_channels),
                "x".join(map(str, layer.strides)) or "?",
                str(layer.group),
                _fmt(layer.params),
                _fmt(layer.macs),
                "yes" if layer.decomposable else f"no: {layer.skip_reason}",
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
