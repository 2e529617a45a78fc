"""The ``diffplug`` command: a thin dispatcher; each subcommand lives with the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, each exposing ``register(subparsers)``; a module that is not there yet
# (its feature has not landed) simply contributes no subcommand.
SUBCOMMANDS = (
    "diffplug.pipelines.cli",  # sample
    "diffplug.evals.cli",  # eval
    "diffplug.finetune.cli",  # finetune <method>
    "diffplug.samplers.cli",  # bench ...
    "diffplug.testbed.cli",  # testbed export
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="diffplug", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffplug {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency inside the module: say so
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError, OSError) as err:
        print(f"diffplug {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
