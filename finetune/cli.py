"""``diffplug finetune dpo|spo|spo-pm [--config cfg.yaml] [--key value ...]``; ``diffplug finetune --list-rewards``.

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
    from .deediff import DeeDiff
    from .dpo import DiffusionDPO
    from .find import FIND
    from .sft import SFT
    from .spm import SPMTraining
    from .pso import PSO
    from .spo import SPO

    return {"dpo": DiffusionDPO, "spo": SPO, "spo-pm": SPMTraining, "find": FIND, "deediff": DeeDiff, "sft": SFT, "pso": PSO}


_HELP = {
    "dpo": "Diffusion-DPO on preference pairs (files, Pick-a-Pic layout, or generated from a reward)",
    "spo": "SPO: step-aware preference optimisation with the step-wise resampler",
    "spo-pm": "train SPO's step-aware preference model on a base image-text scorer",
    "find": "FIND: learn a per-prompt initial-noise distribution (the model stays frozen)",
    "deediff": "DeeDiff: train early-exit heads and uncertainty modules for a transformer denoiser (testbed DiT)",
    "sft": "plain denoising-loss fine-tuning on captioned images (--adapter sara|lora|full)",
    "pso": "PSO: pairwise sample optimisation of a few-step model (--mode offline --data DIR | --mode online --reward NAME)",
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


class _ListRewards(argparse.Action):
    """``--list-rewards``: print the registered reward names, one a line, and exit."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..evals.rewards import list_rewards

        print("\n".join(list_rewards()))
        parser.exit(0)


def register(subparsers) -> None:
    """Add ``diffplug finetune ...`` to the ``diffplug`` command."""
    p = subparsers.add_parser("finetune", help="fine-tune a diffusion model (Diffusion-DPO, SPO)")
    p.add_argument("--list-rewards", action=_ListRewards, help="print the reward names (--reward NAME), one a line")
    methods = p.add_subparsers(dest="finetune_method", metavar="{dpo,spo,spo-pm,find,deediff,sft,pso}", parser_class=_OverridesParser)
    methods.required = True
    add_methods(methods)


def run(args) -> int:
    from .config import ConfigError, build_config, parse_overrides, read_yaml
    from .trainer import Trainer

    method_cls = _methods()[args.method_name]
    try:
        overrides = parse_overrides(getattr(args, "overrides", []) or [])
        values = {k.replace("-", "_"): v for k, v in (read_yaml(args.config) if args.config else {}).items()}
        values.update(overrides)
        if hasattr(method_cls.Config, "apply_preset"):  # e.g. dpo --preset paper|lora
            values = method_cls.Config.apply_preset(values)
        config = build_config(method_cls.Config, values)
        trainer = Trainer(method_cls(config))
        trainer.train()
    except ConfigError as e:
        print(f"diffplug finetune {args.method_name}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffplug.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list-rewards", action=_ListRewards, help="print the reward names (--reward NAME), one a line")
    methods = parser.add_subparsers(dest="finetune_method", metavar="{dpo,spo,spo-pm,find,deediff,sft,pso}", parser_class=_OverridesParser)
    methods.required = True
    add_methods(methods)
    args = parser.parse_args(argv)
    return args.func(args)
