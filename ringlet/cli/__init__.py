"""`ringlet` command line: one module per subcommand, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

ENGINE_ENV = "RINGLET_ENGINE"


class CliError(Exception):
    """A user-facing error: printed as one line with the fix, no traceback."""


def engine_from_environment() -> str | None:
    """--engine's default: $RINGLET_ENGINE, or None (the best available)."""
    return os.environ.get(ENGINE_ENV, "").strip() or None


# subcommand modules under ringlet.cli; each defines register(subparsers) which sets `func`
COMMANDS = ["run", "bench", "node", "chat", "embed", "ps", "info", "models", "service", "cluster"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringlet", description="Run LLMs on the devices you own, as one cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ringlet.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"ringlet.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CliError as e:
        print(f"ringlet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
