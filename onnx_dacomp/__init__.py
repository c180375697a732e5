"""onnx-dacomp: distribution-aware low-rank compression of ONNX convolutional networks.

import onnx_dacomp
result = onnx_dacomp.compress("model.onnx", data="images/", ratio=0.5)
result.model, result.report

`calibrate`, `evaluate` and `inspect` are the other commands' functions; configs are in `onnx_dacomp.config`.
"""

__version__ = "0.1.0"

from .config import (  # noqa: E402 (the version first: rewrite.py records it)
    CompressConfig,
    DataConfig,
    FitConfig,
    ImagePreprocessing,
    PlanConfig,
    RuntimeConfig,
    VerifyConfig,
)

__all__ = [
    "CompressConfig",
    "DataConfig",
    "FitConfig",
    "ImagePreprocessing",
    "PlanConfig",
    "RuntimeConfig",
    "VerifyConfig",
    "calibrate",
    "compress",
    "evaluate",
    "inspect",
]


def compress(model, data=None, config: CompressConfig | None = None, **options):
    """Compress `model` (path or ModelProto) with calibration `data` as `config` (and/or flat `options`, e.g.
    `ratio=0.5`) says; returns a `CompressionResult` with `.model` and `.report`. See `pipeline.compress`."""
    from .pipeline import compress as run  # deferred: the package imports fast for `--help`

    statistics, progress = options.pop("statistics", None), options.pop("progress", True)
    config = (config or CompressConfig()).replace(**options) if options else (config or CompressConfig())
    return run(model, data, config, statistics=statistics, progress=progress)


def calibrate(model, data, *args, **kwargs):
    """Statistics of every decomposable layer; see `api.calibrate`."""
    from .api import calibrate as run

    return run(model, data, *args, **kwargs)


def evaluate(original, compressed, data, *args, **kwargs):
    """Compare a compressed model with its original; see `api.evaluate`."""
    from .api import evaluate as run

    return run(original, compressed, data, *args, **kwargs)


def inspect(model, *args, **kwargs):
    """The layers of a model and what can be decomposed; see `api.inspect`."""
    from .api import inspect as run

    return run(model, *args, **kwargs)
