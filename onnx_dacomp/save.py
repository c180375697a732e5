"""Last stage: write a model atomically, checked, with external data when it would not fit in one protobuf."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import onnx

from .errors import InternalError, UserError
from .log import logger

PROTOBUF_LIMIT = 2**31 - 1
# headroom for the graph itself next to the weights when deciding on external data
_SIZE_MARGIN = 64 * 2**20


def model_size_estimate(model: onnx.ModelProto) -> int:
    """Serialized size in bytes, or an estimate from the weights when protobuf cannot size it."""
    try:
        return model.ByteSize()
    except Exception:  # some protobuf builds refuse to size messages over 2 GB
        return sum(len(init.raw_data) or init.ByteSize() for init in model.graph.initializer)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    protect: str | os.PathLike | None = None,
    external_data_threshold: int = PROTOBUF_LIMIT - _SIZE_MARGIN,
) -> Path:
    """Write `model` to `path`: temp files in the target folder, ONNX checker, then rename into place.

    The weights go to `<name>.data` next to the model when the model is larger than
    `external_data_threshold` bytes. `protect` (the input model) is never overwritten.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if protect is not None and _same_file(path, Path(protect)):
        raise UserError(f"output path {path} is the input model; choose another -o so the input is kept")
    folder = output_folder(path)
    external = model_size_estimate(model) > external_data_threshold
    data_name = f"{path.name}.data"
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as exc:
        raise UserError(f"cannot write to output folder {folder}: {exc.strerror}") from None
    try:
        staged = staging / path.name
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(
                copy,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=0,
            )
        else:
            onnx.save_model(model, str(staged))
        try:
            onnx.checker.check_model(str(staged))
        except onnx.checker.ValidationError as exc:
            raise InternalError(f"the written model fails the ONNX checker: {exc}") from exc
        if external:
            os.replace(staging / data_name, folder / data_name)
        os.replace(staged, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s%s", path, f" (weights in {data_name})" if external else "")
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through `write(stream)` atomically: a temp file in the same folder, then a rename, so
    an existing file is replaced only when the new one is complete (also on Ctrl-C)."""
    path = Path(path)
    folder = output_folder(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise UserError(f"cannot write to output folder {folder}: {exc.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def check_output(path: str | os.PathLike, *, protect: str | os.PathLike | None = None) -> Path:
    """Fail early (before the slow part) if `path` cannot be written: the input itself, a directory, a
    missing or unwritable folder. Writes and removes a probe file."""
    path = Path(path)
    if protect is not None and _same_file(path, Path(protect)):
        raise UserError(f"output path {path} is the input model; choose another -o so the input is kept")
    folder = output_folder(path)
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise UserError(f"cannot write to output folder {folder}: {exc.strerror}") from None
    os.close(handle)
    os.remove(probe)
    return path


def file_size(path: str | os.PathLike) -> int:
    """Bytes of a model file and of the external data files it names."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in locations)


def output_folder(path: str | os.PathLike) -> Path:
    """The folder an output file goes to; a one-line error if it does not exist."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output path {path} is a directory; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist; create it first")
    return folder


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()
