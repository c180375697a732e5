"""`onnx-dacomp inspect MODEL.onnx [--json]`: the layers of a model, what can be decomposed and why not, its
inputs (with their batch axes) and outputs, and its parameters."""

from __future__ import annotations

import argparse
import json
import sys

from ..api import Inspection, inspect
from ..config import DataConfig
from .options import add_options, values


def add_parser(commands) -> None:
    parser = commands.add_parser("inspect", help="list the Conv layers of a model with params and MACs")
    parser.add_argument("model", help="ONNX model file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_options(parser, DataConfig, only=("input_shapes", "batch_axes"))


def run(args: argparse.Namespace) -> int:
    found = inspect(args.model, DataConfig(**values(args, DataConfig)))
    if args.json:
        json.dump(to_json(args.model, found), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(found))
    return 0


def _totals(layers) -> dict:
    params = [layer.params for layer in layers]
    macs = [layer.macs for layer in layers]
    return {
        "layers": len(layers),
        "params": sum(p for p in params if p is not None),
        "macs": None if any(m is None for m in macs) else sum(macs),
    }


def to_json(model_path: str, found: Inspection) -> dict:
    return {
        "model": str(model_path),
        "inputs": [
            {"name": s.name, "dtype": s.dtype.name, "dims": list(s.dims), "batch_axis": s.batch_axis}
            for s in found.inputs.specs
        ],
        "outputs": [{"name": name, "dtype": dtype, "dims": list(dims)} for name, dtype, dims in found.outputs],
        "layers": [layer.describe() for layer in found.layers],
        "totals": {
            "model": {"params": found.params},
            "all": _totals(found.layers),
            "decomposable": _totals(found.targets),
        },
    }


def _fmt(value) -> str:
    return "?" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def format_table(found: Inspection) -> str:
    scan = found.scan
    header = ("layer", "kernel", "in", "out", "stride", "group", "params", "MACs", "decomposable")
    rows = []
    for layer in scan.layers:
        info = layer.describe()
        rows.append(
            (
                info["name"],
                "x".join(map(str, info["kernel"])) or ("-" if info["params"] is not None else "?"),
                _fmt(info["in_channels"]),
                _fmt(info["out_channels"]),
                "x".join(map(str, info["stride"])) or ("-" if info["params"] is not None else "?"),
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
    out.append(f"\n{'model':>13}: {found.params:,} parameters in all (every initializer)\n")
    for label, total in (("layers", totals["all"]), ("decomposable", totals["decomposable"])):
        out.append(
            f"{label:>13}: {total['layers']} layers, {_fmt(total['params'])} params, "
            f"{_fmt(total['macs'])} MACs per sample\n"
        )
    out.append("\ninputs:\n" + "".join(f"  {spec.describe()}\n" for spec in found.inputs.specs))
    out.append("outputs:\n")
    for name, dtype, dims in found.outputs:
        out.append(f"  {name} {dtype} [{', '.join('?' if d is None else str(d) for d in dims)}]\n")
    if totals["all"]["macs"] is None:
        hints = " ".join(f"--input-shape {spec.hint()}" for spec in found.inputs.unknown()) or "--input-shape"
        out.append(f"MACs marked ? depend on dynamic input dims: pass {hints}\n")
    return "".join(out)
