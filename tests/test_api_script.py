"""The README's Python API snippet, pasted into a plain script without a main guard, runs to the end."""

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "dacomp_cifar_cnn.onnx"


def _snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _images(folder: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")


def _run(script: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_readme_api_snippet_runs_as_a_plain_script(tmp_path):
    snippet = _snippet()
    assert "__main__" not in snippet and "onnx_dacomp.compress(" in snippet
    _images(tmp_path / "images", 40)
    _images(tmp_path / "test_images", 16)
    script = tmp_path / "script.py"
    # the snippet as written, after a prelude that keeps its five latency measurements (each to the
    # --benchmark-seconds cap on a model this small) to a few rounds: timing is not what this test is about
    prelude = "from onnx_dacomp import latency\nlatency.MIN_ROUNDS = latency.MAX_ROUNDS = 4\n"
    script.write_text(prelude + snippet.replace('"model.onnx"', repr(str(BUNDLED))))
    done = _run(script, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "small.onnx").is_file()
    # the work ran in this process and the log said why; progress and the report reached stderr
    assert "per-layer work runs in this process" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    assert "calibrating" in done.stderr and "params kept" in done.stderr
    assert '"layers"' in done.stdout


def test_explicit_workers_in_an_unguarded_script_stop_at_once_naming_the_fix(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        f"import onnx_dacomp\nonnx_dacomp.compress({str(BUNDLED)!r}, 'random', ratio=0.5, workers=2, limit=8)\n"
    )
    start = time.perf_counter()
    done = _run(script, tmp_path)
    assert time.perf_counter() - start < 15 and done.returncode != 0
    assert "workers=2 needs worker processes" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    # the same call under the guard uses the workers and completes
    guarded = tmp_path / "guarded.py"
    body = script.read_text().splitlines()
    guarded.write_text(body[0] + "\nif __name__ == '__main__':\n    " + body[1] + "\n")
    done = _run(guarded, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "per-layer work runs in this process" not in done.stderr
