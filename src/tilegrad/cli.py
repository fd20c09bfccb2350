"""The ``tilegrad`` command.

Each subcommand lives in ``tilegrad/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (a callable taking the parsed namespace and returning an exit code). Commands are found by
scanning that package, so adding one never touches this file.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import __version__, commands
from ._atomic import disk_full, is_disk_full
from .errors import TilegradError, TilegradWarning

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilegrad",
        description="Exact, memory-bounded CNNs on gigapixel slides and whole 3D volumes.",
    )
    parser.add_argument("--version", action="version", version=f"tilegrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    shown = warnings.showwarning

    def one_line(message: Any, category: type, *rest: Any, **kw: Any) -> None:
        if issubclass(category, TilegradWarning):  # a documented warning: one line, no source quote
            print(f"tilegrad {args.command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *rest, **kw)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            return int(args.func(args) or 0)
    except TilegradError as err:
        print(f"tilegrad {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not is_disk_full(err):
            raise
        # NOTE [ A full disk ] (tilegrad/_atomic.py): a writer that did not name its file still gets one line
        print(f"tilegrad {args.command}: error: {disk_full(err, err.filename or '?', None)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tilegrad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
