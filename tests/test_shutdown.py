"""A run stopped by SIGTERM (as `timeout`, CI limits and process managers stop it) leaves no process, no
temporary folder and no output behind."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from builders import conv_stack


def _descendants(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parent = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found |= {int(entry)} | _descendants(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
@pytest.mark.parametrize("stage", ["calibrating (", "decomposing ("])
def test_sigterm_stops_the_workers_and_leaves_nothing(tmp_path, stage):
    model = conv_stack(channels=128, size=(24, 24), input_channels=3)  # fits enough to go to the workers
    model_path, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "out.onnx"
    onnx.save(model, model_path)
    np.savez(data, x=np.random.default_rng(0).standard_normal((600, 3, 24, 24)).astype(np.float32))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    command = [sys.executable, "-m", "onnx_dacomp", "compress", str(model_path), "-o", str(out), "--data", str(data),
               "--method", "cp", "--ratio", "0.3", "--workers", "2", "--no-sensitivity"]  # fmt: skip
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    for line in run.stderr:
        if stage in line:
            break
    else:
        pytest.fail(f"the run ended before {stage!r}")
    if stage == "decomposing (":
        deadline = time.monotonic() + 20
        while len(_descendants(run.pid)) < 2 and time.monotonic() < deadline:  # the pool's workers
            time.sleep(0.1)
    processes = _descendants(run.pid)
    if stage == "decomposing (":
        assert len(processes) >= 2
    run.send_signal(signal.SIGTERM)
    message = run.stderr.read()
    assert run.wait(timeout=30) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in message and "Traceback" not in message
    time.sleep(5)
    assert not [pid for pid in processes if _alive(pid)]
    assert sorted(os.listdir(tmp_path)) == ["d.npz", "m.onnx", "tmp"]  # no output, no staged file
    assert not [name for name in os.listdir(scratch) if "dacomp" in name]  # statistics, shared model files


def test_workers_leave_when_their_parent_is_killed(tmp_path):
    """SIGKILL cannot be caught: the workers notice that their parent is gone and exit by themselves."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from onnx_dacomp.workers import Workers\n"
        "if __name__ == '__main__':\n"
        "    workers = Workers(2)\n"
        "    for _ in workers.map(time.sleep, [60, 60]):\n"
        "        pass\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 30
    while len(_descendants(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    processes = _descendants(parent.pid)
    assert len(processes) >= 2
    parent.kill()
    parent.wait()
    time.sleep(3)
    assert not [pid for pid in processes if _alive(pid)]
