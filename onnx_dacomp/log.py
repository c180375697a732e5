"""The package logger and progress bars. The library logs; only the CLI decides where messages go."""

from __future__ import annotations

import logging

from tqdm import tqdm

logger = logging.getLogger("onnx_dacomp")
logger.addHandler(logging.NullHandler())


def progress(total: int | None, description: str, unit: str, *, enabled: bool = True) -> tqdm:
    """A progress bar on stderr, shown only when it is a terminal (logs and CI stay clean) and `enabled`."""
    return tqdm(
        total=total, desc=description, unit=unit, disable=None if enabled else True, leave=False, dynamic_ncols=True
    )
