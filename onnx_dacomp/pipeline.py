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
from .job import CompressionJob, CompressionResult, streamlined
from .padding import fold_pads
from .prepare import prepare
from .runtime import blas_threads
from .search import largest_ratio_at_speed, smallest_ratio
from .workers import executor

# a speed probe whose narrow interval still straddles the target is timed on, up to this many times
# --benchmark-seconds: the pessimistic end of its interval decides, and on 10 s ResNet-56's `--speedup 1.6
# --speedup-batch 32` probes spanned up to 0.09 (ratio 0.3125: [0.540, 0.629], missed) and the search settled at
# MACs 0.297 (81.46 %); on 30 s at most 0.04, but `--speedup 1.3`'s 0.3125 probe still ended at 0.743 [0.720,
# 0.772] against 0.769 and the search settled at MACs 0.310 again
PROBE_SECONDS_FACTOR = 6

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
        sizes, seconds = [options.speedup_batch], PROBE_SECONDS_FACTOR * job.config.verify.benchmark_seconds
        return largest_ratio_at_speed(
            lambda r: job.timed(
                streamlined(job.build(job.planned(r)[0])[0])[0], sizes, False, seconds, threshold=1 / options.speedup
            )[0],
            options.speedup,
            faster_whole=bool(fold_pads(job.model).folded),
        )
    return options.target_ratio, None
