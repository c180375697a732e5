"""onnx-dacomp: distribution-aware low-rank compression of ONNX convolutional networks.

import onnx_dacomp
result = onnx_dacomp.compress("model.onnx", data="images/", config=onnx_dacomp.CompressConfig(ratio=0.5))
result.model, result.report
"""

from .config import CompressConfig

__version__ = "0.1.0"
__all__ = ["CompressConfig", "compress"]


def compress(model, data=None, config: CompressConfig | None = None, **options):
    """Compress `model` (path or ModelProto) with calibration `data` as `config` says; returns a
    `CompressionResult` with `.model` and `.report`. See `onnx_dacomp.pipeline.compress`."""
    from .pipeline import compress as run  # deferred: the package imports fast for `--help`

    return run(model, data, config if config is not None else CompressConfig(), **options)
