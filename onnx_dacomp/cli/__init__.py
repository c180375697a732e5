"""Command-line interface: a thin layer over the library. `main(argv) -> exit code`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import UserError
from ..log import stderr_handler
from . import calibrate_command, compress_command, evaluate_command, inspect_command

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

COMMANDS = {
    "inspect": inspect_command,
    "calibrate": calibrate_command,
    "compress": compress_command,
    "evaluate": evaluate_command,
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong, where to look), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-dacomp",
        description="Distribution-aware low-rank compression of ONNX convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(commands)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    package_logger = logging.getLogger("onnx_dacomp")
    package_logger.handlers[:] = [stderr_handler(level)]
    package_logger.setLevel(level)
    package_logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version: argparse already wrote the message
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    _configure_logging(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command].run(args)
    except UserError as exc:
        print(f"onnx-dacomp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("onnx-dacomp: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
