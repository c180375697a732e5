"""End-to-end latency of a model against another, measured so that the ratio can be trusted.

A single median of each model on a shared machine moves by more than the difference being measured (the
same pair of EfficientNet-Lite0 models gave ratios of 1.153 and then 0.961). So the two models are timed in
alternating rounds, the order alternating too (AB, BA, AB, ...), each round a block of runs of each model
after a warm-up (each model's threads: below). Worker threads spin between a run's operators, as
onnxruntime's do by default, and stop when the run returns: a pool spinning after its run would steal the cores
from the other session's block, and one that sleeps between operators pays a wake-up on each (ResNet-56 at
batch 32 on two threads: 21.6 ms instead of 19.4, its `--speedup 2` model 14.6 instead of 11.1 ms, a ratio of
0.68 instead of the 0.57 a default session gives). Each round gives a ratio; the figure is the median ratio
with a seeded bootstrap 95 % interval, and rounds go on until that interval is within +-TARGET_HALF_WIDTH of
the median, or MAX_SECONDS have passed. Slow drifts of the machine hit both models of a round alike, so the
ratio is steadier than either time.

A session has a speed of its own, too: four pairs of ResNet-56 sessions timed in the same interleaved rounds
gave median ratios of 0.833, 0.845, 0.861 and 0.874. So every ROUNDS_PER_SESSION rounds a fresh pair of
sessions takes over, and the interval is a two-level bootstrap (the session pairs, then the rounds within
each): it covers the variation between sessions, which a user's own session of the model shows too. What it
cannot cover is the machine's state over longer times: on a shared 2-core machine six measurements of one
pair in a row ranged from 0.80 to 0.86 as the original's own time went from 1.73 to 2.11 ms.

Nor can it cover other work on the machine, which slows the compressed model (more, smaller nodes) more than
the original: eight measurements of a ResNet-56 pair at batch 32 beside a compression job agreed with each
other at 0.62-0.63, against 0.75-0.85 on the quiet machine. So the CPU time other processes take while the
models are timed is measured too (`OtherWork`: the machine's busy time in /proc/stat less this process's own),
reported with the figure and warned about.

Without a thread count given, each model runs a block on one thread per core (onnxruntime's default) and one
on one thread in every round of a CPU measurement, and its time in the round is the faster: each model on the
threads it runs fastest on at that moment. A compressed model's chains have more, smaller nodes, each of which
pays the pool's join on two threads: at batch 1 on a 2-core machine ResNet-56 ran in 1.0 ms on two threads and
1.15-1.2 ms on one, its `--speedup 2` model in 1.13-1.18 ms on two and 0.57-0.60 ms on one; timed on the
original's threads, that model was 1.1x slower than the original, where it is served, on one thread, 1.7x
faster. Which is faster changes with the machine's state, within seconds: in another state two threads ran the
original in 0.70 ms and the compressed model in 0.47. A choice made once before the measurement (timed in
blocks on each count) was made in one state and timed in the other often enough to matter: the default
ResNet-56 model then measured 1.35x slower at batch 1, where it was 0.90-0.93 in either state with each round's best.

The same rounds' one-thread blocks give a second figure, both models on one thread, which the second core's
state moves much less. Six runs of `evaluate --benchmark` on each of four pairs (2-core machine, three pairs
of back-to-back runs within 13 minutes, the state changing among them): at batch 1 the CIFAR-10 pairs'
one-thread figures lay within each other's intervals in 44 of 45 pairs of runs, the figures on each model's
fastest threads in 16 of 45 (the state moved ResNet-20's from 0.76 to 0.93); at batch 32, 22 and 18 of 45.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics as stats
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .log import logger, progress
from .runtime import CUDA, create_session, provider_name

WARMUP_RUNS = 3
BLOCK_SECONDS = 0.02  # a model's block of runs in a round lasts at least this long (timer resolution, noise)
MIN_ROUNDS = 20  # a bootstrap interval of fewer rounds is too optimistic (two runs of 10 disagreed)
# rounds on one pair of sessions before a fresh pair (at least MIN_ROUNDS / this pairs); even, so that each
# pair runs both orders alike: the model timed second in a round came out 3-9 % slower (ResNet-56, batch 1)
ROUNDS_PER_SESSION = 4
MAX_ROUNDS = 400
TARGET_HALF_WIDTH = 0.03  # stop once the interval is within +-3 % of the median ratio
# the interval is at least +-RESOLUTION of the ratio: between processes a pair's ratio varies more than one
# measurement's rounds show. 128 one-thread measurements of a ResNet-56 pair (8 s each) ranged over 0.595-0.608
# (sd 0.35 %) with bootstrap intervals of +-0.6 %, and two lay within each other's intervals in 78 % of the
# pairs; with intervals of at least +-1 %, in 95 %
RESOLUTION = 0.01
MAX_SECONDS = 30.0  # per batch size, after the warm-up
BOOTSTRAP = 2000
# other processes' CPU use during a measurement, as a share of the machine's cores, above which the figure is
# said to be disturbed (a quarter of a core on two)
BUSY_SHARE_WARNING = 0.125
# one thread is taken where a model runs in at most this share of its time on all cores: a margin, so that a
# model about as fast on either is timed on all cores as onnxruntime's default runs it (with worker threads that
# slept between operators, EfficientNet-Lite0 at batch 1 took 1.16-1.19 of its 2-thread time on one, but about
# 1.0 while the machine's second core was slow: at 1.05 it was timed on one thread in such a state)
ONE_THREAD_SHARE = 0.95
THREAD_ROUNDS = 5  # alternating blocks of the model on all cores and on one thread
THREAD_SECONDS = 2.0  # at most this long (after the first round), for models that take seconds a run
_serving: dict[tuple, int] = {}  # (model digest, batch shapes, device) -> threads, chosen once per process


@dataclass(frozen=True)
class Latency:
    """Both models at one batch size: median ms of a run, and the ratio compressed / original as the median
    of the per-round ratios with its 95 % interval."""

    batch: int
    original_ms: float
    compressed_ms: float
    provider: str
    ratio: float
    ratio_low: float
    ratio_high: float
    rounds: int = 0
    threads: int = 0  # the original's intra-op threads
    compressed_threads: int = 0  # the compressed model's (0: the same)
    sessions: int = 0  # pairs of sessions the rounds ran on
    other_work: float | None = None  # cores kept busy by other processes while timing (None: not measurable)
    # both models on one thread, from the same rounds' one-thread blocks (None: only one thread count timed): on a
    # shared machine the figure that reproduces from run to run (module docstring)
    one_thread_ratio: float | None = None
    one_thread_low: float | None = None
    one_thread_high: float | None = None

    @property
    def faster(self) -> bool:
        """Whether the compressed model is faster beyond doubt (the whole interval below 1)."""
        return self.ratio_high < 1.0

    def describe(self) -> str:
        return (
            f"latency at batch {self.batch} ({self.provider}, {self.threads_described}): {self.original_ms:.2f} ms -> "
            f"{self.compressed_ms:.2f} ms, ratio {self.ratio:.3f} [{self.ratio_low:.3f}, {self.ratio_high:.3f}]"
            + self._one_thread_described
            + f" ({self.rounds} rounds on {self.sessions} session pairs"
            + (f", other work {self.other_work:.2f} cores" if self.other_work is not None else "")
            + ")"
        )

    @property
    def _one_thread_described(self) -> str:
        if self.one_thread_ratio is None or (self.threads == 1 and self.compressed_threads in (0, 1)):
            return ""  # not timed, or the ratio already is both on one thread
        low, high = self.one_thread_low, self.one_thread_high
        return f", both on one thread {self.one_thread_ratio:.3f} [{low:.3f}, {high:.3f}]"

    @property
    def threads_described(self) -> str:
        def counted(count: int) -> str:
            return f"{count} thread" + ("s" if count != 1 else "")

        if self.compressed_threads in (0, self.threads):
            return counted(self.threads)
        return f"the original on {counted(self.threads)}, the compressed model on {counted(self.compressed_threads)}"


def default_threads() -> int:
    """Intra-op threads of a timed session on all cores: one per core, what onnxruntime takes by default."""
    return os.cpu_count() or 1


def serving_threads(model: onnx.ModelProto, batch: dict[str, np.ndarray], samples: int, device: str = "auto") -> int:
    """The intra-op threads of a deployment of `model` at `batch` (of `samples` samples): one per core, or one
    where the model runs in at most ONE_THREAD_SHARE of that time on one (timed in alternating blocks; medians).
    Chosen once per model, batch and device in a process: the one-layer timing tables run on the original's."""
    cores = default_threads()
    if cores == 1:
        return 1
    payload = model.SerializeToString()
    key = (hashlib.sha256(payload).hexdigest(), tuple((name, array.shape) for name, array in batch.items()), device)
    if key not in _serving:
        runners = {count: BoundRun(create_session(payload, device, threads=count, stop_spinning=True), batch)
                   for count in (cores, 1)}  # fmt: skip
        if runners[cores].provider != "CPU":
            _serving[key] = cores  # the threads only feed the device
        else:
            first = {count: _timed(run, 1) for count, run in runners.items()}  # each session's first run: warm-up
            runs = max(1, math.ceil(BLOCK_SECONDS / max(first[cores], 1e-6)))
            times: dict[int, list[float]] = {cores: [], 1: []}
            start = time.monotonic()
            while len(times[1]) < THREAD_ROUNDS and (not times[1] or time.monotonic() - start < THREAD_SECONDS):
                for count, run in runners.items():
                    times[count].append(_timed(run, runs))
            share = stats.median(times[1]) / stats.median(times[cores])
            _serving[key] = 1 if share <= ONE_THREAD_SHARE else cores
            logger.info("timing at batch %s on %d thread%s: the model takes %.2f of its %d-thread time on one",
                        samples, _serving[key], "" if _serving[key] == 1 else "s", share, cores)  # fmt: skip
    return _serving[key]


def median_interval(ratios, seed: int = 0, sessions=None) -> tuple[float, float, float]:
    """The median of `ratios` and a seeded bootstrap 95 % interval of it. `sessions` (one label per ratio:
    the pair of sessions it was measured on) makes the bootstrap two-level: resample the session pairs, then
    the rounds within each chosen pair."""
    values = np.asarray(ratios, np.float64)
    rng = np.random.default_rng(seed)
    if sessions is None:
        medians = np.median(rng.choice(values, size=(BOOTSTRAP, len(values)), replace=True), axis=1)
    else:
        labels = np.asarray(sessions)
        groups = [values[labels == label] for label in dict.fromkeys(sessions)]
        counts = np.array([len(group) for group in groups])
        padded = np.full((len(groups), counts.max()), np.nan)
        for index, group in enumerate(groups):
            padded[index, : len(group)] = group
        chosen = rng.integers(0, len(groups), size=(BOOTSTRAP, len(groups)))  # session pairs
        sizes = counts[chosen][..., None]
        within = np.floor(rng.random((BOOTSTRAP, len(groups), counts.max())) * sizes).astype(int)
        drawn = padded[chosen[..., None], within]  # rounds within each chosen pair
        drawn[np.arange(counts.max()) >= sizes] = np.nan  # as many rounds as the pair has
        medians = np.nanmedian(drawn.reshape(BOOTSTRAP, -1), axis=1)
    return float(np.median(values)), float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def compare_latency(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    batch: dict[str, np.ndarray],
    samples: int,
    *,
    device: str = "auto",
    threads: int | None = None,
    max_seconds: float = MAX_SECONDS,
    show_progress: bool = True,
    threshold: float | None = None,
) -> Latency:
    """Time `compressed` against `original` on `batch` (of `samples` samples) in alternating rounds, on fresh
    sessions every ROUNDS_PER_SESSION rounds, until the ratio's interval is narrow enough or `max_seconds` have
    passed. Without `threads`, each model runs a block on one thread per core and a block on one thread in each
    round (on the CPU), and its time in the round is the faster block: each model on the threads it runs fastest
    on at that moment (the thread counts each took most often are reported). With a `threshold` (a question: is
    the ratio below it?) a narrow interval that still straddles it is timed on: such a probe of a speed target is
    undecided, not missed. (Stopping as soon as an interval lay on one side decided ResNet-56 probes after 20
    rounds on intervals up to 0.15 wide, against each other: ratio 0.344 at 0.716 [0.652, 0.760], 0.359 at 0.875
    [0.780, 0.921].)"""
    models = (original, compressed)
    counts = (threads,) if threads else tuple(dict.fromkeys((default_threads(), 1)))
    other_work = OtherWork()
    times: list[list[float]] = [[], []]
    fastest: list[list[int]] = [[], []]  # the thread count of each round's time, per model
    ratios: list[float] = []
    one_thread_ratios: list[float] = []  # the rounds' one-thread blocks, where both counts are timed
    labels: list[int] = []
    interval = (math.nan, math.nan, math.nan)
    start, runs, provider = time.monotonic(), 1, None
    with progress(None, f"timing at batch {samples}", "round", enabled=show_progress) as bar:
        for round_index in range(MAX_ROUNDS):
            pair = round_index // ROUNDS_PER_SESSION
            if round_index % ROUNDS_PER_SESSION == 0:
                sessions = [
                    {count: create_session(model, device, threads=count, stop_spinning=True) for count in counts}
                    for model in models
                ]
                if pair == 0:
                    provider = provider_name(sessions[0][counts[0]])
                    if provider != "CPU":  # the threads only feed the device
                        counts = counts[:1]
                        sessions = [{counts[0]: each[counts[0]]} for each in sessions]
                runners = [{count: BoundRun(session, batch) for count, session in each.items()} for each in sessions]
                warmed = [_timed(run, 1) for each in runners for run in each.values() for _ in range(WARMUP_RUNS)]
                if pair == 0:
                    runs = max(1, math.ceil(BLOCK_SECONDS / max(min(warmed), 1e-6)))
            order = (0, 1) if round_index % 2 == 0 else (1, 0)
            block = [{}, {}]
            for which in order:
                block[which] = {count: _timed(run, runs) for count, run in runners[which].items()}
            for which in (0, 1):
                count = min(block[which], key=block[which].get)
                times[which].append(block[which][count])
                fastest[which].append(count)
            ratios.append(times[1][-1] / times[0][-1])
            if len(block[0]) > 1:  # the compressed model's one-thread block over the original's
                one_thread_ratios.append(block[1][1] / block[0][1])
            labels.append(pair)
            bar.update()
            if len(ratios) >= MIN_ROUNDS and len(ratios) % ROUNDS_PER_SESSION == 0:
                interval = _resolved(median_interval(ratios, sessions=labels))
                narrow = max(interval[0] - interval[1], interval[2] - interval[0]) <= TARGET_HALF_WIDTH * interval[0]
                decided = threshold is None or interval[2] <= threshold or interval[1] > threshold
                if (narrow and decided) or time.monotonic() - start > max_seconds:
                    break
    if len(ratios) < MIN_ROUNDS or len(ratios) % ROUNDS_PER_SESSION:
        interval = _resolved(median_interval(ratios, sessions=labels))
    one_thread = _resolved(median_interval(one_thread_ratios, sessions=labels)) if one_thread_ratios else (None,) * 3
    return Latency(
        batch=samples,
        original_ms=1000 * stats.median(times[0]),
        compressed_ms=1000 * stats.median(times[1]),
        provider=provider,
        ratio=interval[0],
        ratio_low=interval[1],
        ratio_high=interval[2],
        rounds=len(ratios),
        threads=stats.mode(fastest[0]),
        compressed_threads=stats.mode(fastest[1]),
        sessions=labels[-1] + 1,
        other_work=other_work.warn_if_busy(),
        one_thread_ratio=one_thread[0],
        one_thread_low=one_thread[1],
        one_thread_high=one_thread[2],
    )


def _resolved(interval: tuple[float, float, float]) -> tuple[float, float, float]:
    """The interval widened to +-RESOLUTION of the ratio where it is narrower."""
    ratio, low, high = interval
    return ratio, min(low, ratio * (1 - RESOLUTION)), max(high, ratio * (1 + RESOLUTION))


def session_latency(
    model: onnx.ModelProto,
    batch: dict[str, np.ndarray],
    *,
    device: str = "auto",
    threads: int | None = None,
    runs: int = 30,
):
    """Median latency (ms) of one model on `batch` and the provider that ran it (one-layer timing tables)."""
    session = create_session(model, device, threads=threads or default_threads(), stop_spinning=True)
    run = BoundRun(session, batch)
    for _ in range(WARMUP_RUNS):
        run()
    return 1000 * stats.median(_timed(run, 1) for _ in range(runs)), provider_name(session)


class OtherWork:
    """The CPU time other processes take from its creation on: the machine's busy time (/proc/stat, time the
    hypervisor gave to other machines included) less this process's own (onnxruntime's threads are this
    process's), in cores. Where /proc/stat cannot be read (not Linux), the 1-minute load average stands in."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
        except (OSError, ValueError):
            return None
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        return busy, time.process_time(), time.monotonic()

    def cores(self) -> float | None:
        """Cores other processes kept busy on average since creation, or None where that is not measurable."""
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, others / (end[2] - self.start[2]))

    def warn_if_busy(self, log: Callable = logger.warning) -> float | None:
        """`cores()`, with a warning where other work took more than BUSY_SHARE_WARNING of the cores (without
        /proc/stat: where the load average exceeds the cores)."""
        cores, available = self.cores(), os.cpu_count() or 1
        if cores is not None and cores > BUSY_SHARE_WARNING * available:
            log("other processes kept %.2f cores busy while the models were timed: the latency ratio measures "
                "that work too (the compressed model's more, smaller nodes suffer more); time on a quiet machine",
                cores)  # fmt: skip
        elif cores is None and hasattr(os, "getloadavg"):
            load = os.getloadavg()[0]
            if load > available:
                log("the machine's load (%.1f) exceeds its %d cores: latency figures measure the other work too",
                    load, available)  # fmt: skip
        return cores


class BoundRun:
    """A callable: one run of `session` on `batch` with its inputs already on the provider's device and its
    outputs left there (onnxruntime's IO binding), done when the outputs are ready. On CUDA a timed run then
    measures the model, not the copies of its inputs to the GPU and of its outputs back: the same for both
    models of a pair, they would pull every ratio towards 1."""

    def __init__(self, session, batch: dict[str, np.ndarray]):
        import onnxruntime as ort

        device = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        self.session, self.binding, self.provider = session, session.io_binding(), provider_name(session)
        for name, array in batch.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device)
            self.binding.bind_ortvalue_input(name, value)  # the binding keeps the device buffer alive
        for output in session.get_outputs():
            self.binding.bind_output(output.name, device)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()

    def outputs(self) -> list[np.ndarray]:
        """The outputs of the last run, copied to the host."""
        return self.binding.copy_outputs_to_cpu()


def _timed(run: Callable[[], None], runs: int) -> float:
    """Seconds per run of `runs` consecutive runs."""
    start = time.perf_counter()
    for _ in range(runs):
        run()
    return (time.perf_counter() - start) / runs
