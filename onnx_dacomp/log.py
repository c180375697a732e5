"""The package logger. The library logs; only the CLI decides where messages go."""

import logging

logger = logging.getLogger("onnx_dacomp")
logger.addHandler(logging.NullHandler())
