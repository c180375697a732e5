"""onnxruntime sessions on the chosen execution provider (`auto`, `cuda` or `cpu`), and what actually ran."""

from __future__ import annotations

import ctypes

import onnx

from .config import DEVICES
from .errors import UserError
from .log import logger

# BLAS threads for the per-layer solvers. Their work is many small and medium factorizations between
# GEMMs, and OpenBLAS's threads wake up slowly between calls: on ResNet-56 layers (2 cores) one thread ran
# CP-ALS 30x and DA-Tucker-2 2-13x faster than two. The cores are used by running layers side by side.
SOLVER_BLAS_THREADS = 1

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def create_session(
    model: onnx.ModelProto | bytes,
    device: str = "auto",
    *,
    optimize: bool = True,
    optimized_path: str | None = None,
    arena: bool = True,
    stop_spinning: bool = False,
    threads: int | None = None,
    tf32: bool = True,
):
    """An InferenceSession on `device`; `auto` takes CUDA when it really starts, else the CPU.
    `optimized_path`: where onnxruntime writes the graph it optimized (to inspect what it will run).
    `arena=False`: release intermediate buffers instead of keeping the peak allocation (large graphs run
    once per batch). `stop_spinning=True`: worker threads stop busy-waiting as soon as a run returns (between
    a run's operators they spin, as by default), so an idle session takes no core from another's runs. `threads`:
    intra-op threads (default: onnxruntime's, one per core), fewer where several processes share the cores.
    `tf32=False`: full float32 products on CUDA (TF32 rounds inputs to 10 mantissa bits: fine for inference,
    not for sums of squares).

    onnxruntime-gpu lists CUDA as available even without a GPU or CUDA libraries and silently runs on the
    CPU, so the provider is checked on the created session.
    """
    import onnxruntime as ort  # deferred: importing onnxruntime costs a second on every CLI start

    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    payload = model if isinstance(model, bytes) else model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = arena
    if threads is not None:
        options.intra_op_num_threads = threads
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    want_cuda = device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers())
    if want_cuda:
        if device == "auto":
            ort.set_default_logger_severity(4)  # a failed CUDA start is expected on CPU-only machines
        try:
            cuda = (CUDA, {} if tf32 else {"use_tf32": "0"})
            session = _session(ort, payload, options, [cuda, CPU])
        finally:
            ort.set_default_logger_severity(2)
        if session.get_providers()[0] == CUDA:
            return session
        if device == "cuda":
            raise UserError(
                "the CUDA execution provider could not start (no GPU, or CUDA/cuDNN libraries "
                "missing for this onnxruntime-gpu); use --device cpu"
            )
        logger.debug("CUDA execution provider unavailable; using the CPU")
    return _session(ort, payload, options, [CPU])


def _session(ort, payload: bytes, options, providers):
    try:
        return ort.InferenceSession(payload, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise UserError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def provider_name(session) -> str:
    return session.get_providers()[0].replace("ExecutionProvider", "")


def blas_threads(count: int = SOLVER_BLAS_THREADS):
    """A context in which numpy/scipy's BLAS runs `count` threads (threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=count, user_api="blas")


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the operating system (glibc's `malloc_trim`; elsewhere
    nothing). Calibration frees hundreds of MB of onnxruntime outputs, run after run, that the allocator would
    otherwise keep mapped for the rest of the process (0.3 GB on a ResNet-50 at 224x224)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
