"""The README's "Choosing the ratio" example: `onnx-dacomp sweep` of the bundled CIFAR-10 CNN with the
defaults (no data: natural-photograph crops), written as bench/sweep_bundled.{csv,json}, the HTML report
bench/sweep_bundled.html and the trade-off picture docs/images/sweep_bundled.png.

    python3 tools/sweep_bundled.py
"""

from pathlib import Path

import onnx_dacomp
from onnx_dacomp.html_report import plot_tradeoff, sweep_html, sweep_points

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    result = onnx_dacomp.sweep(str(ROOT / "models" / "dacomp_cifar_cnn.onnx"))
    bench = ROOT / "bench"
    (bench / "sweep_bundled.csv").write_text(result.to_csv())
    (bench / "sweep_bundled.json").write_text(result.to_json())
    (bench / "sweep_bundled.html").write_text(sweep_html(result, "onnx-dacomp sweep models/dacomp_cifar_cnn.onnx"))
    figure = plot_tradeoff(sweep_points(result), result.points[0].report.estimated_curve, result.original["top1"])
    figure.savefig(ROOT / "docs" / "images" / "sweep_bundled.png", dpi=90)
    print(result.table())
    print(f"{result.seconds:.0f} s")


if __name__ == "__main__":
    main()
