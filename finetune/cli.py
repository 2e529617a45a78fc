"""``diffplug finetune dpo|spo|spo-pm [--config cfg.yaml] [--key value ...]``.

A thin layer over the one trainer: each method is a Config + Method pair; any config key can be
given as ``--key value`` (``--key`` alone sets a boolean). Multi-GPU:
``accelerate launch -m diffplug.finetune spo --output_dir D ...``.
"""

from __future__ import annotations

import argparse
import sys


class _OverridesParser(argparse.ArgumentParser):
    """A subparser that keeps every unknown ``--key value`` as a config override (checked later
    against the method's config, with a message naming the key)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + list(extra)
        return ns, []


def _methods():
    from .dpo import DiffusionDPO
    from .spm import SPMTraining
    from .spo import SPO

    return {"dpo": DiffusionDPO, "spo": SPO, "spo-pm": SPMTraining}


_HELP = {
    "dpo": "Diffusion-DPO on preference pairs (files, Pick-a-Pic layout, or generated from a reward)",
    "spo": "SPO: step-aware preference optimisation with the step-wise resampler",
    "spo-pm": "train SPO's step-aware preference model on a base image-text scorer",
}


def add_methods(subparsers) -> None:
    from .config import describe

    for name, method in _methods().items():
        p = subparsers.add_parser(
            name,
            help=_HELP[name],
            description=f"{_HELP[name]}. Config keys (YAML file or --key value):",
            epilog=describe(method.Config),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", default=None, help="YAML file of config keys; --key value flags override it")
        p.set_defaults(func=run, method_name=name)


def register(subparsers) -> None:
    """Add ``diffplug finetune ...`` to the ``diffplug`` command."""
    p = subparsers.add_parser("finetune", help="fine-tune a diffusion model (Diffusion-DPO, SPO)")
    methods = p.add_subparsers(dest="finetune_method", metavar="{dpo,spo,spo-pm}", parser_class=_OverridesParser)
    methods.required = True
    add_methods(methods)


def run(args) -> int:
    from .config import ConfigError, load_config, parse_overrides
    from .trainer import Trainer

    method_cls = _methods()[args.method_name]
    try:
        overrides = parse_overrides(getattr(args, "overrides", []) or [])
        config = load_config(method_cls.Config, args.config, overrides)
        trainer = Trainer(method_cls(config))
        trainer.train()
    except ConfigError as e:
        print(f"diffplug finetune {args.method_name}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffplug.finetune", description=__doc__.split("\n\n")[0])
    methods = parser.add_subparsers(dest="finetune_method", metavar="{dpo,spo,spo-pm}", parser_class=_OverridesParser)
    methods.required = True
    add_methods(methods)
    args = parser.parse_args(argv)
    return args.func(args)
