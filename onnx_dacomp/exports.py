"""Per-layer sensitivity export (`--sensitivity-csv`): each layer's measured sensitivity and, for every
candidate of its table, the estimated layer error and the output error it would add (sensitivity times
layer error, the allocation's first-order model)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

from .methods import get
from .ranks.candidates import CandidateTable
from .report import LayerReport

COLUMNS = (
    "layer", "sensitivity", "method", "ranks", "params", "macs", "params_before", "macs_before",
    "estimated_layer_error", "added_output_error",
)  # fmt: skip


def sensitivity_rows(
    layers: Sequence[LayerReport], tables: Mapping[str, CandidateTable], pruned: Mapping[str, tuple] | None = None
) -> list[dict]:
    """One row per candidate of every layer with a table, in graph order; a layer without one (kept, or fitted
    at exact ranks) gets one row with its sensitivity alone. `pruned` (`auto`'s groups: layer -> (its low-rank
    and its pruned probe's sensitivity, the layers computing its input channels)): a pruned candidate's row has
    the pruned sensitivity, and its costs before hold those layers too (its cost holds their sliced share);
    the layer's other rows the low-rank one."""
    rows, pruned, reports = [], pruned or {}, {layer.name: layer for layer in layers}
    for layer in layers:
        table, sensitivity = tables.get(layer.name), layer.sensitivity
        if layer.name in pruned:  # the report holds the chosen option's; the low-rank rows take the low-rank one
            sensitivity = pruned[layer.name][0]
        base = {"layer": layer.name, "sensitivity": sensitivity, "params_before": layer.params_before}
        base["macs_before"] = layer.macs_before
        if table is None:
            rows.append(base)
            continue
        for candidate in table.candidates:
            error = None if math.isnan(candidate.error) else candidate.error
            row = base
            if layer.name in pruned and get(candidate.method).prunes_inputs:
                _, weight, producers = pruned[layer.name]
                members = [layer, *(reports[name] for name in producers)]
                row = base | {
                    "sensitivity": weight, "params_before": sum(m.params_before for m in members),
                    "macs_before": sum(m.macs_before for m in members),
                }  # fmt: skip
            rows.append(
                row | {
                    "method": candidate.method, "ranks": "x".join(map(str, candidate.ranks)),
                    "params": candidate.cost.params, "macs": candidate.cost.macs, "estimated_layer_error": error,
                    "added_output_error": None if error is None else (row["sensitivity"] or 1.0) * error,
                }
            )  # fmt: skip
    return rows


def sensitivity_csv(
    layers: Sequence[LayerReport], tables: Mapping[str, CandidateTable], pruned: Mapping[str, tuple] | None = None
) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sensitivity_rows(layers, tables, pruned))
    return stream.getvalue()
