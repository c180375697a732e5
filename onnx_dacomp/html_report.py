"""The HTML report (`--report REPORT.html` of `compress` and `sweep`): one self-contained page (inline SVG
plots from matplotlib, inline CSS, no script, nothing fetched) with the run's summary, the trade-off curve,
per-layer charts and the tables beneath. Every number cell carries its exact value in `data-value`, the value
the JSON report holds."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence

from .report import CompressionReport, LayerReport, latency_line, summary_figures, verification_line

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { padding: 0.2em 0.6em; border-bottom: 1px solid #eee; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.pareto td:first-child { font-weight: bold; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""
LAYER_COLUMNS = (
    ("name", "layer"), ("op_type", "op"), ("method", "method"), ("ranks", "ranks"),
    ("params_before", "params before"), ("params_after", "params after"), ("macs_before", "MACs before"),
    ("macs_after", "MACs after"), ("rel_error", "fitted error"), ("estimated_error", "estimated error"),
    ("sensitivity", "sensitivity"), ("latency_before", "layer ms"), ("latency_after", "chain ms"), ("reason", "reason"),
)  # fmt: skip
POINT_COLUMNS = (
    ("ratio", "ratio"), ("params", "params kept"), ("macs", "MACs kept"), ("model_params", "model params"),
    ("model_bytes", "file bytes"), ("rel_output_error", "rel. output error"), ("rel_output_error_low", "low"),
    ("rel_output_error_high", "high"), ("top1_agreement", "top-1 agreement"), ("top1_agreement_low", "low"),
    ("top1_agreement_high", "high"), ("top1", "top-1"), ("top1_low", "low"), ("top1_high", "high"),
    ("samples", "held-out samples"),
)  # fmt: skip
LATENCY_COLUMNS = (("", ""), ("_low", " low"), ("_high", " high"))  # the ratio and its 95 % interval


def compress_html(report: CompressionReport, title: str) -> str:
    """The page of one `compress` run."""
    point = summary_figures(report) | {"latency": _latencies(report), "pareto": True}
    top1 = report.verification.top1_original if report.verification else None
    body = [
        f"<h1>{_text(title)}</h1>",
        _section("Summary", _summary_table(report), f"<pre>{_text(_closing_lines(report))}</pre>"),
        _section("Trade-off", _figure("tradeoff-curve", tradeoff_figure([point], report.estimated_curve, top1))),
        _section("Per layer", *_layer_parts(report, "layer")),
    ]
    return _page(title, body)


def sweep_html(result, title: str) -> str:
    """The page of a `sweep` (`sweep.SweepResult`): the points' table and curve, then each point's layers."""
    rows, points = result.rows(), sweep_points(result)
    curve = result.points[0].report.estimated_curve if result.points else ()
    batches = sorted({batch for point in points for batch in point["latency"]})
    latency = [(f"latency_b{b}{key}", f"latency b{b}{label}") for b in batches for key, label in LATENCY_COLUMNS]
    columns = POINT_COLUMNS + tuple(latency) + (("pareto", "Pareto-optimal"),)
    table = _table("points", columns, rows, row_class=lambda row: "pareto" if row["pareto"] else "")
    original = result.original
    summary = [("original parameters", original["params"]), ("original bytes", original["bytes"])]
    summary += [("original top-1", original["top1"])] if original.get("top1") is not None else []
    summary += [("seconds", result.seconds)] + [(key, value) for key, value in result.settings.items()]
    details = [
        f'<details id="point-{index}"{" open" if index == 0 else ""}><summary>ratio {point.ratio:.2f}'
        f"{' (Pareto-optimal)' if point.pareto else ''}</summary>"
        + "".join(_layer_parts(point.report, f"layer-{index}"))
        + f"<pre>{_text(_closing_lines(point.report))}</pre></details>"
        for index, point in enumerate(result.points)
    ]
    body = [
        f"<h1>{_text(title)}</h1>",
        _section("Summary", _key_values("summary-table", summary)),
        _section("Trade-off", _figure("tradeoff-curve", tradeoff_figure(points, curve, original["top1"])), table),
        _section("Per layer, at each ratio", *details),
    ]
    return _page(title, body)


def sweep_points(result) -> list[dict]:
    """The points of a `sweep.SweepResult` as `tradeoff_figure` takes them."""
    return [row | {"latency": _latencies(point.report)} for row, point in zip(result.rows(), result.points)]


def _latencies(report: CompressionReport) -> dict:
    return {item.batch: (item.ratio, item.ratio_low, item.ratio_high) for item in report.latency}


def tradeoff_figure(points: Sequence[dict], estimated: Sequence[dict], original_top1: float | None = None) -> str:
    """`plot_tradeoff` as inline SVG."""
    return _svg(plot_tradeoff(points, estimated, original_top1))


def plot_tradeoff(points: Sequence[dict], estimated: Sequence[dict], original_top1: float | None = None):
    """A matplotlib figure: relative output error (and top-1 where labelled) against params kept, MACs kept
    and latency ratio: the measured points (Pareto-optimal ones filled), the allocation's estimated curve and
    the original's top-1."""
    plt = _pyplot()
    with_top1 = any(point.get("top1") is not None for point in points)
    figure, axes = plt.subplots(2 if with_top1 else 1, 3, figsize=(13, 7.5 if with_top1 else 4), squeeze=False)
    for row, (key, label) in enumerate(
        [("rel_output_error", "relative output error")] + [("top1", "top-1")] * with_top1
    ):
        for column, unit in enumerate(("params", "macs")):
            axis = axes[row][column]
            if key == "rel_output_error" and estimated:
                axis.plot([p[unit] for p in estimated], [p["estimated_output_error"] for p in estimated], "--",
                          color="0.6", label="estimated (sensitivities)")  # fmt: skip
            measured = [p for p in points if p.get(key) is not None]
            axis.plot([p[unit] for p in measured], [p[key] for p in measured], "-", color="C0", alpha=0.5)
            for p in measured:  # with the figure's 95 % interval where there is one
                spread = [[p[key] - p.get(f"{key}_low", p[key])], [p.get(f"{key}_high", p[key]) - p[key]]]
                axis.errorbar(p[unit], p[key], yerr=spread, fmt="o", color="C0", capsize=2,
                              fillstyle="full" if p["pareto"] else "none")  # fmt: skip
            axis.set_xlabel(f"{'parameters' if unit == 'params' else 'MACs'} kept (decomposable layers)")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
            if key == "rel_output_error" and estimated:
                axis.legend(fontsize=8)
        if key == "top1" and original_top1 is not None:
            for axis in axes[row]:
                axis.axhline(original_top1, color="0.4", linestyle=":", linewidth=1, label="original")
            axes[row][0].legend(fontsize=8)
        axis = axes[row][2]
        batches = sorted({batch for point in points for batch in point["latency"]})
        for index, batch in enumerate(batches):
            timed = [p for p in points if batch in p["latency"] and p.get(key) is not None]
            ratios = [p["latency"][batch] for p in timed]
            spread = [[r[0] - r[1] for r in ratios], [r[2] - r[0] for r in ratios]]
            axis.errorbar([r[0] for r in ratios], [p[key] for p in timed], xerr=spread, fmt="o",
                          color=f"C{index + 1}", label=f"batch {batch}")  # fmt: skip
        axis.axvline(1.0, color="0.6", linewidth=0.8)
        axis.set_xlabel("latency ratio, compressed / original (95% interval)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if batches:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "latency not measured", ha="center", transform=axis.transAxes)
    figure.tight_layout()
    return figure


def layer_figure(layers: Sequence[LayerReport]) -> str:
    """Per-layer bars, one row per layer: params and MACs before/after, ranks, fitted (and estimated)
    error, measured sensitivity, and chain time against the layer's where measured."""
    plt = _pyplot()
    timed = any(layer.latency_before is not None for layer in layers)
    panels = 6 if timed else 5
    height = max(3.0, 0.22 * len(layers) + 1.2)
    figure, axes = plt.subplots(1, panels, figsize=(3.2 * panels, height), sharey=True)
    names = [layer.name for layer in layers]
    positions = list(range(len(layers)))
    for axis, (before, after, label) in zip(axes, (("params_before", "params_after", "parameters"),
                                                    ("macs_before", "macs_after", "MACs"))):  # fmt: skip
        axis.barh(positions, [getattr(layer, before) for layer in layers], color="0.8", label="before")
        axis.barh(positions, [getattr(layer, after) for layer in layers], height=0.5, color="C0", label="after")
        axis.set_xlabel(label)
        axis.legend(fontsize=7)
    axis = axes[2]
    for index in range(2):
        values = [layer.ranks[index] if layer.ranks and len(layer.ranks) > index else 0 for layer in layers]
        axis.barh([p + 0.2 * (index * 2 - 1) for p in positions], values, height=0.4, color=f"C{index + 1}",
                  label=("rank (R, or R_T)", "R_S (Tucker-2)")[index])  # fmt: skip
    axis.set_xlabel("ranks")
    axis.legend(fontsize=7)
    axis = axes[3]
    fitted = [(p, layer) for p, layer in zip(positions, layers) if layer.method and layer.rel_error > 0]
    axis.barh([p for p, _ in fitted], [layer.rel_error for _, layer in fitted], color="C3", label="fitted")
    estimated = [(p, layer.estimated_error) for p, layer in fitted if layer.estimated_error]
    axis.plot([e for _, e in estimated], [p for p, _ in estimated], "|", color="k", markersize=8, label="estimated")
    _log_scale(axis, [layer.rel_error for _, layer in fitted])
    axis.set_xlabel("relative layer error")
    axis.legend(fontsize=7)
    axis = axes[4]
    sensitive = [(p, layer.sensitivity) for p, layer in zip(positions, layers) if layer.sensitivity]
    axis.barh([p for p, _ in sensitive], [s for _, s in sensitive], color="C4")
    _log_scale(axis, [s for _, s in sensitive])
    axis.set_xlabel("sensitivity (output / layer error)")
    if timed:
        axis = axes[5]
        axis.barh(positions, [layer.latency_before or 0 for layer in layers], color="0.8", label="layer alone")
        axis.barh(positions, [layer.latency_after or 0 for layer in layers], height=0.5, color="C5", label="chain")
        axis.set_xlabel("ms in onnxruntime (less the one-layer overhead)")
        axis.legend(fontsize=7)
    axes[0].set_yticks(positions, names, fontsize=7)
    axes[0].invert_yaxis()
    for axis in axes:
        axis.grid(axis="x", alpha=0.3)
    return _svg(figure)


def _layer_parts(report: CompressionReport, prefix: str) -> list[str]:
    rows = [_layer_values(layer) for layer in report.layers]
    chart = layer_figure(report.layers)  # every layer of the report: the kept ones (and why) too
    return [_figure(f"{prefix}-charts", chart), _table(f"{prefix}-table", LAYER_COLUMNS, rows)]


def _layer_values(layer: LayerReport) -> dict:
    values = {key: getattr(layer, key) for key, _ in LAYER_COLUMNS}
    values["ranks"] = "x".join(map(str, layer.ranks)) if layer.ranks else None
    return values


def _summary_table(report: CompressionReport) -> str:
    totals, model = report.totals, report.model_totals
    items = [
        ("calibration", report.calibration), ("budget", report.budget), ("target ratio", report.target_ratio),
        ("ratio reached", report.ratio), ("layers counted", totals["layers"]),
        ("layers compressed", len(report.compressed)),
    ]  # fmt: skip
    items += [(f"counted {key.replace('_', ' ')}", totals[key]) for key in ("params_before", "params_after")]
    items += [(f"counted {key.replace('_', ' ')}", totals[key]) for key in ("macs_before", "macs_after")]
    items += [(f"model {key.replace('_', ' ')}", value) for key, value in model.items()]
    if report.verification is not None:
        verification = report.verification
        items += [("held-out samples", verification.samples), ("relative output error", verification.rel_output_error)]
        items += [("top-1 agreement", verification.top1_agreement), ("top-1 original", verification.top1_original)]
        items += [("top-1 compressed", verification.top1_compressed)]
    items += [(f"seconds: {stage}", value) for stage, value in report.seconds.items()]
    items += [(f"setting: {key}", value) for key, value in report.settings.items()]
    return _key_values("summary-table", items)


def _closing_lines(report: CompressionReport) -> str:
    lines = [verification_line(report.verification)] + [latency_line(item) for item in report.latency]
    return "\n".join(lines)


def _key_values(table_id: str, items) -> str:
    rows = "".join(f"<tr><th>{_text(key)}</th>{_cell(value)}</tr>" for key, value in items)
    return f'<table id="{table_id}">{rows}</table>'


def _table(table_id: str, columns, rows: Sequence[dict], row_class=None) -> str:
    head = "".join(f"<th>{_text(label)}</th>" for _, label in columns)
    body = []
    for row in rows:
        css = row_class(row) if row_class else ""
        cells = "".join(_cell(row.get(key), key) for key, _ in columns)
        body.append(f"<tr{f' class={chr(34)}{css}{chr(34)}' if css else ''}>{cells}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _cell(value, key: str = "") -> str:
    """A cell: numbers right-aligned and readable, with the exact value in `data-value`."""
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float)):
        text = "" if value is None else "yes" if value is True else "" if value is False else str(value)
        attribute = f' data-key="{key}"' if key else ""
        return f"<td{attribute}>{_text(text)}</td>"
    shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    return f'<td class="number" data-key="{key}" data-value="{value!r}">{shown}</td>'


def _section(title: str, *parts: str) -> str:
    anchor = title.lower().split(",")[0].replace(" ", "-")
    return f'<section id="{anchor}"><h2>{_text(title)}</h2>{"".join(parts)}</section>'


def _figure(figure_id: str, svg: str) -> str:
    return f'<figure id="{figure_id}">{svg}</figure>'


def _page(title: str, body: Sequence[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_text(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _text(value) -> str:
    return html.escape(str(value))


def _log_scale(axis, values) -> None:
    if values and min(values) > 0 and max(values) / min(values) > 20:
        axis.set_xscale("log")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to files only
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller pages, searchable labels
    matplotlib.rcParams["svg.hashsalt"] = "onnx-dacomp"  # the same report gives the same bytes
    import matplotlib.pyplot as plt

    return plt


def _svg(figure) -> str:
    stream = io.StringIO()
    figure.tight_layout()
    figure.savefig(stream, format="svg", metadata={"Date": None})
    _pyplot().close(figure)
    text = stream.getvalue()
    return text[text.index("<svg") :]  # the inline element, without the XML prolog and doctype
