"""Per-layer sensitivity export (`--sensitivity-csv`): each layer's measured sensitivity and, for every
candidate of its table, the estimated layer error and the output error it would add (sensitivity times
layer error, the allocation's first-order model)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

from .ranks.candidates import CandidateTable
from .report import LayerReport

COLUMNS = (
    "layer", "sensitivity", "method", "ranks", "params", "macs", "params_before", "macs_before",
    "estimated_layer_error", "added_output_error",
)  # fmt: skip


def sensitivity_rows(layers: Sequence[LayerReport], tables: Mapping[str, CandidateTable]) -> list[dict]:
    """One row per candidate of every layer with a table, in graph order; a layer without one (kept, or fitted
    at exact ranks) gets one row with its sensitivity alone."""
    rows = []
    for layer in layers:
        table, sensitivity = tables.get(layer.name), layer.sensitivity
        base = {"layer": layer.name, "sensitivity": sensitivity, "params_before": layer.params_before}
        base["macs_before"] = layer.macs_before
        if table is None:
            rows.append(base)
            continue
        for candidate in table.candidates:
            error = None if math.isnan(candidate.error) else candidate.error
            rows.append(
                base | {
                    "method": candidate.method, "ranks": "x".join(map(str, candidate.ranks)),
                    "params": candidate.cost.params, "macs": candidate.cost.macs, "estimated_layer_error": error,
                    "added_output_error": None if error is None else (sensitivity or 1.0) * error,
                }
            )  # fmt: skip
    return rows


def sensitivity_csv(layers: Sequence[LayerReport], tables: Mapping[str, CandidateTable]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sensitivity_rows(layers, tables))
    return stream.getvalue()
