"""Scale-out: per-layer work in a process pool gives the same bytes; a dead worker is replaced once, then
reported; `--cache-dir` resumes an interrupted run, reuses what another ratio can, and never trusts a bad
entry."""

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from builders import conv_stack

import onnx_dacomp
from onnx_dacomp import cache as cache_module
from onnx_dacomp import fit as fit_module
from onnx_dacomp import log, workers
from onnx_dacomp.calibration import collect
from onnx_dacomp.calibration.sources import ArraySource
from onnx_dacomp.channels import input_producers
from onnx_dacomp.config import CompressConfig
from onnx_dacomp.errors import UserError, WorkerLost
from onnx_dacomp.targets import find_targets

BASE = dict(method="auto", ratio=0.5, holdout=0, max_iter=4, sensitivity_samples=32)


@pytest.fixture(autouse=True)
def propagating(monkeypatch):
    monkeypatch.setattr(log.logger, "propagate", True)


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    smooth = rng.standard_normal((96, 3, 4, 4)).repeat(3, axis=2).repeat(3, axis=3)
    path = tmp_path / "data.npz"
    np.savez(path, x=(smooth + 0.05 * rng.standard_normal((96, 3, 12, 12))).astype(np.float32))
    return path


def _compress(data_file, **options):
    model = conv_stack(channels=16, size=(12, 12), input_channels=3)
    config = CompressConfig(**{**BASE, **options})
    return onnx_dacomp.compress(model, ArraySource(data_file, ["x"]), config, progress=False).model


def _cache_counts(caplog) -> dict[str, tuple[int, int]]:
    """`{kind: (reused, new)}` from the run's cache log line."""
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache ")][-1]
    return {kind: (int(a), int(b)) for kind, a, b in re.findall(r"(\w+): (\d+) reused, (\d+) new", line)}


def test_a_process_pool_gives_the_same_bytes(data_file, monkeypatch):
    monkeypatch.setattr(workers, "POOL_MIN_WORK", 0)  # pool even this small model's stages
    monkeypatch.setattr(workers, "POOL_MIN_SECONDS", 0)  # shards and probes too
    monkeypatch.setattr(collect, "SHARD_SAMPLES", 16)  # and calibrate it in several shards
    submitted, submit = [], workers.Workers._submit
    monkeypatch.setattr(workers.Workers, "_submit", lambda self, f, t: submitted.append(f) or submit(self, f, t))
    alone = _compress(data_file, workers=1)
    assert not submitted
    pooled = _compress(data_file, workers=2)
    units = {function.__name__ for function in submitted}
    assert units == {"run_shard", "probe_error", "_run", "run_task"}, units
    assert submitted.count(collect.run_shard) == 2  # 96 samples in batches of 32: each a shard; the first here
    assert pooled.SerializeToString() == alone.SerializeToString()


def test_statistics_kept_on_disk_give_the_same_bytes(data_file, monkeypatch):
    from onnx_dacomp.calibration import statistics

    in_memory = _compress(data_file, workers=1)
    mapped, load = [], np.load

    def recorded(path, **options):
        if options.get("mmap_mode"):
            mapped.append(path)
        return load(path, **options)

    monkeypatch.setattr(statistics, "SPILL_BYTES", 0)  # this model's statistics go to disk too
    monkeypatch.setattr(np, "load", recorded)
    on_disk = _compress(data_file, workers=1)
    assert {path.name for path in mapped} >= {"second_0.npy", "first_0.npy"}
    assert on_disk.SerializeToString() == in_memory.SerializeToString()


def test_a_ray_cluster_gives_the_same_bytes(data_file, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setattr(workers, "POOL_MIN_WORK", 0)
    monkeypatch.setattr(workers, "POOL_MIN_SECONDS", 0)  # shards and probes too
    monkeypatch.setattr(collect, "SHARD_SAMPLES", 16)
    submitted, remote = [], workers.RayWorkers.map
    monkeypatch.setattr(
        workers.RayWorkers, "map", lambda self, f, t, **kw: submitted.append(f) or remote(self, f, t, **kw)
    )
    on_ray = _compress(data_file, ray="local")
    units = {function.__name__ for function in submitted}
    assert units == {"run_shard", "probe_error", "_run", "run_task"}, units  # all ran as Ray tasks
    assert on_ray.SerializeToString() == _compress(data_file, workers=1).SerializeToString()


def _die_on_first_run(marker: str) -> int:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # as if killed: no exception, the process is gone
    return os.getpid()


def _always_die(_) -> None:
    os._exit(3)


def test_a_dead_worker_is_replaced_once_then_reported(tmp_path):
    with workers.Workers(2) as pool:
        marker = str(tmp_path / "died")
        assert len(list(pool.map(_die_on_first_run, [marker] * 5))) == 5
        assert os.path.exists(marker)
    with workers.Workers(2) as pool, pytest.raises(WorkerLost, match="fewer --workers"):
        list(pool.map(_always_die, range(3)))


@dataclass(frozen=True)
class _Sized:
    value: int
    nbytes: int


def _value(task: _Sized) -> int:
    return task.value


def test_tasks_carrying_large_arrays_go_one_per_worker(monkeypatch):
    """Two tasks per worker in flight, but only one while the tasks in flight carry over WINDOW_BYTES."""
    in_flight, peak, submit = [0], [0], workers.Workers._submit

    def counted(self, function, task):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        return submit(self, function, task)

    monkeypatch.setattr(workers.Workers, "_submit", counted)
    with workers.Workers(2) as pool:
        for size, most in ((1, 4), (workers.WINDOW_BYTES // 2 + 1, 2)):
            in_flight[0] = peak[0] = 0
            results = []
            for result in pool.map(_value, [_Sized(i, size) for i in range(8)]):
                in_flight[0] -= 1
                results.append(result)
            assert results == list(range(8)) and peak[0] == most


def test_a_problem_carries_its_covariance_once():
    from onnx_dacomp.moments import Moments
    from onnx_dacomp.problems import LayerProblem
    from onnx_dacomp.targets import find_targets, read_weights

    model = conv_stack()
    layer = find_targets(model).targets[0]  # 4 -> 4 channels, 3x3: 36-dim patches
    weight = read_weights(model, [layer])[layer.name]
    moments = Moments(np.eye(36)[None], np.zeros((1, 36)), 10)
    problem = LayerProblem.plain(layer.name, layer.geometry, weight, None, moments)
    assert problem.nbytes == 36 * 36 * 8 + weight.size * 8  # Sigma once, and the weight (its own target) once
    refit = LayerProblem.plain(layer.name, layer.geometry, weight, None, moments, bias_refit=True)
    assert refit.nbytes == problem.nbytes + 36 * 36 * 8 + 4 * 8 + 36 * 8  # + centered Sigma, shift, mean


def test_a_problem_s_digest_follows_its_arrays_and_settings_and_survives_pickling():
    """The cache key of a layer's results: computed from the arrays once per problem, yet any other array, other
    settings or another name give another key; a copy sent to a worker gives the same one."""
    import pickle
    from dataclasses import replace

    from onnx_dacomp.cache import digest
    from onnx_dacomp.moments import Moments
    from onnx_dacomp.problems import LayerProblem
    from onnx_dacomp.targets import find_targets, read_weights

    model = conv_stack()
    layer = find_targets(model).targets[0]
    weight = read_weights(model, [layer])[layer.name]
    moments = Moments(np.eye(36)[None], np.zeros((1, 36)), 10)
    problem = LayerProblem.plain(layer.name, layer.geometry, weight, None, moments)
    key = problem.digest("fit", "svd", (2,))
    assert problem.digest("fit", "svd", (2,)) == key == pickle.loads(pickle.dumps(problem)).digest("fit", "svd", (2,))
    assert problem.digest("fit", "svd", (3,)) != key
    assert replace(problem, name="other").digest("fit", "svd", (2,)) != key
    other_moments = Moments(2 * np.eye(36)[None], np.zeros((1, 36)), 10)
    changed = weight.copy()
    changed.flat[5] += 1e-6
    for other in (
        LayerProblem.plain(layer.name, layer.geometry, weight, None, other_moments),
        LayerProblem.plain(layer.name, layer.geometry, changed, None, moments),
    ):
        assert other.digest("fit", "svd", (2,)) != key
    # serialized models are hashed as bytes: one byte apart, two keys
    assert digest(b"model-a") != digest(b"model-b") and digest(b"model-a") == digest(b"model-a")


def test_ray_retries_a_unit_whose_worker_died(tmp_path):
    pytest.importorskip("ray")
    marker = str(tmp_path / "died")

    def die_on_first_run(marker):  # defined here: Ray ships it by value (its workers cannot import tests)
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        return os.getpid()

    with workers.RayWorkers("local") as pool:
        assert len(list(pool.map(die_on_first_run, [marker] * 3))) == 3
    assert os.path.exists(marker)


def test_the_cache_resumes_an_interrupted_run_and_serves_another_ratio(data_file, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="onnx_dacomp")
    uncached = _compress(data_file).SerializeToString()
    cache = tmp_path / "cache"

    calls = []
    real_fit = fit_module.fit_layer

    def interrupted(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two fits
        calls.append(args)
        return real_fit(*args)

    monkeypatch.setattr(fit_module, "fit_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _compress(data_file, cache_dir=str(cache))
    monkeypatch.setattr(fit_module, "fit_layer", real_fit)
    assert len(list((cache / "fits").iterdir())) == 2

    resumed = _compress(data_file, cache_dir=str(cache))
    assert resumed.SerializeToString() == uncached
    counts = _cache_counts(caplog)
    assert counts["statistics"] == (1, 0) and counts["tables"][1] == counts["sensitivities"][1] == 0
    assert counts["fits"][0] == 2 and counts["fits"][1] >= 1

    other = _compress(data_file, cache_dir=str(cache), ratio=0.35)
    assert other.SerializeToString() == _compress(data_file, ratio=0.35).SerializeToString()
    counts = _cache_counts(caplog)
    assert counts["statistics"] == (1, 0) and counts["tables"][1] == counts["sensitivities"][1] == 0
    # a table per layer, and one of pruned candidates per layer whose input channels another layer computes
    model = conv_stack(channels=16, size=(12, 12), input_channels=3)
    assert counts["tables"][0] == 6 + len(input_producers(model, find_targets(model).layers))


def test_entries_of_other_code_are_not_read(data_file, tmp_path, monkeypatch, caplog):
    # the version string stays the same between releases: the key carries a digest of the source
    package = Path(cache_module.__file__).parent
    same, other = (tmp_path / "same", tmp_path / "other")
    for copy in (same, other):
        shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (other / "fit.py").write_text((other / "fit.py").read_text() + "# changed\n")
    assert cache_module.code_digest(same) == cache_module.code_digest()
    changed = cache_module.code_digest(other)
    assert changed != cache_module.code_digest()

    caplog.set_level(logging.INFO, logger="onnx_dacomp")
    cache = tmp_path / "cache"
    _compress(data_file, cache_dir=str(cache))
    monkeypatch.setattr(cache_module, "code_digest", lambda: changed)
    _compress(data_file, cache_dir=str(cache))
    counts = _cache_counts(caplog)
    assert counts["statistics"] == (0, 1) and counts["fits"][0] == counts["tables"][0] == 0


def test_a_corrupt_or_foreign_entry_is_ignored_with_a_warning(data_file, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="onnx_dacomp")
    cache = tmp_path / "cache"
    first = _compress(data_file, cache_dir=str(cache)).SerializeToString()
    tables = sorted((cache / "tables").iterdir())
    tables[0].write_bytes(b"not an archive")
    fits = sorted((cache / "fits").iterdir())
    fits[1].write_bytes(fits[0].read_bytes())  # a valid entry under another key
    again = _compress(data_file, cache_dir=str(cache)).SerializeToString()
    assert again == first
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(tables[0].name in w for w in warnings) and any(fits[1].name in w for w in warnings)
    counts = _cache_counts(caplog)
    assert counts["tables"] == (len(tables) - 1, 1) and counts["fits"] == (len(fits) - 1, 1)


def test_an_unreachable_ray_address_is_a_one_line_error():
    import socket

    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match="cannot connect to the Ray cluster") as error:
        workers.RayWorkers(f"127.0.0.1:{port}")
    assert "\n" not in str(error.value)


def test_a_full_temporary_disk_is_a_one_line_error(data_file, monkeypatch):
    from onnx_dacomp.calibration import statistics

    def full(*args, **options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statistics, "SPILL_BYTES", 0)
    monkeypatch.setattr(statistics.np, "save", full)
    model = conv_stack(channels=16, size=(12, 12), input_channels=3)
    with pytest.raises(UserError, match="No space left on device.*TMPDIR") as caught:
        onnx_dacomp.compress(model, ArraySource(data_file, ["x"]), CompressConfig(**BASE), progress=False)
    assert "\n" not in str(caught.value)
