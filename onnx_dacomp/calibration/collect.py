"""Stage 3: run calibration batches through onnxruntime and accumulate the moments of each layer's input
vectors (a conv's patches).

The default path runs an augmented model that computes each layer's per-batch sums inside the runtime
(`augment.py`); where that graph cannot be built or run, the layer inputs are exposed instead and the sums
are computed in numpy from the layer's input vectors.

The data is cut into shards of consecutive batches (at least SHARD_SAMPLES samples each). Each shard is
summed from zero, by this process or by a worker (`--workers`, `--ray`: data-parallel calibration), and the
shard sums are added in shard order: the same float64 additions in the same order whoever ran a shard, so the
statistics are bit-identical for any number of workers.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import onnx

from ..config import POSITIONS
from ..errors import UserError
from ..inputs import InputSignature, input_signature
from ..layers import POSITION_SEED, Layer
from ..log import logger
from ..log import progress as log_progress
from ..moments import Moments, vector_sums
from ..runtime import create_session, provider_name, release_freed_memory
from ..shapes import infer_shapes
from ..targets import MAX_VECTOR_LENGTH, read_weights
from ..workers import Shared, Workers, report_progress
from .augment import ExposedInput, augment
from .sources import IterableSource, Source
from .statistics import Statistics, layer_fingerprint

# Samples per run of the statistics graph: as many as keep the layer inputs of one run within RUN_BYTES,
# and at least CHUNK. onnxruntime holds the graph's intermediates for the samples of a run, so this bounds
# memory (ResNet-50 at 224x224: 35 MiB of layer inputs per sample, 8 per run, calibrate peak 1.9 GB), while
# small inputs still run whole batches (ResNet-56 at 32x32: 2 MiB per sample; 8 per run halved its rate).
CHUNK = 8
RUN_BYTES = 96 * 2**20
STATISTICS_ARENA = False  # the statistics graph's intermediates are large and short-lived: no memory arena
# Samples per shard (at least; whole batches): the unit of data-parallel calibration. A function of the model
# only, never of the worker count, so that the shard sums, and thus the statistics, do not depend on it: at
# least SHARD_SAMPLES, and one sample per SHARD_MOMENT_BYTES of statistics (rounded up to a power of two), so
# that a shard's work outweighs moving its sums, and this process holds a second copy of the sums (the shard's
# beside the totals) only for long calibrations (ResNet-56: 128 samples; ResNet-50-shaped: 1024).
SHARD_SAMPLES = 128
SHARD_MOMENT_BYTES = 2**20
# Local calibration sends shards to the worker pool only where the statistics are small: each worker holds a
# session and a shard's sums, and sends the sums back. Measured (2 cores, 2 workers vs this process): ResNet-56
# (57 MiB of moments) 1.11x faster; ResNet-50-shaped (951 MiB) 0.92x, with 2.2x the memory. A Ray cluster,
# asked for explicitly, always gets the shards.
POOL_MAX_MOMENT_BYTES = 256 * 2**20


def collect_statistics(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    source: Source | Iterable,
    *,
    device: str = "auto",
    mode: str = "auto",
    progress: bool = True,
    signature: InputSignature | None = None,
    workers: Workers | None = None,
    positions: str = "sampled",
    seed: int = 0,
) -> Statistics:
    """Statistics of `layers` (decomposable targets of `model`) over all batches of `source`: a
    `Source`, any iterable of `{input_name: array}` (bare arrays for a single-input model), or an
    onnxruntime `CalibrationDataReader`.

    `mode`: "graph" (sums inside onnxruntime), "numpy" (layer inputs out, sums in numpy), or "auto"
    (graph, falling back to numpy if the augmented model cannot be built or run). `signature`: the model's
    inputs with their batch axes (default: inferred from the model's dims). `workers`: where the shards run
    (default: in this process). `positions`: "sampled" (conv layers with large outputs sum a seeded random grid
    of their output positions per run: `layers.conv_statistics`) or "all"; `seed` draws the grids.
    """
    layers = [layer for layer in layers if layer.decomposable]
    for layer in layers:
        if layer.vector_length > MAX_VECTOR_LENGTH:
            raise UserError(
                f"layer {layer.name}: patch length {layer.vector_length} would need a "
                f"{layer.vector_length**2 * 8 / 2**30:.1f} GiB covariance; exclude it (--exclude)"
            )
    if mode not in ("auto", "graph", "numpy"):
        raise UserError(f"unknown calibration mode {mode!r}: use auto, graph or numpy")
    if positions not in POSITIONS:
        raise UserError(f"unknown positions {positions!r}: use {' or '.join(POSITIONS)}")
    signature = signature or input_signature(model)
    if not isinstance(source, Source):  # plain iterables, bare arrays, CalibrationDataReaders
        source = IterableSource(source, signature.names)
    job = _Job(tuple(layers), device, mode, signature, positions == "sampled", seed)
    moment_bytes = sum(8 * layer.vector_length**2 for layer in layers)
    shard_size = max(SHARD_SAMPLES, 2 ** math.ceil(math.log2(max(1, moment_bytes / SHARD_MOMENT_BYTES))))
    totals = _Totals(layers)
    samples, path, provider = 0, None, "none"
    description = getattr(source, "description", "user-supplied batches")
    start = time.perf_counter()
    size = getattr(source, "size", None)
    with log_progress(size, "calibrating", "sample", enabled=progress) as bar:
        shards = iter(_Shards(source, signature, shard_size))
        for sums in _shard_sums(model, job, shards, size, moment_bytes, workers, bar.update):
            totals.add(sums)
            samples, path, provider = samples + sums.samples, sums.path, sums.provider
            del sums  # not held while the next shard runs: a shard's sums are as large as the totals
    if samples == 0:
        raise UserError(f"the calibration data ({description}) yielded no samples")
    statistics = totals.result()
    release_freed_memory()
    elapsed = time.perf_counter() - start
    logger.info(
        "calibrated %d layers on %d samples in %.1f s (%.0f img/s, patch sums in %s, %s provider)",
        len(layers),
        samples,
        elapsed,
        samples / max(elapsed, 1e-9),
        path,
        provider,
    )
    weights = read_weights(model, layers)
    fingerprints = {layer.name: layer_fingerprint(layer, weights[layer.name]) for layer in layers}
    return Statistics(statistics, fingerprints, samples, description, {"positions": positions})


@dataclass(frozen=True, eq=False)
class _Job:
    """What every shard of one calibration shares, besides the model."""

    layers: tuple[Layer, ...]
    device: str
    mode: str
    signature: InputSignature
    sampled: bool
    seed: int

    @property
    def key(self) -> tuple:
        return (
            tuple(layer.name for layer in self.layers), self.device, self.mode, repr(self.signature), self.sampled,
            self.seed,
        )  # fmt: skip


@dataclass(frozen=True)
class _Part:
    """The sums of consecutive runs of one shard: raw statistics-graph outputs (`outputs`: how they combine,
    per layer; `key`: the input shapes they were computed for) or, on the numpy path, moments per layer."""

    key: tuple | None
    outputs: dict | None
    sums: dict
    images: int


@dataclass(frozen=True)
class ShardSums:
    parts: tuple[_Part, ...]
    samples: int
    path: str | None
    provider: str


@dataclass(frozen=True)
class ShardTask:
    """One shard for a worker: the model is shared (sent once per worker), the batches travel with it."""

    model: Shared
    job: _Job
    first_sample: int  # the index of the shard's first sample in the data
    batches: tuple[dict, ...]
    threads: int


class _Shards:
    """The checked batches of `source` in shards of at least `size` samples, each with the index of its first
    sample. Each shard is an iterator that reads its batches as they are consumed (a shard of a large model
    holds a thousand images), and must be consumed whole before the next."""

    def __init__(self, source: Iterable, signature: InputSignature, size: int):
        self.signature, self.size = signature, size
        self.batches = (signature.check(batch, index) for index, batch in enumerate(source))
        self.next = next(self.batches, None)
        self.samples = 0

    def __iter__(self) -> Iterator[tuple[int, Iterator[dict]]]:
        while self.next is not None:
            yield self.samples, self._shard()

    def _shard(self) -> Iterator[dict]:
        count = 0
        while self.next is not None and count < self.size:
            batch = self.next
            count += self.signature.length(batch)
            self.samples += self.signature.length(batch)
            yield batch
            self.next = next(self.batches, None)


def _shard_sums(
    model, job: _Job, shards: Iterator, size: int | None, moment_bytes: int, workers: Workers | None, update: Callable
):
    """The sums of every shard, in order. The first runs in this process (progress per batch); the rest go to
    `workers` where that pays (`Workers.pays`: the rest of the `size` samples would take long enough here, and
    the sums are within POOL_MAX_MOMENT_BYTES or the workers are a cluster; progress per shard)."""
    runner = _Runner(model, job)
    start = time.perf_counter()
    first = next(shards, None)
    if first is None:
        return
    sums = runner.shard_sums(*first, update)
    elapsed, samples = time.perf_counter() - start, sums.samples
    yield sums
    del sums
    left = size - samples if size else samples  # unknown size: at least one more shard
    pays = workers is not None and workers.pays(elapsed * left / samples, moment_bytes, POOL_MAX_MOMENT_BYTES)
    second = next(shards, None) if pays else None
    if second is None:
        for first_sample, shard in shards:
            yield runner.shard_sums(first_sample, shard, update)
        return
    del runner  # its sessions: the workers build their own
    payload = model.SerializeToString()
    shared = workers.share(payload, hashlib.sha256(payload).hexdigest())
    del payload
    tasks = (
        ShardTask(shared, job, first_sample, tuple(shard), workers.threads)
        for first_sample, shard in chain([second], shards)
    )
    # one shard's sums in flight per worker; a local worker reports its runs as they finish
    for sums in workers.map(run_shard, tasks, per_worker=1, progress=update):
        if not workers.reports_progress:
            update(sums.samples)
        yield sums
        del sums


_worker_runner: tuple | None = None  # (shared model key, job, threads), runner: a worker keeps its sessions


def run_shard(task: ShardTask) -> ShardSums:
    """A shard's sums, in a worker."""
    global _worker_runner
    key = (task.model.key, task.job.key, task.threads)
    if _worker_runner is None or _worker_runner[0] != key:
        _worker_runner = None  # the previous job's sessions go first
        _worker_runner = key, _Runner(onnx.load_from_string(task.model.get()), task.job, task.threads)
    return _worker_runner[1].shard_sums(task.first_sample, task.batches, report_progress)


class _Totals:
    """The statistics of all shards so far: raw graph sums are added while the input shapes stay the same
    and turned into moments (`_flush`) when they change and at the end."""

    def __init__(self, layers: Sequence[Layer]):
        self.layers = layers
        self.statistics: dict[str, Moments] = {}
        self.key, self.outputs, self.sums, self.images = None, None, {}, 0

    def add(self, shard: ShardSums) -> None:
        for part in shard.parts:
            if part.key is not None and part.key == self.key:
                for name, value in part.sums.items():  # in place: no temporaries of the (large) sums
                    np.add(self.sums[name], value, out=self.sums[name])
                self.images += part.images
                continue
            self._flush()
            if part.key is None:
                self._add(part.sums)
            else:
                # the first sums become the totals (arrays from Ray's object store are read-only: copied)
                sums = {name: value if value.flags.writeable else value.copy() for name, value in part.sums.items()}
                self.key, self.outputs, self.sums, self.images = part.key, part.outputs, sums, part.images

    def result(self) -> dict[str, Moments]:
        self._flush()
        return self.statistics

    def _flush(self) -> None:
        for layer in self.layers if self.images else ():  # a layer at a time, freeing its raw sums
            outputs = self.outputs[layer.name]
            moments = outputs.moments(self.sums, self.images)
            for name in outputs.names:
                del self.sums[name]
            self._add({layer.name: moments})
        self.key, self.outputs, self.sums, self.images = None, None, {}, 0

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


def exposing(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are the tensors `names` (and nothing else), with only the nodes they
    need: onnxruntime runs every node of a graph whichever outputs are asked for (onnxruntime#16483), and a
    propagation or compensation wave of early layers would pay for the whole model (ResNet-56 exposing the
    input of its fourth conv: 0.17 s per 64 samples with every node, as much as the whole model; 0.01 s with
    those it needs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    nodes = model.graph.node
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(attribute.type in subgraphs for node in nodes for attribute in node.attribute):
        return probe  # a subgraph may read any tensor of the graph around it: keep every node
    producers = {output: index for index, node in enumerate(nodes) for output in node.output}
    needed, pending = set(), list(names)
    while pending:
        index = producers.get(pending.pop())
        if index is not None and index not in needed:
            needed.add(index)
            pending.extend(nodes[index].input)
    used = {name for index in needed for name in nodes[index].input} | set(names)
    dropped = {tensor.name for tensor in model.graph.initializer} - used  # also graph inputs in old models
    del probe.graph.node[:], probe.graph.initializer[:], probe.graph.input[:]  # refilled from `model`'s own
    probe.graph.node.extend(node for index, node in enumerate(nodes) if index in needed)
    probe.graph.initializer.extend(tensor for tensor in model.graph.initializer if tensor.name not in dropped)
    probe.graph.input.extend(value for value in model.graph.input if value.name not in dropped)
    return probe


class _Runner:
    """Sessions for one model, rebuilt only when the spatial input shape changes, and the sums of the shard
    being run.

    On the graph path the session outputs are themselves sums over the batch: they are accumulated in
    float64 as they come; the numpy path accumulates moments per layer.
    """

    def __init__(self, model: onnx.ModelProto, job: _Job, threads: int | None = None):
        self.model, self.layers, self.device, self.mode = model, job.layers, job.device, job.mode
        self.signature, self.threads = job.signature, threads
        self.chunks: dict[tuple, int] = {}  # samples per run, by input shapes
        self.shape_key = None
        self.provider = "none"
        self.path = None
        self.parts: list[_Part] = []
        self.pending: dict = {}
        self.pending_images = 0
        self.sample = 0  # the index in the data of the next sample to run
        self.sampled, self.seed = job.sampled, job.seed

    def shard_sums(
        self, first_sample: int, batches: Iterable[dict], update: Callable[[int], object] | None = None
    ) -> ShardSums:
        """The sums of `batches` (one shard, from sample `first_sample` of the data on), from zero;
        `update(samples)` after each onnxruntime run."""
        samples, self.sample = 0, first_sample
        for batch in batches:
            self.run(batch, update)
            samples += self.signature.length(batch)
        self._close_part()
        parts, self.parts = tuple(self.parts), []
        return ShardSums(parts, samples, self.path, self.provider)

    def run(self, batch: dict[str, np.ndarray], update: Callable[[int], object] | None = None) -> None:
        """Accumulate one batch, in runs of `_samples_per_run` samples (see RUN_BYTES); `update(samples)`
        after each."""
        size = self.signature.length(batch)
        chunk = self._samples_per_run(batch)
        if self.signature.fixed_batch is not None and size % chunk:
            raise UserError(
                f"the model takes exactly {chunk} samples per run and a batch holds {size}: "
                f"use a --batch-size that is a multiple of {chunk}"
            )
        for start in range(0, size, chunk):
            self._run(self.signature.slice(batch, start, start + chunk))
            if update is not None:
                update(min(chunk, size - start))

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
            self._close_part()
            self._prepare(batch)
            self.shape_key = key
        feed = batch
        if self.seeded:  # the positions sampled in this run: drawn from where the run starts in the data
            rng = np.random.default_rng((self.seed, self.sample))
            feed = {**batch, POSITION_SEED: rng.integers(0, 2**31, size=1, dtype=np.int64)}
        try:
            results = self.session.run(self.output_names, feed)
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
            for outputs in self.layer_outputs.values():
                if isinstance(outputs, ExposedInput):
                    values.update(outputs.sums(values))
            for name in self.exposed:
                del values[name]  # the layer inputs: summed above
            for name, value in values.items():  # in place: no temporaries of the (large) sums per run
                if name in self.pending:
                    np.add(self.pending[name], value, out=self.pending[name])
                else:
                    self.pending[name] = np.asarray(value, np.float64)
        else:
            for layer in self.layers:
                stats = vector_sums(layer.input_vectors(values[layer.input]))
                known = self.pending.get(layer.name)
                self.pending[layer.name] = known + stats if known is not None else stats
        self.pending_images += self.signature.length(batch)
        self.sample += self.signature.length(batch)

    def _close_part(self) -> None:
        if self.pending_images:
            graph = self.path == "graph"
            key, outputs = (self.shape_key, self.layer_outputs) if graph else (None, None)
            self.parts.append(_Part(key, outputs, self.pending, self.pending_images))
        self.pending, self.pending_images = {}, 0

    def _prepare(self, batch):
        shapes = self.signature.run_shapes(batch)
        input_shapes = infer_shapes(self.model, [layer.input for layer in self.layers], shapes)
        layer_inputs = {layer.name: input_shapes.get(layer.input) for layer in self.layers}
        use_graph = self.mode in ("auto", "graph") and all(shape is not None for shape in layer_inputs.values())
        if self.mode == "graph" and not use_graph:
            raise UserError("cannot build the statistics graph: some layer input shapes are unknown")
        self.session = None  # the previous shape's session goes first
        if use_graph:
            try:
                augmented, self.layer_outputs = augment(self.model, self.layers, layer_inputs, self.sampled)
                self.session = self._session(augmented, STATISTICS_ARENA)
                self.seeded = POSITION_SEED in {value.name for value in self.session.get_inputs()}
                self.output_names = [output.name for output in augmented.graph.output]
                inputs = {layer.input for layer in self.layers}
                self.exposed = [output.name for output in augmented.graph.output if output.name in inputs]
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
        self.session = self._session(exposing(self.model, self.output_names), True)
        self.seeded = False
        self.path = "numpy"
        self.provider = provider_name(self.session)

    def _session(self, model: onnx.ModelProto, arena: bool):
        return create_session(model, self.device, arena=arena, threads=self.threads, tf32=False)
