"""``diffplug finetune dpo|spo|spo-pm [--config cfg.yaml] [--key value ...]``; ``diffplug finetune --list-rewards``.

A thin layer over the one trainer: each method is a Config + Method pair; any config key can be
given as ``--key value`` (``--key`` alone sets a boolean). Multi-GPU:
``accelerate launch -m diffplug.finetune spo --output_dir D ...``.

Which input keys each method (and mode) reads is the table ``READS`` (printed by ``diffplug finetune
--help``, copied in README): a key given to a method or mode that does not read it is an error, and
every ``--prompts`` file and ``--data`` path is checked before any model loads.

Exit status: 0 trained (``output_dir/final`` written); 2 error: a bad key, value or file (nothing
trained), or a file that could not be written (named; a half-written checkpoint is removed, earlier
checkpoints are kept, ``--resume latest`` continues from the last one); 130 interrupted (Ctrl-C: the step in
progress ends and is saved as a checkpoint, and the command that resumes it is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..checked import UserFileError
from .config import ConfigError


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
    "deediff": "DeeDiff: train early-exit heads and uncertainty modules for a transformer denoiser (PixArt / testbed DiT, SD3, Flux, Chroma)",
    "sft": "plain denoising-loss fine-tuning on captioned images (--adapter sara|lora|full)",
    "pso": "PSO: pairwise sample optimisation of a few-step model (--mode offline --data DIR | --mode online --reward NAME)",
}


# The input keys each method reads, per mode (pso: --mode; dpo, spo-pm: --data generate, or a file or
# folder of pairs). Keys of the config a method or mode does not read are refused, not ignored.
ADAPTER = ("adapter", "use_lora", "lora_rank", "lora_alpha", "lora_init", "lora_target_modules", "sara_threshold",
           "sara_fraction", "sara_lambda_rank", "sara_rank_min_dim", "sara_progressive_step", "sara_exclude")
GENERATE = ("reward", "prompts", "num_per_prompt", "generate_repeats", "generate_steps")
READS = {
    ("dpo", "data=generate"): ("data", *GENERATE, "adapter"),
    ("dpo", "data=FILE|DIR"): ("data", "reward (as eval_reward)", "adapter"),
    ("spo-pm", "data=generate"): ("data", *GENERATE, "tie_margin", "eval_repeats"),
    ("spo-pm", "data=FILE|DIR"): ("data",),
    ("spo", ""): ("prompts", "reward", "preference_model", "adapter"),
    ("find", ""): ("prompts or prompt", "reward"),
    ("deediff", ""): ("data",),
    ("sft", ""): ("data", "adapter"),
    ("pso", "mode=offline"): ("data", "reference_prompts", "num_references", "neg_defactor", "prior_loss_weight",
                              "loss_type", "random_flip", "adapter"),
    ("pso", "mode=online"): ("prompts", "reward", "eps", "share_initial_noise", "adapter"),
}
_CHECKED = {*ADAPTER, *GENERATE, "data", "prompt", "tie_margin", "eval_repeats", "reference_prompts", "num_references",
            "neg_defactor", "prior_loss_weight", "loss_type", "random_flip", "eps", "share_initial_noise"}


def _read_keys(reads: tuple) -> set:
    """``READS`` entries -> config keys ("adapter" stands for every adapter key)."""
    keys = set()
    for entry in reads:
        if entry == "adapter":
            keys.update(ADAPTER)
        else:
            keys.update(entry.replace(" or ", " ").split(" (")[0].split())
    return keys


def mode_of(method: str, values: dict, config_cls) -> str:
    """The ``READS`` mode of a run from its given values (else the config's defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    if method == "pso":
        return f"mode={values.get('mode', defaults['mode'])}"
    if method in ("dpo", "spo-pm"):
        return "data=generate" if values.get("data", defaults["data"]) == "generate" else "data=FILE|DIR"
    return ""


def check_reads(method: str, values: dict, config_cls) -> None:
    """A key given (with a value other than its default) that the method, in its mode, does not read is
    an error naming the key and the mode."""
    from .config import _coerce, _fields

    mode = mode_of(method, values, config_cls)
    reads = _read_keys(READS[(method, mode)])
    types = _fields(config_cls)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(config_cls)}
    where = f"`{method}`" + (f" with {mode}" if mode else "")
    for key, value in values.items():
        if key in _CHECKED and key in types and key not in reads and _coerce(key, value, types[key]) != defaults[key]:
            what = "adapter keys" if key in ADAPTER else "it"
            hint = ("; it trains its own module, the diffusion model stays frozen" if key in ADAPTER else
                    f"; {where} reads {', '.join(READS[(method, mode)])}")
            raise ConfigError(f"{key}: {where} does not read {what}{hint}; drop --{key}")
    if method == "find" and values.get("prompt") and "prompts" in values:
        raise ConfigError("prompt, prompts: `find` reads one of them; give --prompt P or --prompts (a list or a file)")


def check_input_paths(method: str, config) -> None:
    """Every prompts file and data path the run reads exists (checked before any model loads)."""
    from .pairs import read_prompts

    reads = _read_keys(READS[(method, mode_of(method, config.to_dict(), type(config)))])
    if "prompts" in reads and not getattr(config, "prompt", ""):
        read_prompts(config.prompts)
    data = getattr(config, "data", "") if "data" in reads else ""
    if data and data != "generate" and not data.startswith("testbed") and not Path(data).expanduser().exists():
        raise ConfigError(f"data: {data!r} does not exist; give an existing file or folder"
                          + (" or 'generate'" if method in ("dpo", "spo-pm") else " or testbed:SUBSET"))


def reads_table() -> str:
    """``READS`` as the text table of ``diffplug finetune --help``."""
    lines = ["input keys each method reads (others are refused):"]
    for (method, mode), reads in READS.items():
        lines.append(f"  {method:8s} {mode or '-':14s} {', '.join(reads)}")
    return "\n".join(lines)


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
    p = subparsers.add_parser("finetune", help="fine-tune a diffusion model (Diffusion-DPO, SPO)",
                              description=__doc__.split("\n\n")[0], epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list-rewards", action=_ListRewards, help="print the reward names (--reward NAME), one a line")
    methods = p.add_subparsers(dest="finetune_method", metavar="{dpo,spo,spo-pm,find,deediff,sft,pso}", parser_class=_OverridesParser)
    methods.required = True
    add_methods(methods)


_EPILOG = reads_table() + "\n\n" + __doc__[__doc__.index("Exit status"):].strip()


def run(args) -> int:
    from .config import build_config, parse_overrides, read_yaml
    from .trainer import Interrupted, Trainer

    method_cls = _methods()[args.method_name]
    try:
        overrides = parse_overrides(getattr(args, "overrides", []) or [])
        values = {k.replace("-", "_"): v for k, v in (read_yaml(args.config) if args.config else {}).items()}
        values.update(overrides)
        check_reads(args.method_name, values, method_cls.Config)
        if hasattr(method_cls.Config, "apply_preset"):  # e.g. dpo --preset paper|lora
            values = method_cls.Config.apply_preset(values)
        config = build_config(method_cls.Config, values)
        check_input_paths(args.method_name, config)
        trainer = Trainer(method_cls(config))
        trainer.train()
    except (ConfigError, UserFileError, OSError) as e:  # OSError: a file not written (atomic.WriteError names it)
        if isinstance(e, OSError) and "config" in locals():
            from .checkpoint import clean_stale

            clean_stale(config.output_dir)  # the half-written checkpoint; complete ones stay
        print(f"diffplug finetune {args.method_name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the trainer's Interrupted says what was kept; a bare one came before it
        what = str(e) if isinstance(e, Interrupted) else "interrupted before training: nothing saved"
        command = resume_command(args)
        also = ("\n(with any other accelerate launch options you started with, e.g. --config_file)"
                if command.startswith("accelerate ") else "")
        print(f"diffplug finetune {args.method_name}: {what}\nresume with: {command}{also}", file=sys.stderr)
        return 130
    return 0


def resume_command(args) -> str:
    """The command that continues an interrupted run: its own flags, with ``--resume latest``."""
    import shlex

    given, argv, i = list(getattr(args, "overrides", []) or []), [], 0
    while i < len(given):  # drop the run's own --resume (and its value)
        key = given[i].split("=", 1)[0].replace("_", "-")
        if key == "--resume":
            i += 1 if "=" in given[i] or i + 1 == len(given) or given[i + 1].startswith("--") else 2
            continue
        argv.append(given[i])
        i += 1
    config = ["--config", args.config] if getattr(args, "config", None) else []
    entry = getattr(args, "entry", ("diffplug", "finetune"))
    return shlex.join([*launcher(entry), args.method_name, *config, *argv, "--resume", "latest"])


def launcher(entry=("diffplug", "finetune")) -> list[str]:
    """How this run was started, to start it again: ``accelerate launch`` (its process count and mixed
    precision, read from the environment it sets) or ``torchrun``, else ``entry`` (``diffplug finetune``,
    or ``python -m diffplug.finetune`` when started through the module)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision is not None:  # set by `accelerate launch` in every process it starts
        flags = (["--num_processes", str(world)] if world > 1 else []) + (
            ["--mixed_precision", precision] if precision != "no" else [])
        return ["accelerate", "launch", *flags, "-m", "diffplug.finetune"]
    if world > 1:  # torchrun without accelerate's launcher
        return ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world)), "-m", "diffplug.finetune"]
    return list(entry)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffplug.finetune", description=__doc__.split("\n\n")[0],
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list-rewards", action=_ListRewards, help="print the reward names (--reward NAME), one a line")
    methods = parser.add_subparsers(dest="finetune_method", metavar="{dpo,spo,spo-pm,find,deediff,sft,pso}", parser_class=_OverridesParser)
    methods.required = True
    add_methods(methods)
    parser.set_defaults(entry=("python", "-m", "diffplug.finetune"))
    args = parser.parse_args(argv)
    return args.func(args)
