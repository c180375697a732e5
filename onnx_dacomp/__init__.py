"""onnx-dacomp: distribution-aware low-rank compression of ONNX convolutional networks.

import onnx_dacomp
result = onnx_dacomp.compress("model.onnx", data="images/", ratio=0.5)
result.model, result.report

`sweep`, `calibrate`, `evaluate` and `inspect` are the other commands' functions; configs are in
`onnx_dacomp.config`.
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
    "sweep",
]


def compress(model, data=None, config: CompressConfig | None = None, **options):
    """Compress `model` (path or ModelProto) with calibration `data` as `config` (and/or flat `options`, e.g.
    `ratio=0.5`) says; returns a `CompressionResult` with `.model` and `.report`. See `pipeline.compress`.
    `progress=False`: only warnings on stderr (where the program configured no logging of its own)."""
    from .pipeline import compress as run  # deferred: the package imports fast for `--help`

    statistics, progress = options.pop("statistics", None), options.pop("progress", True)
    with _logging(progress):  # first: the choice of workers may log
        return run(model, data, _configured(config, options, workers=True), statistics=statistics, progress=progress)


def sweep(model, data=None, ratios=None, config: CompressConfig | None = None, **options):
    """The model at each of `ratios` (default 0.3, 0.4, 0.5, 0.6, 0.75) from one calibration, with the same
    flat options as `compress`; returns a `SweepResult` (`.points`, `.table()`, `.to_csv()`, `.to_json()`).
    `on_model=f` receives `(ratio, CompressionResult)` for each point (to save it). See `sweep.sweep`."""
    from .sweep import DEFAULT_RATIOS
    from .sweep import sweep as run

    statistics, progress = options.pop("statistics", None), options.pop("progress", True)
    on_model = options.pop("on_model", None)
    with _logging(progress):
        config = _configured(config, options, workers=True)
        return run(
            model, data, ratios or DEFAULT_RATIOS, config, statistics=statistics, progress=progress, on_model=on_model
        )


def calibrate(model, data, config=None, *, mode: str = "auto", progress: bool = True, **options):
    """Statistics of every decomposable layer (save them with `calibration.statistics.save_statistics`); the
    same flat options as `compress` (`limit=`, `mean=`, `workers=`, ...). See `api.calibrate`."""
    from .api import calibrate as run

    with _logging(progress):
        config = _configured(config, options, workers=True)
        return run(model, data, config.data, config.runtime, mode=mode, progress=progress)


def evaluate(
    original, compressed, data, config=None, *, benchmark_batch=(), max_seconds=30.0, progress=True, **options
):
    """Compare a compressed model with its original on `data`, with the same flat options as `compress`
    (`mean=`, `std=`, `scale=`, `limit=`, `classifier_outputs=`, ...); see `api.evaluate`."""
    from .api import evaluate as run

    config = _configured(config, options)
    with _logging(progress):
        return run(
            original, compressed, data, config.data, config.runtime, benchmark_batch=benchmark_batch,
            max_seconds=max_seconds, progress=progress, classifier_outputs=config.verify.classifier_outputs,
        )  # fmt: skip


def inspect(model, config=None, **options):
    """The layers of a model and what can be decomposed; see `api.inspect`."""
    from .api import inspect as run

    return run(model, _configured(config, options).data)


def _configured(config, options: dict, workers: bool = False) -> CompressConfig:
    """A `CompressConfig` from `config` (one, a stage's config such as `DataConfig`, or None), stage configs
    given by group name (`runtime=RuntimeConfig(...)`) and flat options. `workers`: the call may start worker
    processes, which a script without a main guard cannot (`workers.workers_for_script`)."""
    from .config import GROUPS

    groups = {name: options.pop(name) for name in list(options) if name in GROUPS and name != "data"}
    if isinstance(config, CompressConfig):
        groups = {**{name: getattr(config, name) for name in GROUPS}, **groups}
    elif config is not None:
        groups.update({name: config for name, cls in GROUPS.items() if isinstance(config, cls)})
    config = CompressConfig(**groups, **options)
    if workers:
        from .workers import workers_for_script

        count = workers_for_script(config.runtime.workers, config.runtime.ray)
        config = config.replace(workers=count) if count != config.runtime.workers else config
    return config


def _logging(progress: bool):
    from .log import api_logging

    return api_logging(progress)
