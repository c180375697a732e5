"""Command-line interface: a thin layer over the library. `main(argv) -> exit code`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import UserError
from ..log import stderr_handler
from . import calibrate_command, compress_command, evaluate_command, inspect_command, sweep_command

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

COMMANDS = {
    "inspect": inspect_command,
    "calibrate": calibrate_command,
    "compress": compress_command,
    "sweep": sweep_command,
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


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a timeout, a CI limit, a process manager, a closed terminal): unwinds like Ctrl-C, so
    that workers are stopped, temporary files removed and no partial output is left."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def _stop_on_signals() -> dict:
    """Turn SIGTERM and SIGHUP into `Stopped` (from the main thread only); returns the handlers replaced."""
    replaced = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            try:
                replaced[number] = signal.signal(number, _stop)
            except ValueError:  # not the main thread: leave the default action
                pass
    return replaced


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version: argparse already wrote the message
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    _configure_logging(args.verbose, args.quiet)
    replaced = _stop_on_signals()
    try:
        return COMMANDS[args.command].run(args)
    except UserError as exc:
        print(f"onnx-dacomp: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as exc:
        name = signal.Signals(exc.signum).name
        print(f"onnx-dacomp: stopped by {name}; workers stopped, no output was written", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("onnx-dacomp: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for number, handler in replaced.items():
            signal.signal(number, handler)
