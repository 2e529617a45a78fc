"""``diffplug testbed export DIR``: write the testbed as a folder diffusers loads offline.

``StableDiffusionPipeline.from_pretrained(DIR)`` (``PixArtSigmaPipeline`` with ``--model dit``,
``FluxPipeline`` with ``--model flux``; ``DiffusionPipeline`` reads the class from the folder) then
loads it with no network. A non-empty DIR is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def export(directory: str | Path, model: str = "sd", force: bool = False) -> Path:
    """Save the testbed pipeline ``model`` ("sd", "dit" or "flux") to ``directory`` (fp32 safetensors)."""
    from . import load

    out = Path(directory).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"DIR={str(out)!r} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"DIR={str(out)!r} is not empty; pass --force to write into it anyway")
    pipe = load(model)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _run(args: argparse.Namespace) -> int:
    try:
        out = export(args.dir, model=args.model, force=args.force)
    except FileExistsError as err:
        raise SystemExit(f"diffplug testbed export: {err}") from None
    cls = {"sd": "StableDiffusionPipeline", "dit": "PixArtSigmaPipeline", "flux": "FluxPipeline"}[args.model]
    print(f"wrote {out}; load it with diffusers.{cls}.from_pretrained({str(out)!r})")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``testbed`` (with its ``export`` subcommand) to the ``diffplug`` command."""
    parser = subparsers.add_parser("testbed", help="the embedded reference models", description=__doc__)
    sub = parser.add_subparsers(dest="testbed_command", required=True)
    exp = sub.add_parser("export", help="write the testbed pipeline to DIR (diffusers from_pretrained layout)")
    exp.add_argument("dir", metavar="DIR", help="output folder (must be empty or new unless --force)")
    exp.add_argument("--model", choices=["sd", "dit", "flux"], default="sd", help="which testbed pipeline (default sd)")
    exp.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    exp.set_defaults(func=_run)
    return parser
