"""Rectified output refit (docs/MATH.md): the node that writes each compressed layer's output (its chain's last
conv, or the pruned layer itself) refit in closed form on the input it gets in the compressed model, to the
original layer's output as the activation after it sees it.

The fits before this stage match each layer's output linearly; but most convs feed a ReLU (or ReLU6), directly
or after a residual Add, which forgets every error below its threshold. The refit (`decompose/rectified.py`)
minimizes the error that activation lets through, from the vectors that reach the node in the compressed model
(so it also absorbs the error of the layers before it). Layers are refit in waves (`propagate.waves`), from one
onnxruntime pass of the compressed model per wave (and of the original for several waves); a wave's refits are
kept only where they lower the compressed model's output error on the judge's samples, so the stage never
raises that error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .calibration.collect import exposing
from .decompose.rectified import output_intervals, rectified_refit
from .layers import ConstantResolver, Layer
from .log import logger, progress
from .propagate import OutputError, first_batches, waves
from .rewrite import refit_layers
from .runtime import create_session

# each refit sees up to this many input vectors per input dimension (sampled down to it; on a ResNet-20 layer
# the error on other vectors fell by 10 % fitted on 66 vectors per dimension, 14 % on 256 and 14.4 % on 500;
# ResNet-56 `auto` at 0.5: 82.83 % top-1 with 256 and a ridge of 1e-3, 82.91 % with 1024 and 1e-5)
VECTORS_PER_INPUT = 1024
MIN_VECTORS_PER_INPUT = 16  # with fewer the refit would fit the samples, not the layer: it is left as it is
MIN_SAMPLES = 64
MAX_ELEMENTS = 1 << 23  # vectors x max(inputs, outputs) per layer: what the refit holds in float64, a few times
# the original's sampled outputs (float32) are computed for as many waves ahead as this holds, one pass of the
# original model for them (ResNet-56 `auto` at 0.5: 39 waves; a pass of the original per wave took 21 s more)
REFERENCE_BYTES = 1 << 29
RIDGE = 1e-5  # toward the fitted map, relative to the mean eigenvalue of the inputs' second moment


@dataclass(frozen=True)
class Activation:
    """What reads a layer's output in the original model: an activation clipping to `[low, high]` (ReLU,
    ReLU6, Clip), on the output itself or on a residual Add's output (`input`: the tensor the activation reads,
    None for the output itself); `(-inf, inf)` where none does."""

    input: str | None = None
    low: float = -math.inf
    high: float = math.inf

    @property
    def linear(self) -> bool:
        return self.low == -math.inf and self.high == math.inf


def activations_after(model: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, Activation]:
    """The activation that reads each of `tensors` in `model`, directly or after an Add (its only reader each
    time); the graph's readers are mapped once for all of them."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    resolver = ConstantResolver(graph)

    def only_reader(name: str) -> onnx.NodeProto | None:
        readers = consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in outputs else None

    def activation(tensor: str) -> Activation:
        reader = only_reader(tensor)
        if reader is not None and (bounds := _clipping(reader, resolver)) is not None:
            return Activation(None, *bounds)
        if reader is not None and reader.op_type == "Add":
            after = only_reader(reader.output[0])
            if after is not None and (bounds := _clipping(after, resolver)) is not None:
                return Activation(reader.output[0], *bounds)
        return Activation()

    return {tensor: activation(tensor) for tensor in tensors}


def _clipping(node: onnx.NodeProto, resolver: ConstantResolver) -> tuple[float, float] | None:
    """`(low, high)` of a Relu or a Clip with constant bounds; None for any other node."""
    if node.op_type == "Relu":
        return 0.0, math.inf
    if node.op_type != "Clip":
        return None
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    bounds = [attributes.get("min", -math.inf), attributes.get("max", math.inf)]  # opset < 11
    for index, name in enumerate(node.input[1:3]):
        if name:
            try:
                bounds[index] = float(resolver.value(name))
            except (KeyError, ValueError, TypeError):
                return None  # a bound computed at run time
    return float(bounds[0]), float(bounds[1])


def refit_outputs(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    nodes: Sequence[Layer],
    originals: Mapping[str, Layer],
    batches: Sequence[dict[str, np.ndarray]],
    judge: OutputError,
    *,
    length: Callable[[dict], int] = lambda batch: len(next(iter(batch.values()))),
    seed: int = 0,
    device: str = "auto",
    show_progress: bool = True,
) -> tuple[onnx.ModelProto, dict]:
    """`compressed` with `nodes` (the layers of the compressed model that write a compressed layer's output,
    one group each; `originals`: output -> the original layer, whose names the record uses) refit wave by wave
    on `batches`, and the record; nodes whose output feeds no clipping activation are left as they are (the
    record's `no_activation`).

    Each node's input vectors come from `compressed` as refit so far, its targets (the original layer's output
    and the activation's input) from `original`; a wave's refits are kept where the judge finds a lower output
    error with them."""
    activations = activations_after(original, [node.output for node in nodes])
    # the activation is the point: a linear refit of EfficientNet-Lite0's 12 pruned projections (no activation
    # after them) took 140-200 s and changed top-1 within its interval (81.6 -> 81.4 %, 69.2 -> 68.6 %)
    linear = [originals[node.output].name for node in nodes if activations[node.output].linear]
    nodes = [node for node in nodes if not activations[node.output].linear]
    if not nodes:
        return compressed, {"layers": 0, "refitted": 0, "waves": [], "no_activation": linear}
    model, record, error = compressed, [], judge(compressed)
    by_output = {node.output: node for node in nodes}
    rng = np.random.default_rng(seed)
    planned = []  # per wave: its nodes, the batches it reads and, per batch and node, the vectors it samples
    for wave in waves(original, [originals[node.output] for node in nodes]):
        wave_nodes = [by_output[layer.output] for layer in wave]
        chosen = _enough(batches, wave_nodes, length)
        planned.append((wave_nodes, chosen, _sampled(wave_nodes, chosen, length, rng)))
    references = _References(original, planned, activations, length, device)
    with progress(len(nodes), "refitting chain outputs", "layer", enabled=show_progress) as bar:
        for index, (wave_nodes, chosen, sampled) in enumerate(planned):
            data = _wave_data(model, wave_nodes, activations, chosen, sampled, references.of(index), device)
            refits, skipped = {}, {}
            for node in wave_nodes:
                inputs, lower, upper = data[node.output]
                if inputs.shape[1] < MIN_VECTORS_PER_INPUT * (node.vector_length + 1):
                    skipped[originals[node.output].name] = f"{inputs.shape[1]} vectors for {node.vector_length} inputs"
                    continue
                weight, bias = _read(model, node)
                matrix = weight.reshape(len(weight), -1)
                refit, refit_bias = rectified_refit(inputs.T, lower, upper, matrix, bias, RIDGE)
                refits[node.output] = (node, refit.reshape(weight.shape), refit_bias)
            entry = {"layers": [layer.name for layer in wave], "refit": False, "output_error": [error, error]}
            if skipped:
                entry["skipped"] = skipped
            if refits:
                candidate = refit_layers(model, refits)
                candidate_error = judge(candidate)
                entry |= {"refit": candidate_error < error, "output_error": [error, min(error, candidate_error)]}
                if candidate_error < error:  # a tie keeps the layers as they are
                    model, error = candidate, candidate_error
            record.append(entry)
            bar.update(len(wave_nodes))
    refitted = sum(len(wave["layers"]) for wave in record if wave["refit"])
    if record:
        logger.info("chain outputs: %d of %d refit through their activation, output error %.4g -> %.4g on the "
                    "judge's samples", refitted, len(nodes), record[0]["output_error"][0], error)  # fmt: skip
    return model, {"layers": len(nodes), "refitted": refitted, "waves": record, "no_activation": linear}


def _enough(batches: Sequence[dict[str, np.ndarray]], nodes: Sequence[Layer], length: Callable) -> list[dict]:
    """The first batches that hold the vectors every node is refit on (`_wanted`; MIN_SAMPLES at least)."""
    needed = max(MIN_SAMPLES, *(math.ceil(_wanted(node) / _positions(node)) for node in nodes))
    return first_batches(batches, needed, length)


def _positions(node: Layer) -> int:
    return math.prod(node.geometry.output_spatial) if node.geometry.output_spatial else 1


def _sampled(nodes: Sequence[Layer], batches: Sequence[dict], length: Callable, rng) -> list[dict]:
    """Per batch, per node: the seeded sample of its vectors (positions of the batch's samples) the refit takes
    (`_wanted`; None: all of them)."""
    samples = sum(length(batch) for batch in batches)
    shares = {node.output: min(1.0, _wanted(node) / (samples * _positions(node))) for node in nodes}
    sampled = []
    for batch in batches:
        keeps = {}
        for node in nodes:
            count, share = length(batch) * _positions(node), shares[node.output]
            keeps[node.output] = None if share >= 1 else np.sort(rng.choice(count, math.ceil(share * count), False))
        sampled.append(keeps)
    return sampled


class _References:
    """The original model's outputs at the sampled vectors of each wave's nodes (the output, and the activation's
    input where that is an Add's), float32: computed for several waves in one pass of the original model, as
    many as REFERENCE_BYTES holds (with one batch of their whole outputs), and each wave's dropped once read."""

    def __init__(self, original, planned, activations: Mapping[str, Activation], length: Callable, device: str):
        self.original, self.planned, self.activations, self.device = original, planned, activations, device
        self.groups, group, size = [], [], 0
        for index, wave in enumerate(planned):
            need = self._bytes(*wave, length)
            if group and size + need > REFERENCE_BYTES:
                self.groups.append(group)
                group, size = [], 0
            group, size = group + [index], size + need
        self.groups.append(group)
        self.held: dict[int, dict[str, tuple[list, list]]] = {}  # per wave and node: the batches' parts
        logger.debug("output refit: the original's outputs for %d waves in %d passes", len(planned), len(self.groups))

    def _bytes(self, nodes: Sequence[Layer], batches: Sequence[dict], sampled: Sequence[dict], length) -> int:
        """What a wave's references hold (float32), and one batch of its nodes' whole outputs while computed."""
        largest = max(length(batch) for batch in batches)
        total = 0
        for node in nodes:
            positions = _positions(node)
            vectors = largest * positions + sum(
                length(batch) * positions if keeps[node.output] is None else len(keeps[node.output])
                for batch, keeps in zip(batches, sampled)
            )  # fmt: skip
            arrays = 1 if self.activations[node.output].input is None else 2
            total += 4 * arrays * vectors * node.geometry.out_channels
        return total

    def of(self, index: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Per node of wave `index`: the original's output vectors `(vectors, T)` and the activation's input
        vectors (None where the activation reads the output itself), at the sampled vectors in batch order."""
        if index not in self.held:
            self._compute(next(group for group in self.groups if index in group))
        return {
            output: (np.concatenate(values), np.concatenate(before) if before else None)
            for output, (values, before) in self.held.pop(index).items()
        }  # fmt: skip

    def _compute(self, group: Sequence[int]) -> None:
        waves = [self.planned[index] for index in group]
        targets = list(dict.fromkeys(
            name for nodes, _, _ in waves for node in nodes
            for name in (node.output, self.activations[node.output].input) if name is not None
        ))  # fmt: skip
        session = create_session(exposing(self.original, targets), self.device)
        parts = {index: {node.output: ([], []) for node in nodes} for index, (nodes, _, _) in zip(group, waves)}
        for position, batch in enumerate(max((batches for _, batches, _ in waves), key=len)):
            values = dict(zip(targets, session.run(targets, batch)))
            for index, (nodes, batches, sampled) in zip(group, waves):
                if position >= len(batches):
                    continue
                for node in nodes:
                    keep, before = sampled[position][node.output], self.activations[node.output].input
                    for part, name in zip(parts[index][node.output], (node.output, before)):
                        if name is not None:
                            vectors = node.output_vectors(values[name], np.float32).T
                            part.append(vectors if keep is None else vectors[keep])
        self.held |= parts


def _wave_data(model, nodes, activations, batches, sampled, references, device) -> dict[str, tuple]:
    """Per node: its input vectors in `model` `(n, vectors)` (float32) and the intervals of its outputs
    `(vectors, T)` from the original's `references`, at the `sampled` vectors of `batches`."""
    inputs = list(dict.fromkeys(node.input for node in nodes))
    observed = create_session(exposing(model, inputs), device)
    parts = {node.output: [] for node in nodes}
    for batch, keeps in zip(batches, sampled):
        values = dict(zip(inputs, observed.run(inputs, batch)))
        for node in nodes:
            vectors = node.input_vectors(values[node.input], np.float32)[0]
            keep = keeps[node.output]
            parts[node.output].append(vectors if keep is None else vectors[:, keep])
    data = {}
    for node in nodes:
        activation = activations[node.output]
        output, before = references[node.output]
        lower, upper = output_intervals(output, before, activation.low, activation.high)
        data[node.output] = np.concatenate(parts[node.output], axis=1), lower, upper
    return data


def _wanted(node: Layer) -> int:
    """How many vectors a node is refit on at most: VECTORS_PER_INPUT per input, MAX_ELEMENTS in all."""
    width = max(node.vector_length + 1, node.geometry.out_channels)
    return min(VECTORS_PER_INPUT * (node.vector_length + 1), MAX_ELEMENTS // width)


def _read(model: onnx.ModelProto, node: Layer) -> tuple[np.ndarray, np.ndarray]:
    """The node's weight `(T, S, *kernel)` and bias (zeros where it has none), float64."""
    resolver = ConstantResolver(model.graph)
    weight = np.asarray(node.weight_matrix(resolver.value(node.weight)), np.float64)
    bias = node.bias_vector(resolver.value(node.bias)) if node.bias else np.zeros(len(weight))
    return weight, np.asarray(bias, np.float64)
