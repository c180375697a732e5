"""Stage 1: read an ONNX model from disk, with its external data, and refuse what cannot be processed."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import UserError
from .log import logger

MIN_OPSET = 11


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ('ai.onnx') operator set the model imports, or None."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return None


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load `path` (and any external data next to it); raise `UserError` with a one-line reason if unusable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends; the cause is the file either way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a valid ONNX model (cannot parse it: {reason})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0 or len(model.opset_import) == 0:
        raise UserError(f"{path} is not a valid ONNX model (no graph or no operator set); is it truncated?")

    _load_external_data(model, path)

    opset = default_opset(model)
    if opset is None:
        raise UserError(f"{path} does not import the standard ONNX operator set; nothing to compress")
    if opset < MIN_OPSET:
        raise UserError(
            f"{path} uses ONNX opset {opset}; onnx-dacomp needs opset {MIN_OPSET} or newer "
            f"(convert it with onnx.version_converter.convert_version(model, {MIN_OPSET}))"
        )
    logger.debug("loaded %s: opset %d, %d nodes", path, opset, len(model.graph.node))
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base_dir = path.parent
    missing = sorted(
        {
            info.get("location", "")
            for tensor in external_data_helper._get_all_tensors(model)
            if external_data_helper.uses_external_data(tensor)
            for info in [{entry.key: entry.value for entry in tensor.external_data}]
            if not (base_dir / info.get("location", "")).is_file()
        }
    )
    if missing:
        raise UserError(
            f"external data file {missing[0]!r} referenced by {path} is missing; "
            f"keep it in the same folder as the model"
        )
    try:
        external_data_helper.load_external_data_for_model(model, str(base_dir))
    except Exception as exc:
        raise UserError(f"cannot read the external data of {path}: {exc}") from None
