"""Statistics of the target layers (`Moments` per layer): sums that merge exactly, saved with a fingerprint
of each layer so that statistics of another model are refused."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..layers import Layer
from ..moments import Moments
from ..save import write_atomically

FORMAT_VERSION = 1
# a second moment needs two vectors to say anything; with fewer vectors than dims the fit shrinks it towards a
# sphere (`problems.shrinkage`): the raw estimate is rank-deficient, and a fit in it projects onto the
# calibration samples' span, which other data leaves
MIN_VECTORS = 2
# Statistics larger than this stay on disk while a compression runs (`spilled`): the stages read a layer's
# moments when they build its problem, so the main process does not hold all of them beside its workers
# (ResNet-50-shaped: 0.95 GB of statistics, a quarter of the whole run's peak memory)
SPILL_BYTES = 256 * 2**20


@dataclass(frozen=True, eq=False)
class Statistics:
    """Statistics of every target layer of one model, keyed by layer name."""

    layers: Mapping[str, Moments]
    fingerprints: Mapping[str, str]  # layer name -> fingerprint of its geometry and weight
    samples: int  # images (first-axis entries of the model input)
    source: str  # description of the calibration data
    extra: Mapping[str, str] = field(default_factory=dict)

    def merge(self, other: Statistics) -> Statistics:
        """Statistics of the union of both data sets (same model)."""
        if dict(self.fingerprints) != dict(other.fingerprints):
            raise UserError("cannot merge statistics of different models (layer fingerprints differ)")
        layers = {name: self.layers[name] + other.layers[name] for name in self.layers}
        return Statistics(layers, self.fingerprints, self.samples + other.samples, f"{self.source} + {other.source}")

    def check_model(self, targets: Iterable[Layer], weights: Mapping[str, np.ndarray]) -> None:
        """Refuse statistics that were gathered on another model: every target layer must match."""
        for layer in targets:
            if layer.name not in self.fingerprints:
                raise UserError(
                    f"the statistics have no entry for layer {layer.name!r}: they were gathered "
                    f"on a different model; run `onnx-dacomp calibrate` on this one"
                )
            if self.fingerprints[layer.name] != layer_fingerprint(layer, weights[layer.name]):
                raise UserError(
                    f"the statistics do not match layer {layer.name!r} (shape or weights differ): "
                    f"they were gathered on a different model; run `onnx-dacomp calibrate` on this one"
                )


def spilled(statistics: Statistics, folder: str | os.PathLike) -> Statistics:
    """`statistics` with its moments written to `.npy` files in `folder` (which must outlive the result) and
    memory-mapped when a layer is looked up, if they take more than SPILL_BYTES; else `statistics` itself."""
    if sum(moments.second.nbytes for moments in statistics.layers.values()) <= SPILL_BYTES:
        return statistics
    folder = Path(folder)
    counts = {}
    try:
        for index, (name, moments) in enumerate(statistics.layers.items()):
            np.save(folder / f"second_{index}.npy", moments.second)
            np.save(folder / f"first_{index}.npy", moments.first)
            counts[name] = moments.count
    except OSError as exc:
        raise UserError(
            f"cannot keep the statistics in the temporary folder {folder.parent} ({exc.strerror or exc}): "
            f"free some disk space there or point TMPDIR at a folder with more"
        ) from None
    return replace(statistics, layers=_StoredMoments(folder, counts))


class _StoredMoments(Mapping):
    """Moments per layer in `.npy` files (`second_<i>`, `first_<i>`), mapped when looked up."""

    def __init__(self, folder: Path, counts: Mapping[str, int]):
        self.folder, self.counts = folder, dict(counts)
        self.index = {name: index for index, name in enumerate(counts)}

    def __getitem__(self, name: str) -> Moments:
        index = self.index[name]
        second = np.load(self.folder / f"second_{index}.npy", mmap_mode="r")
        first = np.load(self.folder / f"first_{index}.npy", mmap_mode="r")
        return Moments(second, first, self.counts[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.counts)

    def __len__(self) -> int:
        return len(self.counts)


def too_few_vectors(statistics: Statistics, layers: Iterable[Layer]) -> dict[str, str]:
    """The layers whose statistics hold too few input vectors for any distribution-aware fit (fewer than
    MIN_VECTORS), with the reason. Fewer vectors than input dims are enough: the fit shrinks the layer's second
    moment (`problems.shrinkage`)."""
    reasons = {}
    for layer in layers:
        count = statistics.layers[layer.name].count
        if count < MIN_VECTORS:
            reasons[layer.name] = f"{count} calibration vectors: a fit needs {MIN_VECTORS} or more (more data)"
    return reasons


def layer_fingerprint(layer: Layer, weight: np.ndarray) -> str:
    """Hash of what the statistics depend on for this layer: its geometry and its weight values."""
    digest = hashlib.sha256()
    digest.update(repr(layer.signature).encode())
    digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:32]


def save_statistics(statistics: Statistics, path: str | os.PathLike) -> Path:
    """Write an .npz atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    names = list(statistics.layers)
    meta = {
        "format": "onnx-dacomp statistics",
        "version": FORMAT_VERSION,
        "samples": statistics.samples,
        "source": statistics.source,
        "extra": dict(statistics.extra),
        "layers": [
            {"name": name, "fingerprint": statistics.fingerprints[name], "count": statistics.layers[name].count}
            for name in names
        ],
    }
    arrays = {"meta": np.array(json.dumps(meta))}
    for index, name in enumerate(names):
        arrays[f"second_{index}"] = statistics.layers[name].second
        arrays[f"first_{index}"] = statistics.layers[name].first
    write_atomically(path, lambda stream: np.savez(stream, **arrays))
    return path


def load_statistics(path: str | os.PathLike) -> Statistics:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            if meta.get("format") != "onnx-dacomp statistics":
                raise KeyError("meta")
            layers, fingerprints = {}, {}
            for index, entry in enumerate(meta["layers"]):
                layers[entry["name"]] = Moments(
                    archive[f"second_{index}"], archive[f"first_{index}"], int(entry["count"])
                )
                fingerprints[entry["name"]] = entry["fingerprint"]
    except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path} is not an onnx-dacomp statistics file ({type(exc).__name__}); "
            f"write one with `onnx-dacomp calibrate`"
        ) from None
    return Statistics(layers, fingerprints, int(meta["samples"]), str(meta["source"]), meta.get("extra", {}))
