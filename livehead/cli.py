"""The ``livehead`` command. Each package registers its own subcommands; heavy imports happen
only when a subcommand runs, so ``livehead --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import UserError

# Modules that provide ``register(subparsers)``; order is the order in ``--help``.
COMMAND_MODULES = [
    "server.cli",  # serve
    "engine.cli",  # render, reenact, bench
    "training.cli",  # data
    "training.cli_train",  # train, eval
    "export.cli",  # export
    "clients.cli",  # client
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livehead",
        description="Real-time streaming talking-head engine: one portrait + live speech -> "
        "a talking face streamed over WebRTC.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(name.split(".")[0]):
                continue  # that package has no commands yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"livehead: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("livehead: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
