"""The ``diffplug`` command: a thin dispatcher; each subcommand lives with the code it runs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

# command -> (the folder whose cli.py registers it, one-line help). A folder's cli.py is imported
# only when its command runs, so `diffplug --help` stays instant (no torch/diffusers import).
EXIT_STATUS = ("Exit status: 0 done; 2 error, one line on stderr naming the argument or file (a file that could "
               "not be written, e.g. on a full disk, is named and nothing partial is left); diffplug eval also 1: "
               "metrics written, some skipped. Each command's --help says what it writes.")
SUBCOMMANDS = {
    "sample": ("pipelines", "generate images through diffplug's loop"),
    "eval": ("evals", "FID/KID, precision/recall, CLIP score ... of image folders or a generation spec"),
    "finetune": ("finetune", "fine-tune a diffusion model (dpo, spo, ...)"),
    "bench": ("samplers", "sampler benchmarks and searches (dc-search)"),
    "testbed": ("testbed", "the built-in reference models (export)"),
}
ROOT = Path(__file__).resolve().parent
# Commands whose cli.py imports nothing heavy at its top: loaded without their package's __init__
# (which imports torch, seconds to a minute on a loaded machine), so they parse and check their
# arguments first and import torch only to run.
LIGHT = ("sample", "eval")


def light_module(name: str):
    """The diffplug module ``name``; if its package is not imported yet, only that file is executed
    (not the package's ``__init__``). For modules whose top level imports nothing heavy: a command's
    cli.py and the light modules it checks arguments with (e.g. ``diffplug.pipelines.validate``).
    Their relative imports inside functions import the package as usual."""
    if name in sys.modules:
        return sys.modules[name]
    if name.rpartition(".")[0] in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, ROOT.joinpath(*name.split(".")[1:]).with_suffix(".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def available() -> dict:
    return {name: entry for name, entry in SUBCOMMANDS.items() if (ROOT / entry[0] / "cli.py").is_file()}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (``"*"``: every module)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="diffplug", description="Sampling, guidance and fine-tuning plugins for diffusers.",
                                     epilog=EXIT_STATUS)
    parser.add_argument("--version", action="version", version=f"diffplug {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (folder, help_text) in available().items():
        if name == command or command == "*":
            module = f"diffplug.{folder}.cli"
            (light_module(module) if name in LIGHT else importlib.import_module(module)).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
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
