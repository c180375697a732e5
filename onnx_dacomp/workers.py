"""Where per-layer work runs: in this process, or in a pool of worker processes (`--workers N`).

The work units (candidate tables, layer fits) are pure functions of picklable arguments, so any executor
can run them; results come back in the order of the tasks, whatever order they finish in, so the output is
the same for any number of workers. At most two tasks per worker are in flight, and beyond one per worker
only while the tasks in flight carry at most WINDOW_BYTES: a task carries its layer's covariance (`nbytes`),
and the parent builds them as the window moves. Each worker runs one BLAS thread
(runtime.SOLVER_BLAS_THREADS): workers x threads = cores. A large value that every task reads (the model)
goes to the workers once, through `share`: a file for the local pool, Ray's object store on a cluster.
"""

from __future__ import annotations

import ast
import builtins
import multiprocessing
import os
import pickle
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from .errors import UserError, WorkerLost
from .log import logger
from .runtime import SOLVER_BLAS_THREADS

_limits = None  # the worker's BLAS thread limit, kept for the life of the process
_progress = None  # a pool worker's queue to its parent: units report partial progress through it

# Solver work (geometry.solver_work units) below which a stage runs in this process: starting a worker
# (a fresh interpreter importing numpy, scipy and onnx) costs about a second, more than such stages take.
POOL_MIN_WORK = 10**9
# Where the work is measured instead (calibration shards, sensitivity probes: the first unit runs here), the
# rest goes to the workers only if it would take this long here.
POOL_MIN_SECONDS = 2.0
# Bytes of tasks in flight (their `nbytes`) above which a worker gets no second task before its first is done:
# the parent holds each task until its result is back (ResNet-50-shaped: 170 MB covariances; two per worker
# put the parent 0.35 GB higher, while a worker waits about 0.2 s for its next one)
WINDOW_BYTES = 256 * 2**20


def default_workers() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, eq=False)
class Shared:
    """A large value stored once for all tasks that read it, instead of travelling with each: held here (in
    this process), in a file (local pool) or in Ray's object store; `key` names it (a digest)."""

    key: str
    value: object = None
    path: str | None = None
    reference: object = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        """Whether the value is held in this process (no copy to load)."""
        return self.path is None and self.reference is None

    def get(self):
        """The value (read again on each call: callers keep what they build from it)."""
        if self.path is not None:
            with open(self.path, "rb") as file:
                return pickle.load(file)
        if self.reference is not None:
            import ray

            return ray.get(self.reference)
        return self.value


class Workers:
    """`map(function, tasks)` over a process pool of `count` workers (in this process for 1), started on
    first use."""

    cluster = False  # whether the workers are other machines' (Ray), not this one's cores
    reports_progress = True  # units report partial progress while they run (`report_progress`)

    def __init__(self, count: int = 1):
        self.count = max(1, count)
        self.pool = None
        self.folder = None  # where shared values are written for the pool
        self.queue, self.on_progress = None, None  # the workers' progress reports

    def pays(self, seconds_here: float, size: int, local_limit: int) -> bool:
        """Whether units measured to take `seconds_here` more seconds in this process should go to the
        workers: enough work (POOL_MIN_SECONDS), and, for local workers, which hold a copy of what the units
        read (a model, its sums), a `size` within `local_limit` bytes."""
        return self.count > 1 and seconds_here >= POOL_MIN_SECONDS and (self.cluster or size <= local_limit)

    @property
    def threads(self) -> int:
        """Threads per worker (onnxruntime's intra-op threads): workers x threads = cores."""
        return max(1, default_workers() // self.count)

    def share(self, value, key: str) -> Shared:
        """`value` as the workers will read it; `key` names it (a digest of its content)."""
        if self.count == 1:
            return Shared(key, value)
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="onnx-dacomp-shared-")
        path = os.path.join(self.folder, key)
        if not os.path.exists(path):
            with open(path, "wb") as file:
                pickle.dump(value, file, protocol=pickle.HIGHEST_PROTOCOL)
        return Shared(key, path=path)

    def map_for(self, work: int) -> Callable:
        """The map for a stage of `work` solver units: the pool's, or the builtin one for small stages."""
        return self.map if self.count > 1 and work >= POOL_MIN_WORK else builtins.map

    def map(
        self, function: Callable, tasks: Iterable, per_worker: int = 2, progress: Callable | None = None
    ) -> Iterator:
        """`function(task)` for every task, in order, with at most `per_worker` tasks per worker in flight. A
        worker that dies (killed, out of memory) takes the pool with it: the pool is started again and the
        unfinished units run once more; a second loss is a `WorkerLost` error. `progress(count)` receives
        what the units report while they run (`report_progress`)."""
        if self.count == 1:
            yield from builtins.map(function, tasks)
            return
        self.on_progress = progress
        window: deque = deque()  # (task, future), oldest first
        retried = False
        for task in tasks:
            window.append((task, self._submit(function, task)))
            while len(window) >= per_worker * self.count or (
                len(window) >= self.count and sum(getattr(t, "nbytes", 0) for t, _ in window) > WINDOW_BYTES
            ):
                result, retried = self._first_result(function, window, retried)
                yield result
                del result  # not held while waiting for the next one
        while window:
            result, retried = self._first_result(function, window, retried)
            yield result
            del result

    def _submit(self, function: Callable, task):
        if self.pool is None:
            context = multiprocessing.get_context("spawn")  # no fork of a process with running threads
            queue = context.SimpleQueue()
            self.pool = ProcessPoolExecutor(
                self.count, mp_context=context, initializer=_initialize, initargs=(os.getpid(), queue)
            )
            threading.Thread(target=self._forward_progress, args=(queue,), daemon=True).start()
            self.queue = queue
        return self.pool.submit(function, task)

    def _forward_progress(self, queue) -> None:
        """The parent's end of the workers' progress reports (`report_progress`): each goes to the callback
        of the map in progress."""
        while (count := queue.get()) is not None:
            if self.on_progress is not None:
                self.on_progress(count)

    def _first_result(self, function: Callable, window: deque, retried: bool):
        try:
            result = window[0][1].result()
        except BrokenProcessPool:
            if retried:
                self.close()
                raise WorkerLost(
                    "a worker process died twice (killed, out of memory, or it could not start: a script must call "
                    'onnx_dacomp under `if __name__ == "__main__":`): run with fewer --workers; with --cache-dir a '
                    "rerun keeps the finished units"
                ) from None
            logger.warning("a worker process died: restarting the pool and running its units again")
            self.close()
            for index, (task, _) in enumerate(window):
                window[index] = (task, self._submit(function, task))
            return self._first_result(function, window, True)
        window.popleft()
        return result, retried

    def close(self, abort: bool = False) -> None:
        """Stop the workers (`abort`: at once, dropping the units they run: the run is being stopped) and
        remove the shared files."""
        if self.pool is not None:
            if abort:  # shutdown() alone would wait for the running units
                for process in list((getattr(self.pool, "_processes", None) or {}).values()):
                    process.terminate()
            self.pool.shutdown(wait=not abort, cancel_futures=True)
            self.pool = None
            self.queue.put(None)  # ends the forwarding thread
            self.queue = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(abort=kind is not None)


class RayWorkers(Workers):
    """The same units as Ray tasks on a cluster (`--ray ADDRESS`: `auto` for the running cluster, `local` to
    start one in this process, or a `ray://` address). Ray places the tasks, moves their arguments through
    its object store and retries a unit whose worker died; what still fails is a `WorkerLost` error."""

    cluster = True
    reports_progress = False  # tasks report only by returning

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise UserError("--ray needs Ray: pip install 'onnx-dacomp[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            _check_reachable(address)
            try:
                ray.init(address=None if address == "local" else address, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                reason = (str(exc) or type(exc).__name__).splitlines()[0]
                raise UserError(f"cannot connect to the Ray cluster at {address!r}: {reason}") from None
            self.owned = True
        else:
            self.owned = False
        super().__init__(max(1, int(ray.cluster_resources().get("CPU", 1))))
        self.remote = ray.remote(num_cpus=1, max_retries=2)(_run_limited)

    def map_for(self, work: int) -> Callable:
        return self.map if work >= POOL_MIN_WORK else builtins.map

    @property
    def threads(self) -> int:
        return 1  # a task holds one CPU (num_cpus=1)

    def share(self, value, key: str) -> Shared:
        return Shared(key, reference=self.ray.put(value))

    def map(
        self, function: Callable, tasks: Iterable, per_worker: int = 2, progress: Callable | None = None
    ) -> Iterator:
        window = self.window = deque()
        for task in tasks:
            window.append(self.remote.remote(function, task))
            while len(window) >= per_worker * self.count:
                yield self._get(window.popleft())
        while window:
            yield self._get(window.popleft())

    def _get(self, reference):
        try:
            return self.ray.get(reference)
        except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError,
                self.ray.exceptions.ObjectLostError) as exc:  # fmt: skip
            raise WorkerLost(
                f"a Ray worker died and its retries failed ({type(exc).__name__}): check the cluster's memory; "
                "with --cache-dir a rerun keeps the finished units"
            ) from None

    def close(self, abort: bool = False) -> None:
        if abort and self.ray.is_initialized():  # the tasks this run started, also on a cluster it joined
            for reference in getattr(self, "window", ()):
                self.ray.cancel(reference, force=True)
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT address (or ray://HOST:PORT) must accept a connection: against a dead address Ray retries
    for minutes and logs every attempt instead of failing."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # auto, local: Ray fails fast itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(
            f"cannot connect to the Ray cluster at {address!r}: {exc.strerror or exc} (is a head node running there?)"
        ) from None


def executor(count: int | None, ray_address: str | None) -> Workers:
    """Where the per-layer units run: a Ray cluster, else `count` local processes (default: the cores)."""
    return RayWorkers(ray_address) if ray_address else Workers(count or default_workers())


def script_without_main_guard() -> str | None:
    """The main script's path when the running call comes from its top level outside an
    `if __name__ == "__main__":` block; None otherwise (guarded, inside a function, interactive, `python -m`).
    Worker processes are spawned: each imports the main script again, so such a script would run the call
    once more in every worker, which then dies starting workers of its own."""
    frame, caller = sys._getframe(), None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
            caller = frame
        frame = frame.f_back
    path = caller.f_code.co_filename if caller is not None else None
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if path is None or not os.path.isfile(path) or (spec is not None and spec.name.endswith("__main__")):
        return None  # multiprocessing does not import a package's __main__ again
    try:
        with open(path, "rb") as file:
            tree = ast.parse(file.read())
    except (OSError, SyntaxError, ValueError):
        return None
    guarded = (
        range(statement.lineno, statement.end_lineno + 1)
        for statement in tree.body
        if isinstance(statement, ast.If) and _is_main_test(statement.test)
    )
    return None if any(caller.f_lineno in lines for lines in guarded) else path


def _is_main_test(test: ast.expr) -> bool:
    """Whether `test` is `__name__ == "__main__"` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = {ast.dump(test.left), ast.dump(test.comparators[0])}
    return sides == {ast.dump(ast.Name("__name__", ast.Load())), ast.dump(ast.Constant("__main__"))}


def workers_for_script(count: int | None, ray_address: str | None) -> int | None:
    """`count`, unless the call comes from the top level of a script without a main guard
    (`script_without_main_guard`): then 1 (this process) where no count was asked for, and a one-line error
    naming the fix where one was."""
    script = None if ray_address or count == 1 else script_without_main_guard()
    if script is None:
        return count
    fix = f'put the call in {os.path.basename(script)} under `if __name__ == "__main__":`'
    if count is not None:
        raise UserError(f"workers={count} needs worker processes, which import the calling script again: {fix}")
    logger.info("per-layer work runs in this process: to use worker processes (all cores), %s", fix)
    return 1


def _run_limited(function: Callable, task):
    if _limits is None:
        _initialize()
    return function(task)


def report_progress(count: int) -> None:
    """In a pool worker: `count` more items of the running unit are done (the parent's progress moves as
    they finish, not only when the unit returns). Elsewhere nothing."""
    if _progress is not None:
        _progress.put(count)


def _initialize(parent: int | None = None, progress=None) -> None:
    """A worker's set-up: one BLAS thread; a pool worker also watches `parent`, the process that started it,
    and reports progress through the queue `progress`."""
    global _limits, _progress
    from threadpoolctl import threadpool_limits

    _limits = threadpool_limits(limits=SOLVER_BLAS_THREADS, user_api="blas")
    _progress = progress
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """A worker's watch: once the process that started it is gone (killed with SIGKILL, say, so that it could
    not stop its workers; perhaps before this worker even started), the worker is re-parented and leaves at
    once instead of computing for nobody."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)
