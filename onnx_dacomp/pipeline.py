"""The main job: `compress(model_or_path, data=..., config=...)` prepares the shared parts (`prepare.prepare`:
load -> targets -> calibrate -> problems -> tables -> sensitivities), chooses the ratio (given, or searched
for an accuracy or speed target) and builds, verifies and reports the model at that ratio. The CLI's
`compress` command calls it and saves the model.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import onnx

from .calibration.sources import Source
from .calibration.statistics import Statistics
from .config import CompressConfig
from .errors import UserError
from .job import CompressionJob, CompressionResult
from .padding import fold_pads
from .prepare import prepare
from .runtime import blas_threads
from .search import largest_ratio_at_speed, smallest_ratio
from .workers import executor

__all__ = ["CompressionResult", "compress"]


def compress(
    model: onnx.ModelProto | str | os.PathLike,
    data: Source | Iterable | str | None = None,
    config: CompressConfig = CompressConfig(),
    *,
    statistics: Statistics | None = None,
    progress: bool = True,
) -> CompressionResult:
    """Compress `model` (a ModelProto, never modified, or a path) as `config` says.

    `data`: calibration data (a `Source`, a spec such as an image folder or `.npz` path, or any iterable of
    `{input_name: array}` batches); None calibrates on crops of natural photographs. Sources of known size
    give their first `config.verify.holdout` samples to verification and calibrate on the rest.
    `statistics`: precomputed statistics of this model (then `data`, if given, serves verification only).
    """
    with blas_threads(), executor(config.runtime.workers, config.runtime.ray) as workers:
        with tempfile.TemporaryDirectory(prefix="onnx-dacomp-") as scratch:  # large statistics wait here
            job = prepare(model, data, config, statistics, progress, workers, scratch)
            ratio, search = chosen_ratio(job)
            return job.result(ratio, search)


def chosen_ratio(job: CompressionJob) -> tuple[float | None, dict | None]:
    """The configured ratio, or the one a search finds: the smallest that meets an accuracy target, the
    largest that meets a speed target (with the search's record)."""
    options = job.config.plan
    if options.targeted:
        if job.holdout is None:
            raise UserError("--max-drop/--min-agreement/--max-error need held-out data: pass --data and --holdout N")
        return smallest_ratio(lambda r: job.verify(job.build(job.planned(r)[0])[0], False), options)
    if options.speedup is not None:  # each probe: the model at that ratio timed against the original
        probe = lambda ratio: job.speed_probe(job.planned(ratio)[0])  # noqa: E731
        return largest_ratio_at_speed(probe, options.speedup, faster_whole=bool(fold_pads(job.model).folded))
    return options.target_ratio, None
