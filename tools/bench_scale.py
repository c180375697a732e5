"""Scale-out figures: per-layer stages on 1 vs N local workers, on a two-node Ray cluster, resumed runs, and
a projection of the ResNet-50-shaped model's time on N workers from measured unit costs.

    python3 tools/bench_scale.py [--parts stages,identity,cache,ray,projection] [--workers 1,2]

- stages: ResNet-56 `--method auto --ratio 0.5` (2000 seeded CIFAR-10 train images) with each --workers;
  the calibration, candidate-table, sensitivity and fit stages are timed separately (ratio against
  --workers 1).
- identity: sha256 of ResNet-20 `--method cp --ratio 0.5` (CLI) with --workers 1, 2 and on Ray.
- cache: an uncached ResNet-56 run; the same run with --cache-dir killed (SIGKILL) once some fits are stored;
  the rerun's time against the uncached one and its sha256; a run at --ratio 0.4 on the same cache.
- ray: ResNet-56 on a two-node Ray cluster started here (`ray start --head --num-cpus 1` plus a second
  `ray start --address ... --num-cpus 1`), stage times against --workers 1.
- projection: the ResNet-50-shaped model (tools/make_resnet50.py) with --workers 1: every unit's cost is
  logged, and the time on N workers is projected by replaying the units largest-first onto N workers.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_speed import prepare  # noqa: E402

RESNET20 = ROOT.parent / "shared" / "models" / "cifar10_resnet20.onnx"


def timed_run(model, data: list[str], limit, options: dict, unit_log: list | None = None) -> dict:
    """compress in this process with the pipeline's per-layer stages timed; `unit_log` collects
    (stage, layer, work estimate, seconds) of every unit (run in this process: --workers 1)."""
    import onnx_dacomp
    from onnx_dacomp import fit, pipeline
    from onnx_dacomp.cli import build_parser
    from onnx_dacomp.cli.compress_command import config_from_args
    from onnx_dacomp.geometry import solver_work
    from onnx_dacomp.ranks import candidates

    argv = ["compress", str(model), "-o", "unused.onnx", "--data", *data, "--device", "cpu", "--holdout", "0"]
    argv += ["--limit", str(limit)] if limit else []
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    stages: dict[str, float] = {}
    originals = {}

    def timer(module, name, stage):
        function = originals[(module, name)] = getattr(module, name)

        def wrapped(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - start

        setattr(module, name, wrapped)

    def unit_timer(module, name, stage):
        function = originals[(module, name)] = getattr(module, name)

        def wrapped(task):
            start = time.perf_counter()
            result = function(task)
            problem = task.problem
            unit_log.append((stage, problem.name, solver_work(problem.geometry), time.perf_counter() - start))
            return result

        setattr(module, name, wrapped)

    timer(pipeline, "candidate_tables", "tables")
    timer(pipeline, "allocation_weights", "sensitivity")
    timer(pipeline, "fit_all", "fits")
    timer(pipeline, "calibrated", "calibrate")
    if unit_log is not None:
        unit_timer(candidates, "_run", "tables")
        unit_timer(fit, "run_task", "fits")
    start = time.perf_counter()
    try:
        result = onnx_dacomp.compress(model, args.data, config, progress=False)
    finally:
        for (module, name), function in originals.items():
            setattr(module, name, function)
    stages["total"] = time.perf_counter() - start
    stages["sha256"] = hashlib.sha256(result.model.SerializeToString()).hexdigest()
    return stages


def stage_rows(results: dict[str, dict]) -> list[str]:
    base = next(iter(results.values()))
    rows = ["| run | calibrate s | tables s | sensitivity s | fits s | total s | tables+fits speed-up | "
            "calibrate, sensitivity speed-up |"]  # fmt: skip
    rows.append("|---|---|---|---|---|---|---|---|")
    for name, stages in results.items():
        speedup = (base["tables"] + base["fits"]) / (stages["tables"] + stages["fits"])
        rows.append(
            f"| {name} | {stages['calibrate']:.1f} | {stages['tables']:.1f} | {stages['sensitivity']:.1f} | "
            f"{stages['fits']:.1f} | {stages['total']:.1f} | {speedup:.2f}x "
            f"(tables {base['tables'] / stages['tables']:.2f}x, fits {base['fits'] / stages['fits']:.2f}x) | "
            f"{base['calibrate'] / stages['calibrate']:.2f}x, {base['sensitivity'] / stages['sensitivity']:.2f}x |"
        )
    return rows


def cli(argv: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as stream:
        subprocess.run(
            [sys.executable, "-m", "onnx_dacomp", *argv], stdout=stream, stderr=subprocess.STDOUT, check=True
        )
    return time.perf_counter() - start


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ray_cluster(workdir: Path):
    """Start a two-node Ray cluster (one CPU each) on this machine; returns its address. Token
    authentication on every process (recent Ray's head takes ~/.ray/auth_token when there is one, and a
    node joining without it is refused), set here so that the runs started from this script inherit it."""
    port = 6391
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    ray_stop()
    subprocess.run(["ray", "get-auth-token", "--generate"], check=True, capture_output=True)
    subprocess.run(["ray", "start", "--head", "--num-cpus", "1", "--port", str(port), "--include-dashboard", "false"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["ray", "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1"],
                   check=True, capture_output=True)  # fmt: skip
    return f"127.0.0.1:{port}"


def ray_stop():
    subprocess.run(["ray", "stop", "--force"], capture_output=True)


def makespan(units: list[tuple], workers: int) -> float:
    """Units (largest work first, as the pool hands them out) replayed onto `workers` workers."""
    finish = [0.0] * workers
    for _, _, _, seconds in units:
        heapq.heapreplace(finish, finish[0] + seconds)
    return max(finish)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="stages,identity,cache,ray,projection")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-dacomp-bench")
    args = parser.parse_args()
    parts = args.parts.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, data, limit, _, _ = prepare("resnet56", args.workdir)
    auto = {"method": "auto", "ratio": 0.5}

    if "stages" in parts:
        results = {}
        for count in args.workers.split(","):
            results[f"--workers {count}"] = timed_run(model, data, limit, {**auto, "workers": count})
        print("\n## ResNet-56 --method auto --ratio 0.5: stages by workers\n")
        print("\n".join(stage_rows(results)))
        print("same sha256:", len({r["sha256"] for r in results.values()}) == 1)

    if "identity" in parts:
        out = args.workdir / "scale_identity"
        out.mkdir(exist_ok=True)
        base = ["compress", str(RESNET20), "--data", *data, "--limit", "1000", "--method", "cp", "--ratio", "0.5"]
        runs = {"--workers 1": ["--workers", "1"], "--workers 2": ["--workers", "2"]}
        address = None
        try:
            address = ray_cluster(args.workdir)
            runs["--ray (two nodes)"] = ["--ray", address]
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"no Ray cluster: {exc}: {getattr(exc, 'stderr', b'')[-300:]}")
            ray_stop()
        print("\n## ResNet-20 --method cp --ratio 0.5: output sha256\n")
        for name, extra in runs.items():
            path = out / f"{name.replace(' ', '_').strip('-()')}.onnx"
            seconds = cli([*base, "-o", str(path), *extra], out / f"{path.stem}.log")
            print(f"{name}: {sha(path)} ({seconds:.1f} s)")
        if address:
            ray_stop()

    if "cache" in parts:
        out = args.workdir / "scale_cache"
        cache = out / "cache"
        subprocess.run(["rm", "-rf", str(out)])
        out.mkdir()
        base = ["compress", str(model), "--data", *data, "--limit", str(limit), "--method", "auto", "--ratio", "0.5"]
        uncached = cli([*base, "-o", str(out / "uncached.onnx")], out / "uncached.log")
        command = [
            sys.executable,
            "-m",
            "onnx_dacomp",
            *base,
            "-o",
            str(out / "cached.onnx"),
            "--cache-dir",
            str(cache),
        ]
        start = time.perf_counter()
        with open(out / "killed.log", "w") as stream:
            child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
            while child.poll() is None and len(list((cache / "fits").glob("*.npz"))) < 20:
                time.sleep(0.2)
            child.send_signal(signal.SIGKILL)
            child.wait()
        killed_after = time.perf_counter() - start
        stored = len(list((cache / "fits").glob("*.npz")))
        left = (out / "cached.onnx").exists()
        resumed = cli([*base, "-o", str(out / "cached.onnx"), "--cache-dir", str(cache)], out / "resumed.log")
        other = cli([*base[:-1], "0.4", "-o", str(out / "other.onnx"), "--cache-dir", str(cache)], out / "other.log")
        other_line = [line for line in (out / "other.log").read_text().splitlines() if "cache " in line]
        print("\n## ResNet-56 --method auto --ratio 0.5 with --cache-dir\n")
        print(f"uncached run: {uncached:.1f} s")
        print(f"cached run killed after {killed_after:.1f} s with {stored} fits stored; output file left: {left}")
        print(f"resumed run: {resumed:.1f} s = {resumed / uncached:.0%} of the uncached run; same bytes: "
              f"{sha(out / 'cached.onnx') == sha(out / 'uncached.onnx')}")  # fmt: skip
        reuse = other_line[-1] if other_line else ""
        print(f"--ratio 0.4 on the same cache: {other:.1f} s = {other / uncached:.0%}; {reuse}")

    if "ray" in parts:
        results = {"--workers 1": timed_run(model, data, limit, {**auto, "workers": 1})}
        address = ray_cluster(args.workdir)
        try:
            results["--ray two nodes x 1 CPU"] = timed_run(model, data, limit, {**auto, "ray": address})
        finally:
            ray_stop()
        print("\n## ResNet-56 --method auto --ratio 0.5 on a two-node Ray cluster (this machine)\n")
        print("\n".join(stage_rows(results)))
        print("same sha256:", len({r["sha256"] for r in results.values()}) == 1)

    if "projection" in parts:
        model50, data50, _, _, _ = prepare("resnet50", args.workdir)
        units: list[tuple] = []
        stages = timed_run(model50, data50, None, {**auto, "workers": 1}, unit_log=units)
        log = args.workdir / "scale_units.json"
        log.write_text(json.dumps(units, indent=1))
        print(f"\n## ResNet-50-shaped --method auto --ratio 0.5: {len(units)} units (costs in {log})\n")
        for stage in ("tables", "fits"):
            chosen = sorted((u for u in units if u[0] == stage), key=lambda u: -u[2])
            seconds = [u[3] for u in chosen]
            print(f"{stage}: {len(chosen)} units, {sum(seconds):.1f} s in units (stage {stages[stage]:.1f} s), "
                  f"largest unit {max(seconds):.1f} s ({chosen[seconds.index(max(seconds))][1]})")  # fmt: skip
        serial = stages["total"] - stages["tables"] - stages["fits"]
        rows = [
            "| workers | tables s | fits s | other stages s (not spread) | projected total s |",
            "|---|---|---|---|---|",
        ]
        for count in (1, 2, 4, 8, 16):
            spans = {
                stage: makespan(sorted((u for u in units if u[0] == stage), key=lambda u: -u[2]), count)
                for stage in ("tables", "fits")
            }  # fmt: skip
            overhead = {s: stages[s] - sum(u[3] for u in units if u[0] == s) for s in ("tables", "fits")}
            tables, fits = spans["tables"] + overhead["tables"], spans["fits"] + overhead["fits"]
            rows.append(f"| {count} | {tables:.0f} | {fits:.0f} | {serial:.0f} | {tables + fits + serial:.0f} |")
        print("\n".join(rows))
        print(f"measured with --workers 1: total {stages['total']:.0f} s (calibrate {stages['calibrate']:.0f} s, "
              f"sensitivity {stages['sensitivity']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
