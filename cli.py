"""The ``diffplug`` command: a thin dispatcher; each subcommand lives with the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# command -> (the folder whose cli.py registers it, one-line help). A folder's cli.py is imported
# only when its command runs, so `diffplug --help` stays instant (no torch/diffusers import).
SUBCOMMANDS = {
    "sample": ("pipelines", "generate images through diffplug's loop"),
    "eval": ("evals", "FID/KID, precision/recall, CLIP score ... of image folders or a generation spec"),
    "finetune": ("finetune", "fine-tune a diffusion model (dpo, spo, ...)"),
    "bench": ("samplers", "sampler benchmarks and searches (dc-search)"),
    "testbed": ("testbed", "the built-in reference models (export)"),
}
ROOT = Path(__file__).resolve().parent


def available() -> dict:
    return {name: entry for name, entry in SUBCOMMANDS.items() if (ROOT / entry[0] / "cli.py").is_file()}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (``"*"``: every module)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="diffplug", description="Sampling, guidance and fine-tuning plugins for diffusers.")
    parser.add_argument("--version", action="version", version=f"diffplug {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (folder, help_text) in available().items():
        if name == command or command == "*":
            importlib.import_module(f"diffplug.{folder}.cli").register(subparsers)
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
