"""The ``wsltool`` command line: thin sub-commands that parse arguments and call one core function.

Each sub-command lives in its own module exposing ``register(subparsers)``; the heavy imports
(torch, the model, dask) happen inside the command's function, so ``wsltool --help`` and
``wsltool info`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from wsltool import __version__
from wsltool.errors import WslError

log = logging.getLogger(__name__)

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = ("info", "train", "eval", "infer", "export", "cohort", "ensemble")


def setup_logging(verbosity: int) -> None:
    """Configure logging for the CLI only (the library never touches the root logger)."""
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, as every other wsltool error is."""

    def error(self, message: str) -> NoReturn:
        """Exit 2 with ``PROG: error: MESSAGE (see PROG --help)``: the usage block stays one --help away."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available sub-command."""
    parser = _Parser(
        prog="wsltool",
        description="Weakly supervised pixel-level localization of malignancy in whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"wsltool {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"wsltool.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"wsltool.cli.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The deepest sub-command parser ``args`` were parsed by (``wsltool cohort infer`` -> its parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _innermost(chosen, args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``wsltool`` command; returns the process exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the (sub-)command they were given to, as its other usage errors are
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except WslError as exc:
        print(f"wsltool {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # an output (or input) path the system refuses: one line naming it, not a traceback
        log.debug("%s", exc, exc_info=True)  # the traceback, with -vv
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"wsltool {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"wsltool {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
