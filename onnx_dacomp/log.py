"""The package logger and progress reporting. The library logs; only the CLI decides where messages go.

`progress(...)` is what every long loop reports to: a tqdm bar when stderr is a terminal, else a log line
every `LOG_INTERVAL` seconds (from a timer, so a long single unit still shows the run is alive) with the
count, the elapsed time and the time left (from the share of the stage's work done, where its units say how
much they weigh: per-layer stages run their largest layers first). A stage announces itself once its first
unit is done or the first interval has passed (so an error in the first unit stays the only line), and logs
its total time.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

logger = logging.getLogger("onnx_dacomp")
logger.addHandler(logging.NullHandler())

LOG_INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (it may be replaced later)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def stderr_handler(level: int) -> logging.Handler:
    """The command-line's handler: bare messages, or level and logger name when debugging."""
    handler = StderrHandler()
    handler.setLevel(level)
    handler.setFormatter(
        logging.Formatter("%(message)s" if level > logging.DEBUG else "%(levelname)s %(name)s: %(message)s")
    )
    return handler


@contextmanager
def api_logging(show: bool = True):
    """For a call of the Python API: where the program configured no logging (no handler on this package's
    logger nor on the root), its messages and progress go to stderr as the command line shows them (only
    warnings when `show` is false); a program that configured logging gets the records through its handlers."""
    configured = logging.getLogger().handlers or any(
        not isinstance(handler, logging.NullHandler) for handler in logger.handlers
    )
    if configured:
        yield
        return
    handler, level = stderr_handler(logging.INFO if show else logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.INFO, handler.level))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Progress:
    """Counts units of a stage; reports as a bar (terminal) or as periodic log lines (anything else)."""

    def __init__(
        self, total: int | None, description: str, unit: str, *, work: float | None = None, enabled: bool = True
    ):
        self.total, self.description, self.unit, self.enabled = total, description, unit, enabled
        self.work, self.work_done = work, 0.0
        self.count, self.start, self.announced = 0, time.monotonic(), False
        self.reused, self.reused_work = 0, 0.0  # units found done (cache hits): counted, but took no time
        self.first = None  # (time, count, work) of the first update: the end of the stage's one-off start
        self.parallel = 1  # units that run at once after the first (workers): the first estimate divides by it
        self.units_start = self.start  # when the units began (`restart`)
        self.lock, self.timer = threading.Lock(), None
        terminal = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True) if terminal else None
        if enabled and self.bar is None:
            self._schedule()

    def update(self, count: int = 1, work: float = 0.0, *, reused: bool = False) -> None:
        """`count` more units done, weighing `work` (of the stage's `work`, where it was given). `reused`: found
        done (a cache hit), so they tell nothing of the rate: the time left counts only the units worked on."""
        with self.lock:
            if reused:
                self.reused += count
                self.reused_work += work
            elif self.first is None:
                self.first = (time.monotonic(), count, work)
            self.count += count
            self.work_done += work
            self._announce()
        if self.bar is not None:
            self.bar.update(count)

    def status(self) -> str:
        elapsed = time.monotonic() - self.start
        text = f"{self.count}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}s"
        text += f", {elapsed:.0f} s elapsed"
        if self.total is not None and self.first is not None and self.reused < self.count < self.total:
            text += f", about {self._left():.0f} s left"
        return text

    def _left(self) -> float:
        """Seconds left at the rate so far. Once the first update is a few units behind, the rate is that
        since the first update: the first unit carries the stage's one-off start (sessions, reference
        outputs, worker processes starting) that the others do not repeat."""
        worked = self.count - self.reused  # units worked on, not found done
        weighted = bool(self.work and self.work_done > self.reused_work)
        if weighted:
            done, total = self.work_done - self.reused_work, self.work - self.reused_work
        else:
            done, total = worked, self.total - self.reused
        at, count, work = self.first
        since = done - work if weighted else worked - count
        if worked - count >= 2 and since > 0 and time.monotonic() > at:
            return max(total - done, 0) * (time.monotonic() - at) / since
        return max(total - done, 0) * (time.monotonic() - self.units_start) / done / self.parallel

    def restart(self) -> None:
        """The units start now: what ran before (reference outputs, say) is no unit's work, and the time left
        leaves it out (the elapsed time keeps it)."""
        with self.lock:
            self.units_start = time.monotonic()

    def close(self, finished: bool = True) -> None:
        """End the stage; log its time unless it did not finish (an error is on its way)."""
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.enabled and finished:
                self._announce()
                elapsed = time.monotonic() - self.start
                logger.info("%s: %d %ss in %.1f s", self.description, self.count, self.unit, elapsed)
            self.enabled = False

    def _announce(self) -> None:
        if self.enabled and not self.announced:
            self.announced = True
            logger.info("%s%s ...", self.description, f" ({self.total} {self.unit}s)" if self.total else "")

    def _schedule(self) -> None:
        self.timer = threading.Timer(LOG_INTERVAL, self._tick)
        self.timer.daemon = True
        self.timer.start()

    def _tick(self) -> None:
        with self.lock:
            if not self.enabled:
                return
            self._announce()
            logger.info("%s: %s", self.description, self.status())
            self._schedule()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(finished=kind is None)


def progress(
    total: int | None, description: str, unit: str, *, work: float | None = None, enabled: bool = True
) -> Progress:
    return Progress(total, description, unit, work=work, enabled=enabled)


class StageClock:
    """Wall and CPU time (all threads of the process) of consecutive stages, and the peak memory so far."""

    def __init__(self):
        self.marks = [("start", time.perf_counter(), time.process_time(), _peak_rss())]

    def mark(self, stage: str) -> None:
        self.marks.append((stage, time.perf_counter(), time.process_time(), _peak_rss()))

    def peak_rss(self) -> dict[str, float]:
        """GiB: the process's peak resident memory by the end of each stage."""
        return {stage: round(peak / 2**30, 3) for stage, _, _, peak in self.marks[1:]}

    def seconds(self) -> dict[str, float]:
        return self._spans(1)

    def cpu_seconds(self) -> dict[str, float]:
        return self._spans(2)

    def _spans(self, index: int) -> dict[str, float]:
        spans = {
            later[0]: round(later[index] - earlier[index], 3) for earlier, later in zip(self.marks, self.marks[1:])
        }
        return {**spans, "total": round(self.marks[-1][index] - self.marks[0][index], 3)}


def _peak_rss() -> int:
    """Bytes of the process's peak resident memory (0 where the platform does not say)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        return 0
