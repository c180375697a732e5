"""How much each layer's error reaches the model output, measured in onnxruntime (weights of the allocation).

The allocation minimizes a sum of per-layer relative errors. Layers differ by orders of magnitude in how
much of their error survives to the output: a layer inside a residual block is diluted by its skip path,
the first block of a stage is not, and on EfficientNet-Lite0 the same relative error moves the logits
between 0.1x and 11x as much. Each layer is therefore probed once: its closed-form DA-SVD at a rank whose
error is near `PROBE_ERROR` replaces it alone, and the model output is compared with the original's on a
few calibration samples (`--sensitivity-samples`). The sensitivity is `||Y~ - Y||^2 / ||Y||^2` divided
by the layer's relative error; to first order the output error of several compressed layers is the sum of
sensitivity times layer error, which is what the allocation then minimizes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from .cache import digest
from .calibration.sources import rereadable
from .decompose.factors import Factors
from .fit import FitSettings, LayerFit, fit_layer
from .inputs import InputSignature
from .layers import Layer
from .log import logger, progress
from .methods import get
from .problems import LayerProblem
from .ranks.candidates import Candidate, problem_errors
from .rewrite import replace_layers
from .runtime import create_session
from .workers import Shared, Workers

PROBE_ERROR = 0.02  # relative layer error of the probe: small enough for the first-order picture
PROBE_METHOD = "svd"  # closed form: exact rank errors and no iterations
# Probes go to the local worker pool only for models up to this size: each worker holds the model and a
# session of it. Measured (2 cores): ResNet-56's 56 probes 5.9 s -> 5.0 s with 2 workers; the 97 MiB
# ResNet-50-shaped model stays in this process (two more copies of it and its sessions, for a small gain).
# A Ray cluster, asked for explicitly, always gets them.
POOL_MAX_MODEL_BYTES = 64 * 2**20
# Samples per probe by default: as many as keep a probe's run within PROBE_MACS multiply-accumulates (128
# ResNet-56 samples), between MIN_PROBE_SAMPLES and MAX_PROBE_SAMPLES. A large input holds many positions,
# each a sample of the error: on a YOLO-style detector at 320x320 (1.1 GMAC per sample) the sensitivities
# from 32 samples were within 1.3 % (median; 5.4 % at most) of those from 128, with a Spearman correlation of
# 0.999, the same plan and the same output error, and the 63 probes took 36 s instead of 127 s.
PROBE_MACS = 16 * 10**9
MIN_PROBE_SAMPLES, MAX_PROBE_SAMPLES = 32, 128


def probe_samples(macs_per_sample: int | None) -> int:
    """The default number of probe samples for a model of `macs_per_sample` (None: unknown)."""
    if not macs_per_sample:
        return MAX_PROBE_SAMPLES
    return int(np.clip(PROBE_MACS // macs_per_sample, MIN_PROBE_SAMPLES, MAX_PROBE_SAMPLES))


def probe_rank(rank_errors: np.ndarray) -> int:
    """The largest rank whose relative error is still at least PROBE_ERROR (1 if every rank is below it);
    `rank_errors[r - 1]` is the error at rank r, decreasing."""
    above = np.flatnonzero(np.asarray(rank_errors)[:-1] >= PROBE_ERROR)
    return int(above[-1]) + 1 if len(above) else 1


def probe_fit(problem: LayerProblem, settings: FitSettings, method: str = PROBE_METHOD) -> LayerFit:
    """The layer's closed-form fit by `method` (DA-SVD, or channel pruning: both exact at every rank) at the
    probe rank (`probe_rank` of its rank errors)."""
    solver, geometry = get(method), problem.geometry
    ranks = [(rank,) for rank in range(1, solver.max_ranks(geometry)[0] + 1)]
    errors = problem_errors(problem, method, ranks, seed=0)
    rank = probe_rank(np.array(errors))
    choice = Candidate(method, (rank,), solver.cost(geometry, (rank,)), errors[rank - 1])
    return fit_layer(problem, choice, settings)


def probe_batches(data: Iterable[Mapping[str, np.ndarray]], samples: int, signature: InputSignature) -> list[dict]:
    """The first `samples` samples of `data` (whole batches)."""
    batches, count = [], 0
    for batch in data:
        batches.append(dict(batch))
        count += signature.length(batch)
        if count >= samples:
            break
    return batches


@dataclass(frozen=True)
class ProbeTask:
    """One probe as a work unit: the model and the probe data are shared (sent once per worker)."""

    model: Shared  # the ModelProto
    data: Shared  # (batches, the original model's outputs on them)
    layer: Layer
    factors: list[Factors]
    bias: np.ndarray | None
    device: str
    threads: int | None


_probe_inputs: tuple | None = None  # (model key, data key), (model, batches, references): kept per process


def probe_error(task: ProbeTask) -> float:
    """Squared output error of the model with `task.layer` replaced by its probe chain."""
    global _probe_inputs
    if task.model.held:
        model, (batches, references) = task.model.get(), task.data.get()
    else:  # in a worker: loaded once per job
        key = (task.model.key, task.data.key)
        if _probe_inputs is None or _probe_inputs[0] != key:
            _probe_inputs = None
            _probe_inputs = key, (task.model.get(), *task.data.get())
        model, batches, references = _probe_inputs[1]
    replaced = replace_layers(model, {task.layer.output: (task.layer, task.factors, task.bias)})
    session = create_session(replaced, task.device, threads=task.threads)
    squared = 0.0
    for batch, outputs in zip(batches, references):
        for y, reference in zip(session.run(None, batch), outputs):
            squared += float(np.sum((np.asarray(y, np.float64) - reference) ** 2))
    return squared


def _probe_errors(model, probes, names, batches, references, device: str, workers: Workers | None, bar=None):
    """The squared output error of each probe in `names`, in order. The first runs in this process; the rest
    go to `workers` where that pays (`Workers.pays`: they would take long enough here, and the model is within
    POOL_MAX_MODEL_BYTES or the workers are a cluster; then `bar`, the stage's progress, learns how many run
    at once)."""

    def tasks(where: Workers, chosen: list[str], model_key: str = "", data_key: str = ""):
        shared_model, shared_data = where.share(model, model_key), where.share((batches, references), data_key)
        threads = where.threads if where.count > 1 else None
        return (ProbeTask(shared_model, shared_data, *probes[name][:3], device, threads) for name in chosen)

    here, rest = Workers(1), names[1:]
    start = time.perf_counter()
    yield from map(probe_error, tasks(here, names[:1]))
    elapsed = time.perf_counter() - start
    if workers is None or not workers.pays(elapsed * len(rest), model.ByteSize(), POOL_MAX_MODEL_BYTES):
        yield from map(probe_error, tasks(here, rest))
        return
    keys = digest(model.SerializeToString()), digest([sorted(batch.items()) for batch in batches])
    if bar is not None:
        bar.parallel = workers.count
    yield from workers.map(probe_error, tasks(workers, rest, *keys))


def measure_sensitivities(
    model: onnx.ModelProto,
    probes: Mapping[str, tuple[Layer, list[Factors], np.ndarray | None, float]],
    batches: list[dict],
    *,
    device: str = "auto",
    progress=None,
    known: Mapping[str, float] | None = None,
    record=None,
    workers: Workers | None = None,
) -> dict[str, float]:
    """Output error energy per unit of layer error, per layer name.

    `probes[name] = (layer, factors, bias, rel_error)`: the layer's probe chain and its relative DA error.
    A probe whose error is zero (a layer of rank one) or whose output is not finite tells nothing (NaN):
    such layers get the median sensitivity. `known`: figures measured before (NaN where they told nothing),
    part of the result; `record(name, figure)` is called as each figure is measured (to keep it on disk).
    `workers`: where the probes run (default: in this process).
    """
    references, energy = [], 0.0
    if probes:
        reference_session = create_session(model, device)
        references = [[np.asarray(y, np.float64) for y in reference_session.run(None, batch)] for batch in batches]
        energy = sum(float(np.sum(y**2)) for outputs in references for y in outputs)
        if progress is not None:
            progress.restart()  # the time left follows the probes, not the reference run
    measured = dict(known or {})
    informative = [name for name, probe in probes.items() if probe[3] > 0 and energy > 0]
    errors = (
        _probe_errors(model, probes, informative, batches, references, device, workers, progress)
        if informative else None
    )  # fmt: skip
    for name, (_, _, _, rel_error) in probes.items():  # `informative` keeps this order
        measured[name] = float("nan")
        if name in informative and np.isfinite(squared := next(errors)):
            measured[name] = squared / energy / rel_error
        if record is not None:
            record(name, measured[name])
        if progress is not None:
            progress.update()
    told = [value for value in measured.values() if np.isfinite(value)]
    fallback = float(np.median(told)) if told else 1.0
    return {name: value if np.isfinite(value) else fallback for name, value in measured.items()}


def sensitivities(
    model: onnx.ModelProto,
    layers: Mapping[str, Layer],
    problems: Mapping[str, LayerProblem],
    data: Iterable[Mapping[str, np.ndarray]],
    settings: FitSettings,
    *,
    samples: int,
    signature: InputSignature,
    device: str = "auto",
    show_progress: bool = True,
    store=None,
    workers: Workers | None = None,
    unseen: Iterable[Mapping[str, np.ndarray]] | None = None,
    method: str = PROBE_METHOD,
) -> dict[str, float]:
    """The measured sensitivity of every layer in `problems`: one probe each, on the first `samples` samples
    of `data` (whole batches), run on `workers`. `store` (a `cache.Cache`) keeps each layer's figure on disk,
    keyed by the layer's problem, the model and the probe samples. `method`: the probe's (`probe_fit`).

    `unseen`: data outside the calibration (the held-out part). A layer fitted from few vectors (a shrunk
    covariance: a classifier after pooling) fits its own calibration samples far better than others, so its
    probe runs there: on EfficientNet-Lite0's classifier from 400 images the DA-SVD's error on other images
    is 2-5 times its calibration error, which probes on the calibration data hide from the allocation."""
    probe_data = {"seen": probe_batches(data, samples, signature)}
    if unseen is not None:
        probe_data["unseen"] = probe_batches(unseen, samples, signature)
    found, keys, probes = {}, {}, {"seen": {}, "unseen": {}}
    contexts = {
        where: digest(model.SerializeToString(), [sorted(batch.items()) for batch in batches], device) if store else ""
        for where, batches in probe_data.items()
    }  # fmt: skip
    for name in problems:
        problem = problems[name]
        where = "unseen" if problem.shrinkage > 0 and "unseen" in probe_data else "seen"
        if store is not None:
            keys[name] = problem.digest("sensitivity", contexts[where], *([method] if method != PROBE_METHOD else []))
            if (value := store.number("sensitivities", keys[name])) is not None:
                found[name] = value
                continue
        fit = probe_fit(problem, settings, method)
        probes[where][name] = (layers[name], fit.factors, fit.bias, fit.rel_error)
    record = (lambda name, value: store.put_number("sensitivities", keys[name], value)) if store else None
    measured = dict(found)
    title = "layer sensitivity" + (f" ({method})" if method != PROBE_METHOD else "")
    with progress(len(problems), title, "layer", enabled=show_progress) as bar:
        bar.update(len(found), reused=True)
        for where, chosen in probes.items():
            if chosen:
                measured |= measure_sensitivities(
                    model, chosen, probe_data[where], device=device, progress=bar, record=record, workers=workers
                )
    if probes["unseen"]:
        logger.info("sensitivity of %d layers fitted from few vectors probed on held-out data", len(probes["unseen"]))
    return {name: measured[name] for name in problems}


def allocation_weights(
    model, layers, problems, calibration, settings: FitSettings, config, signature, progress: bool = True, store=None,
    workers: Workers | None = None, holdout=None, method: str = PROBE_METHOD,
):  # fmt: skip
    """The allocation's weights for `problems`: their measured sensitivities (probed with `method`); None where
    they cannot be measured (Frobenius fit, no re-readable calibration data, or switched off in `config`).
    `holdout`: data outside the calibration, where layers fitted from few vectors are probed (`sensitivities`).

    A pruned layer is probed pruned: the same relative error reaches the output far more from dropped input
    channels than from a low-rank fit, whose error lies in the directions of least output energy (ResNet-20's
    last conv: output error per unit of layer error 0.004-0.015 for DA-SVD at errors 0.006-0.08, 0.28-0.49
    pruned at 0.07-0.42)."""
    if not config.plan.sensitivity or config.fit.norm != "sigma":
        return None
    if not rereadable(calibration):
        logger.info("no re-readable calibration data: layer errors are not weighted by output sensitivity")
        return None
    macs = [layer.macs for layer in layers.values()]
    default = probe_samples(None if None in macs else sum(macs))
    samples, device = config.plan.sensitivity_samples or default, config.runtime.device
    return sensitivities(
        model, layers, problems, calibration, settings, samples=samples, signature=signature, device=device,
        show_progress=progress, store=store, workers=workers, unseen=holdout if rereadable(holdout) else None,
        method=method,
    )  # fmt: skip
