"""A ratio sweep: the statistics, candidate tables and sensitivities computed once (`prepare.prepare`), then a
model per ratio, each verified and timed as `compress` would; the points that no other point beats on size,
speed and accuracy at once are marked Pareto-optimal."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import onnx

from .calibration.sources import Source
from .calibration.statistics import Statistics
from .config import CompressConfig
from .errors import UserError
from .job import CompressionResult
from .log import logger
from .prepare import prepare
from .ranks.candidates import CandidateTable
from .report import CompressionReport, jsonable, summary_figures
from .runtime import blas_threads
from .workers import executor

DEFAULT_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.75)


@dataclass(frozen=True)
class SweepPoint:
    ratio: float
    report: CompressionReport
    pareto: bool = False

    def figures(self) -> dict:
        """The point's row: sizes kept (counted layers and whole model), held-out accuracy with intervals,
        latency ratios."""
        return {"ratio": self.ratio} | summary_figures(self.report) | {"pareto": self.pareto}


@dataclass(frozen=True, eq=False)
class SweepResult:
    points: tuple[SweepPoint, ...]
    original: dict  # the original model: params, bytes, top-1 on the held-out data
    seconds: float
    tables: dict[str, CandidateTable]
    settings: dict
    pruned: dict = field(default_factory=dict)  # as `CompressionResult.pruned`

    def rows(self) -> list[dict]:
        return [point.figures() for point in self.points]

    def to_dict(self) -> dict:
        return {
            "points": [point.figures() | {"report": point.report.to_dict()} for point in self.points],
            "original": self.original,
            "seconds": self.seconds,
            "settings": self.settings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=jsonable)

    def to_csv(self) -> str:
        rows = self.rows()
        columns = list(dict.fromkeys(key for row in rows for key in row))
        stream = io.StringIO()
        writer = csv.DictWriter(stream, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return stream.getvalue()

    def table(self) -> str:
        """The points as a terminal table, Pareto-optimal ones marked with *."""
        batches = sorted({item.batch for point in self.points for item in point.report.latency})
        header = ["ratio", "params", "MACs", "file MB", "rel.err", "agreement", "top-1"]
        header += [f"latency b{batch}" for batch in batches] + ["pareto"]
        lines = [header]
        for point, row in zip(self.points, self.rows()):
            cells = [
                f"{row['ratio']:.2f}", f"{row['params']:.1%}", f"{row['macs']:.1%}", f"{row['model_bytes'] / 1e6:.2f}",
                _spread(row, "rel_output_error", "{:.4f}", "{:.3f}"),
                _spread(row, "top1_agreement", "{:.2%}", "{:.1%}"), _spread(row, "top1", "{:.2%}", "{:.1%}"),
            ]  # fmt: skip
            cells += [_spread(row, f"latency_b{batch}", "{:.3f}", "{:.3f}") for batch in batches]
            lines.append(cells + ["*" if point.pareto else ""])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "-" * len(text[0]))
        original, samples = self.original, self.rows()[0]["samples"] if self.points else None
        top1 = f", top-1 {original['top1']:.2%}" if original.get("top1") is not None else ""
        text.append(
            f"original: {original['params']:,} parameters, {original['bytes'] / 1e6:.2f} MB{top1}; latency: ratio of "
            f"the compressed model's to the original's (median, 95% interval); *: Pareto-optimal (no other point is "
            f"smaller, faster and more accurate at once); held-out figures with 95% intervals on {samples} samples"
        )
        return "\n".join(text)


def _spread(row: dict, key: str, fmt: str, bounds: str) -> str:
    """A figure with its 95 % interval, where the row has them."""
    if row.get(key) is None:
        return ""
    text = fmt.format(row[key])
    if f"{key}_low" in row:
        text += f" [{bounds.format(row[key + '_low'])}, {bounds.format(row[key + '_high'])}]"
    return text


def pareto_flags(rows: Sequence[dict]) -> list[bool]:
    """Whether each point is Pareto-optimal: no other point is at least as good in every respect (whole-model
    parameters, MACs, latency ratios where measured, and accuracy: top-1, else agreement, else output error)
    and better in one."""

    def scores(row: dict) -> tuple:  # lower is better in each
        accuracy = next(
            (-row[key] for key in ("top1", "top1_agreement") if row.get(key) is not None),
            row.get("rel_output_error") or 0.0,
        )
        latencies = tuple(row[key] for key in sorted(row) if key.startswith("latency_b") and key[9:].isdigit())
        return (row["model_params"], row["macs"], *latencies, accuracy)

    points = [scores(row) for row in rows]

    def dominated(mine: tuple) -> bool:
        return any(
            len(other) == len(mine) and all(o <= m for o, m in zip(other, mine)) and other != mine for other in points
        )

    return [not dominated(point) for point in points]


def sweep(
    model: onnx.ModelProto | str | os.PathLike,
    data: Source | Iterable | str | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    config: CompressConfig = CompressConfig(),
    *,
    statistics: Statistics | None = None,
    progress: bool = True,
    on_model: Callable[[float, CompressionResult], None] | None = None,
) -> SweepResult:
    """The model at each of `ratios` (of `config.plan.budget`), built from one calibration, one set of
    candidate tables and sensitivities: each is the model `compress` gives at that ratio with the same
    config. `on_model(ratio, result)` receives each (to save it); the result keeps the reports only."""
    options = config.plan
    if options.ratio is not None or options.targeted or options.speedup is not None or options.ranks:
        raise UserError("sweep sets the ratio itself: give --ratios instead of --ratio, --max-*, --speedup or --ranks")
    ratios = sorted(set(ratios))
    if not ratios or not all(0 < ratio <= 1 for ratio in ratios):
        raise UserError(f"--ratios takes ratios in (0, 1], got {list(ratios)}")
    start = time.perf_counter()
    with blas_threads(), executor(config.runtime.workers, config.runtime.ray) as workers:
        with tempfile.TemporaryDirectory(prefix="onnx-dacomp-") as scratch:
            job = prepare(model, data, config, statistics, progress, workers, scratch, budgeted=True)
            logger.info("sweep: shared parts in %.0f s; %d ratios to go", time.perf_counter() - start, len(ratios))
            reports, first = [], time.perf_counter()
            for index, ratio in enumerate(ratios, 1):
                logger.info("sweep: ratio %.2f (%d of %d)", ratio, index, len(ratios))
                result = job.result(ratio)
                if on_model is not None:
                    on_model(ratio, result)
                reports.append(result.report)
                each = (time.perf_counter() - first) / index
                logger.info(
                    "sweep: %d of %d ratios done, %.0f s each; about %.0f s left",
                    index, len(ratios), each, each * (len(ratios) - index),
                )  # fmt: skip
    rows = [SweepPoint(ratio, report).figures() for ratio, report in zip(ratios, reports)]
    points = tuple(
        SweepPoint(ratio, report, pareto) for ratio, report, pareto in zip(ratios, reports, pareto_flags(rows))
    )
    settings = {k: v for k, v in config.options().items() if k != "input_shapes"} | {"ratios": list(ratios)}
    seconds = round(time.perf_counter() - start, 3)
    result = SweepResult(points, _original(reports[0]), seconds, job.tables, settings, job.pruned_probes)
    logger.info("%s", result.table())
    return result


def _original(report: CompressionReport) -> dict:
    """The original model's parameters, bytes and held-out top-1, as the first point's report measured them."""
    totals, verification = report.model_totals, report.verification
    top1 = verification.top1_original if verification is not None else None
    return {"params": totals["params_before"], "bytes": totals["bytes_before"], "top1": top1}
