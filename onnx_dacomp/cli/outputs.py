"""The report files a run writes besides the model: JSON or HTML by the name's suffix, and CSV tables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..save import check_output, write_atomically

REPORT_SUFFIXES = (".json", ".html", ".htm")


def add_report_options(parser, what: str = "the report") -> None:
    """`--report` (JSON or HTML by suffix) and `--sensitivity-csv`, as `compress` and `sweep` take them."""
    parser.add_argument(
        "--report", metavar="REPORT.json|.html", help=f"write {what}: JSON, or a page with plots (.html)"
    )
    parser.add_argument(
        "--sensitivity-csv", metavar="FILE.csv",
        help="write each layer's measured sensitivity and, per candidate rank, the error it would add",
    )  # fmt: skip


def check_outputs(report: str | None, tables: tuple[str | None, ...], protect: str) -> None:
    """Fail before the slow part if a file cannot be written, or the report's suffix names no format."""
    for path in (report, *tables):
        if path is not None:
            check_output(path, protect=protect)
    if report is not None and Path(report).suffix.lower() not in REPORT_SUFFIXES:
        raise UserError(f"--report {report}: the name must end in .json (JSON) or .html (a page with plots)")


def write_report(path: str | None, as_json: Callable[[], str], as_html: Callable[[], str]) -> None:
    if path is None:
        return
    html = Path(path).suffix.lower() in (".html", ".htm")
    write_text(path, as_html() if html else as_json())


def write_text(path: str | None, text: str) -> None:
    if path is not None:
        write_atomically(path, lambda stream: stream.write(text.encode()))
