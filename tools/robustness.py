"""Push every hostile or broken input through the CLI and check how it fails.

    python3 tools/robustness.py

Each case runs `python -m onnx_dacomp ...` in a fresh process on generated files and must exit non-zero
with a one-line error as its last line (no traceback; log lines of a run that had started may precede
it), leave its input files byte-for-byte unchanged, and leave no output (nor temporary files) behind.
Prints a table: case, exit code, message, input unchanged, output absent. Exits 1 if any row fails.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PYTHON = [sys.executable, "-m", "onnx_dacomp"]


def conv_stack(path: Path, *, weight_fill=None, channels=8, size=16) -> Path:
    """Two 3x3 convs with ReLU, input `x` [N, 3, size, size]."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for index, fan_in in enumerate((3, channels)):
        weight = rng.standard_normal((channels, fan_in, 3, 3)).astype(np.float32)
        if weight_fill is not None and index == 1:
            weight[0, 0, 0, 0] = weight_fill
        inits.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes.append(helper.make_node("Conv", [current, f"w{index}"], [f"c{index}"], name=f"conv{index}", pads=[1] * 4))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        current = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info(current, onnx.TensorProto.FLOAT, ["n", channels, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path))
    return path


def two_inputs(path: Path) -> Path:
    """A 1-D conv over `signal [B, T]` (T dynamic) plus a `state [2, B, 8]` with the batch on axis 1."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 1, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array(np.array([0, 2], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["signal", "axis"], ["s3"]),
        helper.make_node("Conv", ["s3", "w"], ["c"], name="conv", pads=[1, 1]),
        helper.make_node("ReduceSum", ["state", "axes"], ["total"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("signal", onnx.TensorProto.FLOAT, ["B", "T"]),
            helper.make_tensor_value_info("state", onnx.TensorProto.FLOAT, [2, "B", 8]),
        ],
        [
            helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None),
            helper.make_tensor_value_info("total", 1, None),
        ],
        inits,
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path


def looped(path: Path) -> Path:
    """Its only Convs inside a Loop body."""
    inner = onnx.load(str(conv_stack(path)))
    body = helper.make_graph(
        list(inner.graph.node),
        "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []), helper.make_tensor_value_info("c", 9, [])],
        [helper.make_tensor_value_info("c", 9, []), helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, None)],
        list(inner.graph.initializer),
    )
    nodes = [helper.make_node("Loop", ["count", ""], ["stacked"], name="loop", body=body)]
    graph = helper.make_graph(
        nodes,
        "looped",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("stacked", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(2, np.int64), "count")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def images(folder: Path, count: int, *, broken: bool = False) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def cases(root: Path) -> list[tuple[str, list[str], list[Path], Path | None, float | None]]:
    """(name, CLI arguments, input files that must stay unchanged, output that must not exist, SIGINT after s,
    or (s, signal))."""
    model = conv_stack(root / "model.onnx")
    out = root / "out.onnx"
    data = root / "data.npz"
    np.savez(data, x=np.random.default_rng(2).standard_normal((64, 3, 16, 16)).astype(np.float32))
    found = []

    def add(name, args, inputs, output=out, interrupt=None):
        found.append((name, [str(a) for a in args], [Path(p) for p in inputs], output, interrupt))

    valid = conv_stack(root / "valid.onnx")
    truncated = root / "truncated.onnx"
    truncated.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    add("truncated model", ["compress", truncated, "-o", out, "--data", data], [truncated])
    corrupt = root / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    add("corrupt model (random bytes)", ["compress", corrupt, "-o", out, "--data", data], [corrupt])
    add("directory as model", ["compress", root, "-o", out, "--data", data], [])
    text = root / "notes.txt"
    text.write_text("not a model\n" * 10)
    add("non-ONNX file as model", ["compress", text, "-o", out, "--data", data], [text])

    external_dir = root / "external"
    external_dir.mkdir()
    external = onnx.load(str(valid))
    onnx.save_model(
        external, str(external_dir / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0
    )
    (external_dir / "m.data").unlink()
    add(
        "missing external data",
        ["compress", external_dir / "m.onnx", "-o", out, "--data", data],
        [external_dir / "m.onnx"],
    )

    for label, value in (("NaN", np.nan), ("Inf", np.inf)):
        broken = conv_stack(root / f"{label}.onnx", weight_fill=value)
        add(f"{label} weights", ["compress", broken, "-o", out, "--data", data], [broken])

    wrong_shape = root / "wrong_shape.npz"
    np.savez(wrong_shape, x=np.zeros((8, 3, 12, 12), np.float32))
    add("data of the wrong shape", ["compress", model, "-o", out, "--data", wrong_shape], [model, wrong_shape])
    wrong_dtype = root / "wrong_dtype.npz"
    np.savez(wrong_dtype, x=np.zeros((8, 3, 16, 16), np.int64))
    add("data of the wrong dtype", ["compress", model, "-o", out, "--data", wrong_dtype], [model, wrong_dtype])
    wrong_name = root / "wrong_name.npz"
    np.savez(wrong_name, x=np.zeros((8, 3, 16, 16), np.float32), y=np.zeros((8, 3, 16, 16), np.float32))
    add("data with wrong input names", ["compress", model, "-o", out, "--data", wrong_name], [model, wrong_name])
    nan_data = root / "nan_data.npz"
    values = np.ones((8, 3, 16, 16), np.float32)
    values[0, 0, 0, 0] = np.nan
    np.savez(nan_data, x=values)
    add("NaN in the data", ["compress", model, "-o", out, "--data", nan_data], [model, nan_data])
    huge = root / "huge.npz"
    np.savez(huge, x=np.full((8, 3, 16, 16), 3e38, np.float32))
    add("activations overflow to Inf", ["compress", model, "-o", out, "--data", huge], [model, huge])
    empty = root / "empty_images"
    empty.mkdir()
    add("empty image folder", ["compress", model, "-o", out, "--data", empty], [model])
    broken_images = images(root / "broken_images", 4, broken=True)
    add(
        "unreadable image",
        ["compress", model, "-o", out, "--data", broken_images],
        [model, broken_images / "broken.png"],
    )

    ranks = root / "ranks.json"
    ranks.write_text('{"conv1": [64, 64]}')
    add("ranks larger than the layer", ["compress", model, "-o", out, "--data", data, "--ranks", ranks], [model, ranks])
    for ratio in ("0", "1.5", "-0.2", "abc"):
        add(f"ratio {ratio}", ["compress", model, "-o", out, "--data", data, "--ratio", ratio], [model])
    for bound in ("0", "-0.1", "1.5", "abc"):
        add(f"--max-error {bound}", ["compress", model, "-o", out, "--data", data, "--max-error", bound], [model])
    add("--workers 0", ["compress", model, "-o", out, "--data", data, "--workers", "0"], [model])
    add("--cache-dir is a file", ["compress", model, "-o", out, "--data", data, "--cache-dir", model], [model])
    add("output path equal to the input", ["compress", model, "-o", model, "--data", data], [model], output=None)
    add("output folder missing", ["compress", model, "-o", root / "nowhere" / "out.onnx", "--data", data], [model],
        output=root / "nowhere")  # fmt: skip
    add("output folder not writable", ["compress", model, "-o", "/proc/out.onnx", "--data", data], [model],
        output=Path("/proc/out.onnx"))  # fmt: skip
    pair = two_inputs(root / "two_inputs.onnx")
    pair_data = root / "pair.npz"
    np.savez(pair_data, signal=np.zeros((16, 32), np.float32), state=np.zeros((2, 16, 8), np.float32))
    add(
        "two inputs, dynamic T, no --input-shape", ["compress", pair, "-o", out, "--data", pair_data], [pair, pair_data]
    )
    swapped = root / "swapped.npz"
    np.savez(swapped, signal=np.zeros((16, 32), np.float32), state=np.zeros((16, 2, 8), np.float32))
    add("state stored with the batch on the wrong axis",
        ["compress", pair, "-o", out, "--data", swapped, "--input-shape", "signal:-1x32"], [pair, swapped])  # fmt: skip
    add("--input-shape with the wrong rank", ["compress", pair, "-o", out, "--data", pair_data, "--input-shape",
        "signal:1x1x32"], [pair])  # fmt: skip
    add("--input-shape of an unknown input", ["compress", model, "-o", out, "--data", data, "--input-shape",
        "image:1x3x16x16"], [model])  # fmt: skip
    add("--batch-axis beyond the input's rank", ["compress", pair, "-o", out, "--data", pair_data, "--input-shape",
        "signal:-1x32", "--batch-axis", "state:5"], [pair])  # fmt: skip
    add("--batch-axis malformed", ["compress", model, "-o", out, "--data", data, "--batch-axis", "x=0"], [model])
    add("image folder for a two-input model", ["compress", pair, "-o", out, "--data", images(root / "imgs", 4)], [pair])
    classes = root / "classes"
    images(classes / "cat", 3), images(classes / "dog", 3)
    partial = root / "partial_labels.tsv"
    partial.write_text("file\tclass_index\n0.png\t3\n")
    add("labels file missing images", ["compress", model, "-o", out, "--data", classes, "--labels", partial],
        [model, partial])  # fmt: skip
    order = root / "order.txt"
    order.write_text("cat\nbird\n")
    add("class order without a folder's class", ["compress", model, "-o", out, "--data", classes, "--class-order",
        order], [model, order])  # fmt: skip
    add("labels file that does not exist", ["compress", model, "-o", out, "--data", classes, "--labels",
        root / "none.tsv"], [model])  # fmt: skip
    loop = looped(root / "looped.onnx")
    add("every Conv inside a Loop body", ["compress", loop, "-o", out, "--data", "random", "--limit", "8"], [loop])
    add("--scale not a number", ["compress", model, "-o", out, "--data", data, "--scale", "one/255"], [model])
    add("--size malformed", ["compress", model, "-o", out, "--data", data, "--size", "16x"], [model])
    slow = conv_stack(root / "slow.onnx", channels=64, size=32)
    interrupted = ["compress", slow, "-o", out, "--data", "natural", "--limit", "4000", "--method", "cp"]
    add("Ctrl-C during compress", interrupted, [slow], interrupt=4.0)
    add("SIGTERM during compress", [*interrupted, "--workers", "2"], [slow], interrupt=(4.0, signal.SIGTERM))
    add("--mean with 2 values, 3 channels", ["compress", model, "-o", out, "--data", "natural", "--mean", "127,127"],
        [model])  # fmt: skip
    report = root / "report.txt"
    add("report with an unknown suffix", ["compress", model, "-o", out, "--data", data, "--report", report],
        [model, data], output=report)  # fmt: skip
    add("sweep: ratio out of range", ["sweep", model, "--data", data, "--ratios", "0.5,1.5"], [model, data], None)
    add("sweep: an accuracy target", ["sweep", model, "--data", data, "--max-error", "0.1"], [model, data], None)
    add("sweep: --save-dir is a file", ["sweep", model, "--data", data, "--save-dir", data], [model, data], None)
    add("sweep: HTML report in a missing folder", ["sweep", model, "--data", data, "--report", root / "no" / "r.html"],
        [model, data], None)  # fmt: skip
    return found


def run_case(args, interrupt) -> tuple[int, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    process = subprocess.Popen(PYTHON + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if interrupt:
        seconds, sent = interrupt if isinstance(interrupt, tuple) else (interrupt, signal.SIGINT)
        time.sleep(seconds)
        process.send_signal(sent)
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def main() -> int:
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name, args, inputs, output, interrupt in cases(root):
            if output is not None and output.is_file():
                output.unlink()
            before = {path: digest(path) for path in inputs}
            listing = set(root.rglob("*"))
            code, err = run_case(args, interrupt)
            lines = [line for line in err.strip().splitlines() if line.strip()]
            unchanged = all(digest(path) == value for path, value in before.items())
            leftovers = [p for p in set(root.rglob("*")) - listing]
            absent = (output is None or not output.exists()) and not leftovers
            # log lines may come first (the run had started); the error itself is the one last line
            one_line = bool(lines) and lines[-1].startswith("onnx-dacomp") and "Traceback" not in err
            ok = code != 0 and one_line and unchanged and absent
            failures += not ok
            message = lines[-1] if lines else "(no message)"
            rows.append((name, str(code), message[:110], "yes" if unchanged else "NO", "yes" if absent else "NO", ok))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    header = ("case", "exit", "message", "input unchanged", "output absent")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  pass")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths)) + ("  ok" if row[5] else "  FAIL"))
    print(f"\n{len(rows) - failures} of {len(rows)} cases pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
