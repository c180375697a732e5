"""Does the latency figure reproduce? Repeated runs of `onnx-dacomp evaluate --benchmark` on saved pairs.

    python3 tools/bench_repeat.py --pair ORIGINAL.onnx COMPRESSED.onnx [--pair ...] [--runs 6]
                                  -- --data SOURCE [data options] [--limit 64]

Each cycle runs `evaluate --benchmark --json` once per pair, each in a fresh process (as a user would run it
twice), so that a pair's runs are spread over the cycles' minutes; the arguments after `--` go to every run.
Per pair and batch size it prints the range of the ratios and in how many of the pairs of runs each ratio lay
within the other run's interval: for the figure on each model's fastest threads (the line's first ratio) and
for both models on one thread. For 95 % intervals of one true ratio, about 83 % of the pairs of runs would agree
that way (each ratio lies inside the other's interval when they differ by less than 1.96 sd of one, against the
sqrt(2) sd of a difference). Writes nothing; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

FIGURES = (("ratio", "ratio_low", "ratio_high"), ("one_thread_ratio", "one_thread_low", "one_thread_high"))


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("ORIGINAL", "COMPRESSED"))
    parser.add_argument("--runs", type=int, default=6)
    args, passed = parser.parse_args(argv[:split]), argv[split + 1 :]

    runs: dict[int, list[dict]] = {index: [] for index in range(len(args.pair))}
    for cycle in range(args.runs):
        for index, (original, compressed) in enumerate(args.pair):
            command = [sys.executable, "-m", "onnx_dacomp", "--quiet", "evaluate", original, compressed, "--benchmark",
                       "--json", *passed]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:  # the run's own one-line error (a wrong path, data the model does not take)
                said = (done.stderr.strip().splitlines() or [""])[-1]
                sys.exit(f"bench_repeat: evaluate failed on {compressed}: {said}")
            runs[index].append(json.loads(done.stdout))
            latencies = runs[index][-1]["latency"]
            print(f"cycle {cycle + 1}, {Path(compressed).name}: " + ", ".join(_described(item) for item in latencies),
                  flush=True)  # fmt: skip
    print(table(args.pair, runs))


def _described(item: dict) -> str:
    figure = f"{item['ratio']:.3f} [{item['ratio_low']:.3f}, {item['ratio_high']:.3f}]"
    return f"batch {item['batch']} {figure} (original {item['original_ms']:.2f} ms, {item['threads']} thr)" + (
        f" / one thread {item['one_thread_ratio']:.3f}" if item.get("one_thread_ratio") is not None else ""
    )


def agreeing(measurements: list[tuple[float, float, float]]) -> tuple[int, int]:
    """Of all pairs of measurements (ratio, low, high), how many lie each within the other's interval."""
    pairs = list(itertools.combinations(measurements, 2))
    inside = sum(b[1] <= a[0] <= b[2] and a[1] <= b[0] <= a[2] for a, b in pairs)
    return inside, len(pairs)


def table(pairs: list, runs: dict[int, list[dict]]) -> str:
    lines = [
        "| pair | batch | fastest threads: ratios | agreeing | both on one thread: ratios | agreeing |",
        "|---|---|---|---|---|---|",
    ]
    for index, (_, compressed) in enumerate(pairs):
        batches = [item["batch"] for item in runs[index][0]["latency"]]
        for position, batch in enumerate(batches):
            cells = [Path(compressed).name, str(batch)]
            for keys in FIGURES:
                measured = [tuple(run["latency"][position][key] for key in keys) for run in runs[index]]
                measured = [item for item in measured if item[0] is not None]
                if not measured:
                    cells += ["", ""]
                    continue
                inside, total = agreeing(measured)
                ratios = [item[0] for item in measured]
                cells += [f"{min(ratios):.3f}-{max(ratios):.3f}", f"{inside}/{total}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
