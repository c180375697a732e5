"""Stage 3: run calibration batches through onnxruntime and accumulate the moments of each layer's input
vectors (a conv's patches).

The default path runs an augmented model that computes each layer's per-batch sums inside the runtime
(`augment.py`); where that graph cannot be built or run, the layer inputs are exposed instead and the sums
are computed in numpy from the layer's input vectors. Memory is bounded by one batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import numpy as np
import onnx

from ..errors import UserError
from ..inputs import InputSignature, input_signature
from ..layers import Layer
from ..log import logger
from ..log import progress as log_progress
from ..moments import Moments
from ..runtime import create_session, provider_name
from ..shapes import infer_shapes
from ..targets import MAX_VECTOR_LENGTH, read_weights
from .augment import augment
from .sources import IterableSource, Source
from .statistics import Statistics, layer_fingerprint

# Samples per run of the statistics graph: as many as keep the layer inputs of one run within RUN_BYTES,
# and at least CHUNK. onnxruntime holds the graph's intermediates for the samples of a run, so this bounds
# memory (ResNet-50 at 224x224: 35 MiB of layer inputs per sample, 8 per run, calibrate peak 1.9 GB), while
# small inputs still run whole batches (ResNet-56 at 32x32: 2 MiB per sample; 8 per run halved its rate).
CHUNK = 8
RUN_BYTES = 96 * 2**20
STATISTICS_ARENA = False  # the statistics graph's intermediates are large and short-lived: no memory arena


def collect_statistics(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    source: Source | Iterable,
    *,
    device: str = "auto",
    mode: str = "auto",
    progress: bool = True,
    signature: InputSignature | None = None,
) -> Statistics:
    """Statistics of `layers` (decomposable targets of `model`) over all batches of `source`: a
    `Source`, any iterable of `{input_name: array}` (bare arrays for a single-input model), or an
    onnxruntime `CalibrationDataReader`.

    `mode`: "graph" (sums inside onnxruntime), "numpy" (layer inputs out, sums in numpy), or "auto"
    (graph, falling back to numpy if the augmented model cannot be built or run). `signature`: the model's
    inputs with their batch axes (default: inferred from the model's dims).
    """
    layers = [layer for layer in layers if layer.decomposable]
    for layer in layers:
        if layer.vector_length > MAX_VECTOR_LENGTH:
            raise UserError(
                f"layer {layer.name}: patch length {layer.vector_length} would need a "
                f"{layer.vector_length**2 * 8 / 2**30:.1f} GiB covariance; exclude it (--exclude)"
            )
    signature = signature or input_signature(model)
    if not isinstance(source, Source):  # plain iterables, bare arrays, CalibrationDataReaders
        source = IterableSource(source, signature.names)
    runner = _Runner(model, layers, device, mode, signature)
    samples = 0
    description = getattr(source, "description", "user-supplied batches")
    start = time.perf_counter()
    with log_progress(getattr(source, "size", None), "calibrating", "sample", enabled=progress) as bar:
        for index, batch in enumerate(source):
            batch = signature.check(batch, index)
            batch_size = signature.length(batch)
            runner.run(batch)
            samples += batch_size
            bar.update(batch_size)
    if samples == 0:
        raise UserError(f"the calibration data ({description}) yielded no samples")
    totals = runner.totals()
    elapsed = time.perf_counter() - start
    logger.info(
        "calibrated %d layers on %d samples in %.1f s (%.0f img/s, patch sums in %s, %s provider)",
        len(layers),
        samples,
        elapsed,
        samples / max(elapsed, 1e-9),
        runner.path,
        runner.provider,
    )
    weights = read_weights(model, layers)
    fingerprints = {layer.name: layer_fingerprint(layer, weights[layer.name]) for layer in layers}
    return Statistics(totals, fingerprints, samples, description)


def exposing(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are the tensors `names` (and nothing else)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    return probe


class _Runner:
    """Sessions for one model, rebuilt only when the spatial input shape changes, and the running sums.

    On the graph path the session outputs are themselves sums over the batch: they are accumulated in
    float64 as they come and turned into statistics once per session (`_flush`).
    """

    def __init__(self, model, layers, device, mode, signature: InputSignature):
        if mode not in ("auto", "graph", "numpy"):
            raise UserError(f"unknown calibration mode {mode!r}: use auto, graph or numpy")
        self.model, self.layers, self.device, self.mode, self.signature = model, layers, device, mode, signature
        self.chunks: dict[tuple, int] = {}  # samples per run, by input shapes
        self.shape_key = None
        self.provider = "none"
        self.path = None
        self.statistics: dict[str, Moments] = {}
        self.pending: dict[str, np.ndarray] = {}
        self.pending_images = 0

    def run(self, batch: dict[str, np.ndarray]) -> None:
        """Accumulate one batch, in runs of `_samples_per_run` samples (see RUN_BYTES)."""
        size = self.signature.length(batch)
        chunk = self._samples_per_run(batch)
        if self.signature.fixed_batch is not None and size % chunk:
            raise UserError(
                f"the model takes exactly {chunk} samples per run and a batch holds {size}: "
                f"use a --batch-size that is a multiple of {chunk}"
            )
        for start in range(0, size, chunk):
            self._run(self.signature.slice(batch, start, start + chunk))

    def _samples_per_run(self, batch: dict[str, np.ndarray]) -> int:
        if self.signature.fixed_batch is not None:
            return self.signature.fixed_batch
        one = self.signature.run_shapes(batch)  # one sample
        key = tuple(sorted(one.items()))
        if key not in self.chunks:
            shapes = infer_shapes(self.model, list(dict.fromkeys(layer.input for layer in self.layers)), one)
            known = [shape for shape in shapes.values() if shape is not None and all(d > 0 for d in shape)]
            per_sample = 4 * sum(math.prod(shape) for shape in known) if len(known) == len(shapes) else 0
            self.chunks[key] = max(CHUNK, RUN_BYTES // per_sample) if per_sample else CHUNK
        return self.chunks[key]

    def _run(self, batch: dict[str, np.ndarray]) -> None:
        key = tuple(sorted(self.signature.run_shapes(batch).items()))
        if key != self.shape_key:
            self._flush()
            self._prepare(batch)
            self.shape_key = key
        try:
            results = self.session.run(self.output_names, batch)
        except Exception as exc:
            reason = str(exc).splitlines()[0]
            if self.mode == "auto" and self.path == "graph":
                logger.warning("the statistics graph failed in onnxruntime (%s); exposing layer inputs instead", reason)
                self.mode = "numpy"
                self.shape_key = None
                return self._run(batch)
            raise UserError(f"onnxruntime failed to run the model on the calibration data: {reason}") from None
        values = dict(zip(self.output_names, results))
        if self.path == "graph":
            for name, value in values.items():  # in place: no temporaries of the (large) sums per run
                if name in self.pending:
                    np.add(self.pending[name], value, out=self.pending[name])
                else:
                    self.pending[name] = np.asarray(value, np.float64)
            self.pending_images += self.signature.length(batch)
        else:
            self._add({layer.name: vector_sums(layer.input_vectors(values[layer.input])) for layer in self.layers})

    def totals(self) -> dict[str, Moments]:
        self.session = None  # the statistics graph's memory goes before the sums are assembled
        self._flush()
        return self.statistics

    def _flush(self) -> None:
        if self.pending_images:
            for layer in self.layers:  # one layer at a time, freeing its raw sums: memory stays near the result
                outputs = self.layer_outputs[layer.name]
                moments = outputs.moments(self.pending, self.pending_images)
                for name in outputs.names:
                    del self.pending[name]
                self._add({layer.name: moments})
        self.pending, self.pending_images = {}, 0

    def _add(self, collected: dict[str, Moments]) -> None:
        for layer in self.layers:  # in graph order: the first layer whose input went non-finite is named
            stats = collected.get(layer.name)
            if stats is None:
                continue
            if not (np.isfinite(stats.first).all() and np.isfinite(stats.second).all()):
                raise UserError(
                    f"layer {layer.name}: the statistics of its input are NaN or Inf (activations "
                    f"overflow on this data; check the preprocessing)"
                )
            known = self.statistics.get(layer.name)
            self.statistics[layer.name] = known + stats if known is not None else stats

    def _prepare(self, batch):
        shapes = self.signature.run_shapes(batch)
        input_shapes = infer_shapes(self.model, [layer.input for layer in self.layers], shapes)
        layer_inputs = {layer.name: input_shapes.get(layer.input) for layer in self.layers}
        use_graph = self.mode in ("auto", "graph") and all(shape is not None for shape in layer_inputs.values())
        if self.mode == "graph" and not use_graph:
            raise UserError("cannot build the statistics graph: some layer input shapes are unknown")
        if use_graph:
            try:
                augmented, self.layer_outputs = augment(self.model, self.layers, layer_inputs)
                self.session = create_session(augmented, self.device, arena=STATISTICS_ARENA)
                self.output_names = [n for o in self.layer_outputs.values() for n in o.names]
                self.path = "graph"
                self.provider = provider_name(self.session)
                return
            except Exception as exc:  # the numpy path below is the documented fallback
                if self.mode == "graph":
                    raise
                logger.warning(
                    "cannot build the statistics graph (%s); exposing layer inputs instead", str(exc).splitlines()[0]
                )
        self.output_names = list(dict.fromkeys(layer.input for layer in self.layers))
        self.session = create_session(exposing(self.model, self.output_names), self.device)
        self.path = "numpy"
        self.provider = provider_name(self.session)


def vector_sums(vectors: np.ndarray) -> Moments:
    """Float64 sums of `x x^T` and `x` over input vectors `(group, n, count)`."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by the caller, per layer
        second = np.matmul(vectors, vectors.transpose(0, 2, 1))
    return Moments(second, vectors.sum(axis=2), vectors.shape[2])
