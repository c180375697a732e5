"""Per-layer results kept on disk (`--cache-dir`): an interrupted run resumes where it stopped, and a run at
another ratio or target reuses every statistic, candidate table, sensitivity and fit that still applies.

Each entry is keyed by a digest of everything its result depends on (the layer's weight and geometry, its
statistics, the settings that matter, the tool's code), stored as one `.npz` (arrays and a JSON header,
no pickle) written atomically. An entry that cannot be read, or whose header does not match its key (a
foreign or corrupt file), is ignored with a warning and computed again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import __version__
from .calibration.sources import rereadable
from .calibration.statistics import Statistics, load_statistics, save_statistics
from .decompose import factors as factor_types
from .errors import UserError
from .fit import LayerFit
from .geometry import Cost
from .log import logger
from .ranks.candidates import Candidate, CandidateTable
from .save import write_atomically

FORMAT = "onnx-dacomp cache 1"


def digest(*parts) -> str:
    """A hex digest of arrays, numbers, strings and nested tuples/lists/dicts of them."""
    hasher = hashlib.sha256()

    def feed(part) -> None:
        if isinstance(part, np.ndarray):
            hasher.update(f"array{part.dtype}{part.shape}".encode())
            hasher.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, bytes):  # a serialized model: its repr would be four times its size
            hasher.update(f"bytes{len(part)}".encode())
            hasher.update(part)
        elif isinstance(part, (list, tuple)):
            hasher.update(f"seq{len(part)}".encode())
            for item in part:
                feed(item)
        elif isinstance(part, dict):
            for key in sorted(part):
                feed(key)
                feed(part[key])
        else:
            hasher.update(repr(part).encode())

    feed((code_digest(), *parts))
    return hasher.hexdigest()[:40]


@functools.cache
def code_digest(package: Path = Path(__file__).parent) -> str:
    """The version and a digest of the package's source: results of other code miss, even where the version
    string is the same (a development checkout between releases)."""
    hasher = hashlib.sha256(__version__.encode())
    for path in sorted(package.rglob("*.py")):
        hasher.update(path.relative_to(package).as_posix().encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


def statistics_key(model_digest: str, layers, data, settings) -> str | None:
    """The key of the statistics of `layers` on `data`: the model, the layers, the data's description and its
    first batch (a changed file changes one or the other), and `settings`. None for data that cannot be read
    twice (one-pass iterables are calibrated on, never cached)."""
    if not rereadable(data):
        return None
    first = next(iter(data), {})
    first = sorted(first.items()) if isinstance(first, Mapping) else first
    description = getattr(data, "description", type(data).__name__)
    return digest("statistics", model_digest, [layer.name for layer in layers], description, first, settings)


class Cache:
    """Entries under `folder/<kind>/<digest of the key and the tool's code>.npz`, and what a run reused and
    stored of each kind."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.reused: dict[str, int] = {}
        self.stored: dict[str, int] = {}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--cache-dir {folder}: cannot use it as a folder ({exc.strerror})") from None

    def table(self, key: str) -> CandidateTable | None:
        found = self._read("tables", key)
        if found is None:
            return None
        meta, _ = found
        candidates = tuple(
            Candidate(c["method"], tuple(c["ranks"]), Cost(*c["cost"]), c["error"]) for c in meta["value"]["candidates"]
        )
        return CandidateTable(meta["value"]["name"], Cost(*meta["value"]["original"]), candidates)

    def put_table(self, key: str, table: CandidateTable) -> None:
        value = {
            "name": table.name,
            "original": list(table.original),
            "candidates": [
                {"method": c.method, "ranks": list(c.ranks), "cost": list(c.cost), "error": c.error}
                for c in table.candidates
            ],
        }
        self._write("tables", key, value, {})

    def number(self, kind: str, key: str) -> float | None:
        found = self._read(kind, key)
        return None if found is None else float(found[0]["value"])

    def put_number(self, kind: str, key: str, value: float) -> None:
        self._write(kind, key, float(value), {})

    def fit(self, key: str) -> LayerFit | None:
        found = self._read("fits", key)
        if found is None:
            return None
        meta, arrays = found
        groups = []
        for index, entry in enumerate(meta["value"]["factors"]):
            cls = getattr(factor_types, entry["type"])
            values = {}
            for field, count in entry["fields"].items():
                items = [arrays[f"g{index}_{field}_{i}"] for i in range(max(count, 1))]
                values[field] = tuple(items) if count else items[0]
            groups.append(cls(**values))
        bias = arrays.get("bias")
        return LayerFit(groups, bias, meta["value"]["rel_error"], meta["value"]["sweeps"])

    def put_fit(self, key: str, fit: LayerFit) -> None:
        arrays, described = {}, []
        for index, group in enumerate(fit.factors):
            fields = {}
            for field in dataclasses.fields(group):
                value = getattr(group, field.name)
                items = value if isinstance(value, tuple) else (value,)
                fields[field.name] = len(value) if isinstance(value, tuple) else 0
                for i, item in enumerate(items):
                    arrays[f"g{index}_{field.name}_{i}"] = np.asarray(item)
            described.append({"type": type(group).__name__, "fields": fields})
        if fit.bias is not None:
            arrays["bias"] = np.asarray(fit.bias)
        value = {"factors": described, "rel_error": fit.rel_error, "sweeps": fit.sweeps}
        self._write("fits", key, value, arrays)

    def statistics(self, key: str) -> Statistics | None:
        path = self._path("statistics", key)
        if not path.is_file():
            return None
        try:
            found = load_statistics(path)
        except Exception as exc:  # noqa: BLE001 - a corrupt entry is computed again, never trusted
            logger.warning("ignoring cache entry %s (%s): computing it again", path, str(exc).splitlines()[0])
            return None
        if found.extra.get("cache_key") != key:
            logger.warning("ignoring cache entry %s (its key does not match its name): computing it again", path)
            return None
        self.reused["statistics"] = self.reused.get("statistics", 0) + 1
        return found

    def put_statistics(self, key: str, statistics: Statistics) -> None:
        (self.folder / "statistics").mkdir(exist_ok=True)
        keyed = dataclasses.replace(statistics, extra={**statistics.extra, "cache_key": key})
        save_statistics(keyed, self._path("statistics", key))
        self.stored["statistics"] = self.stored.get("statistics", 0) + 1

    def summary(self) -> str:
        kinds = sorted(set(self.reused) | set(self.stored))
        return ", ".join(f"{kind}: {self.reused.get(kind, 0)} reused, {self.stored.get(kind, 0)} new" for kind in kinds)

    def _path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{digest(key)}.npz"  # other code of the tool misses, never misreads

    def _read(self, kind: str, key: str):
        path = self._path(kind, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                arrays = {name: archive[name] for name in archive.files if name != "meta"}
            if meta.get("format") != FORMAT or meta.get("kind") != kind or meta.get("key") != key:
                raise ValueError("the entry's header does not match its name")
        except Exception as exc:  # any unreadable or foreign file: computed again, never trusted
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.warning("ignoring cache entry %s (%s): computing it again", path, reason)
            return None
        self.reused[kind] = self.reused.get(kind, 0) + 1
        return meta, arrays

    def _write(self, kind: str, key: str, value, arrays: dict) -> None:
        (self.folder / kind).mkdir(exist_ok=True)
        meta = json.dumps({"format": FORMAT, "kind": kind, "key": key, "value": value})
        write_atomically(self._path(kind, key), lambda stream: np.savez(stream, meta=np.array(meta), **arrays))
        self.stored[kind] = self.stored.get(kind, 0) + 1
