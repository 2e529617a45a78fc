"""Training configuration: a dataclass per method, a YAML file, and ``--key value`` overrides.

Every method's config subclasses :class:`TrainConfig` (the trainer's keys) and adds its own.
Values are resolved in this order: dataclass defaults < YAML file < command-line overrides, then
checked up front (:meth:`TrainConfig.validate`); every error names the key and what to do.

    cfg = load_config(DPOConfig, "cfg.yaml", {"max_steps": "100", "beta": "2500"})
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


def choice(default, choices: tuple, help: str = ""):
    """A field restricted to ``choices`` (checked by ``validate``)."""
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


def opt(default, help: str = "", **metadata):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


# diffusers.optimization.get_scheduler names a method may override ``lr_scheduler`` with (keep its choices)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig:
    """Keys every method shares: model, optimisation, precision, checkpoints, logging."""

    # -- run ------------------------------------------------------------------------------------
    output_dir: str = opt("", "where checkpoints, logs and final weights go (required)")
    model: str = opt(
        "testbed",
        "'testbed' (the project's reference pipeline), 'tiny:sd' / 'tiny:sdxl' (random test pipelines), "
        "a local diffusers folder or a Hugging Face hub id (SD1.x or SDXL)",
    )
    seed: int = opt(0, "seeds LoRA init, data order and every per-sample noise draw")
    max_steps: int = opt(1000, "optimiser steps to train for")
    resume: str = opt("", "'latest' or a checkpoint folder to continue from; empty = a new run")
    # -- batch ------------------------------------------------------------------------------------
    train_batch_size: int = opt(1, "samples per device per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimiser step")
    dataloader_num_workers: int = opt(0, "DataLoader worker processes")
    # -- optimiser ----------------------------------------------------------------------------------
    learning_rate: float = opt(1e-4, "peak learning rate")
    scale_lr: bool = opt(False, "multiply learning_rate by the global batch size (Diffusion-DPO's --scale_lr)")
    lr_scheduler: str = choice("constant_with_warmup", LR_SCHEDULERS, "diffusers.optimization.get_scheduler name")
    lr_warmup_steps: int = opt(0, "warm-up optimiser steps")
    optimizer: str = choice("adamw", ("adamw", "adafactor", "sgd"), "optimiser")
    adam_beta1: float = opt(0.9)
    adam_beta2: float = opt(0.999)
    adam_weight_decay: float = opt(1e-2)
    adam_epsilon: float = opt(1e-8)
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 = off")
    # -- model ------------------------------------------------------------------------------------
    mixed_precision: str = choice("no", ("no", "fp16", "bf16"), "autocast precision; frozen parts are stored in it")
    adapter: str = choice("auto", ("auto", "lora", "full", "sara"), "what trains in the UNet: LoRA adapters (reference = "
                          "adapters disabled), every weight, or SaRA's smallest entries; auto = lora, or full when use_lora is false")
    use_lora: bool | None = opt(None, "old name of adapter: true = lora, false = full")
    sara_threshold: float = opt(0.0, "SaRA: train the entries with |w| < this (the official code: 2e-3); 0 = use sara_fraction")
    sara_fraction: float = opt(0.0, "SaRA: train this fraction of the UNet's entries, the smallest |w|; 0 = 0.1 "
                               "(the paper's 10-20 % range) unless sara_threshold is given")
    sara_lambda_rank: float = opt(5e-4, "SaRA: weight of the nuclear-norm penalty on the trained entries (0 = off)")
    sara_rank_min_dim: int = opt(64, "SaRA: the penalty picks one 2-D weight with min(shape) > this per step (official: 64)")
    sara_progressive_step: int = opt(-1, "SaRA: re-select (entries grown past the threshold freeze) after this step; "
                                     "-1 = half of max_steps (the paper's 2500 of 5005), 0 = never")
    sara_exclude: list = opt([], "SaRA: parameter name patterns never selected (e.g. '*norm*'); the paper selects from all")
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: float = opt(0.0, "LoRA alpha; 0 = same as lora_rank")
    lora_init: str = choice("gaussian", ("gaussian", "default"), "peft init_lora_weights ('default' = kaiming)")
    lora_target_modules: list = opt(["to_q", "to_k", "to_v", "to_out.0"], "UNet module names to adapt")
    gradient_checkpointing: bool = opt(False, "UNet gradient checkpointing (saves memory)")
    ema_decay: float = opt(0.0, "EMA of the trained weights (e.g. 0.999); 0 = off. Final weights are the EMA's")
    resolution: int = opt(0, "training image size in pixels; 0 = the model's default")
    # -- checkpoints and logs --------------------------------------------------------------------------
    checkpoint_every: int = opt(500, "save output_dir/checkpoint-N every this many steps; 0 = only at the end")
    checkpoints_total_limit: int = opt(0, "keep at most this many checkpoints (oldest removed); 0 = keep all")
    log_every: int = opt(10, "steps between JSONL / TensorBoard records")
    tensorboard: bool = opt(True, "also write TensorBoard events when tensorboard is installed")
    sample_every: int = opt(0, "steps between sample grids in output_dir/samples; 0 = off")
    sample_prompts: list = opt(["a photo of a sneaker", "a photo of a dress"], "prompts of the sample grids")
    sample_steps: int = opt(20, "denoising steps of the sample grids")
    guidance_scale: float = opt(5.0, "CFG scale of the sample grids (and of rollouts, where a method samples)")
    eval_every: int = opt(0, "steps between held-out reward evaluations (logged as eval_reward); 0 = off")
    eval_reward: str = opt("testbed", "reward of the evaluations: a diffplug.evals reward name or module:function")
    eval_prompts: list = opt(["a photo of a sneaker", "a photo of a dress"], "prompts of the evaluations")
    eval_images_per_prompt: int = opt(4, "images per evaluation prompt (the same seeds every time)")

    # ------------------------------------------------------------------------------------------
    method: typing.ClassVar[str] = "base"
    derives_steps: typing.ClassVar[bool] = False  # True: max_steps 0 = derived from the data (PairRunConfig)

    def validate(self) -> None:
        """Check every value; raise :class:`ConfigError` naming the key. Subclasses extend this."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{f.name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):  # every float key is a finite quantity
                raise ConfigError(f"{f.name}: must be a finite number; got {value}")
        if not self.output_dir:
            raise ConfigError("output_dir: required; pass --output_dir DIR")
        if self.max_steps < (0 if self.derives_steps else 1):
            raise ConfigError(f"max_steps: must be >= {0 if self.derives_steps else 1}"
                              f"{' (0 = derived from the data)' if self.derives_steps else ''}; got {self.max_steps}")
        positive = ["train_batch_size", "gradient_accumulation_steps", "lora_rank", "log_every", "sample_steps",
                    "eval_images_per_prompt"]
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1; got {getattr(self, key)}")
        nonneg = [
            "checkpoint_every", "checkpoints_total_limit", "lr_warmup_steps", "dataloader_num_workers",
            "max_grad_norm", "lora_alpha", "resolution", "sample_every", "adam_weight_decay", "eval_every",
        ]
        for key in nonneg:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0; got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate: must be > 0; got {self.learning_rate}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in [0, 1) (0 = no EMA); got {self.ema_decay}")
        if self.resolution and self.resolution % 8:
            raise ConfigError(f"resolution: must be a multiple of 8 (the VAE's factor); got {self.resolution}")
        if self.trained_adapter == "lora" and not self.lora_target_modules:
            raise ConfigError("lora_target_modules: empty; name at least one UNet module (e.g. to_q)")
        use_lora_default = next(f.default for f in dataclasses.fields(self) if f.name == "use_lora")
        if (self.use_lora is not None and self.use_lora != use_lora_default and self.adapter != "auto"
                and self.adapter != ("lora" if self.use_lora else "full")):  # a class's own default is not a contradiction
            raise ConfigError(f"use_lora: {self.use_lora} contradicts adapter {self.adapter!r}; use_lora is the old name "
                              "of adapter (true = lora, false = full): drop it (a --preset may set it)")
        if self.sara_threshold and self.sara_fraction:
            raise ConfigError("sara_threshold, sara_fraction: give one (an absolute |w| threshold or a fraction), not both")
        if self.sara_threshold < 0 or not 0 <= self.sara_fraction < 1:
            raise ConfigError(f"sara_fraction: must be in [0, 1) and sara_threshold >= 0; got {self.sara_fraction}, "
                              f"{self.sara_threshold}")
        for key in ("sara_lambda_rank", "sara_rank_min_dim"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0; got {getattr(self, key)}")
        if self.sara_progressive_step < -1:
            raise ConfigError(f"sara_progressive_step: -1 (half of max_steps), 0 (never) or a step; got {self.sara_progressive_step}")

    @property
    def trained_adapter(self) -> str:
        """``adapter`` with ``auto`` resolved through the old ``use_lora`` key."""
        if self.adapter != "auto":
            return self.adapter
        return "full" if self.use_lora is False else "lora"

    @property
    def sara_reselect_at(self) -> int:
        """The step after which SaRA re-selects; 0 = never."""
        return self.max_steps // 2 if self.sara_progressive_step == -1 else self.sara_progressive_step

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def auto_max_steps():
    return opt(0, "optimiser steps; 0 = derived from the data: ceil(epochs x training pairs / pairs per step), at most "
               "max_auto_steps (the log says what was chosen)")


@dataclass
class PairRunConfig(TrainConfig):
    """Keys of runs over a fixed set of preference pairs (``finetune/pairs.py``: :func:`~.pairs.split_pairs`,
    :class:`~.pairs.HeldOutMonitor`): the number of steps derived from the number of pairs, a held-out
    split of the pairs scored every few steps, early stopping and an over-fitting warning."""

    max_steps: int = auto_max_steps()  # a subclass that also inherits TrainConfig by another path repeats this line
    epochs: float = opt(20.0, "max_steps 0: passes over the training pairs")
    max_auto_steps: int = opt(200, "max_steps 0: the most steps derived")
    warmup_fraction: float = opt(0.0, "warm-up as a fraction of max_steps, once max_steps is known (--preset paper: "
                                 "0.25); 0 = use lr_warmup_steps")
    heldout_fraction: float = opt(0.2, "fraction of the pairs held out of training (drawn from --seed) and scored every "
                                  "heldout_every steps; 0 = no split (over-fitting goes unchecked)")
    heldout_min_pairs: int = opt(4, "fewest held-out pairs; with fewer than twice this many pairs nothing is held out "
                                 "(a warning says so)")
    heldout_max_pairs: int = opt(64, "most held-out pairs (a large data set keeps its pairs for training; a scoring "
                                 "stays cheap)")
    heldout_every: int = opt(0, "steps between held-out scorings (DPO loss, implicit accuracy); 0 = max_steps / 10")
    heldout_draws: int = opt(2, "(timestep, noise) draws per pair in a scoring, the same ones every time")
    heldout_metric: str = choice("accuracy", ("accuracy", "loss"), "what 'best' means on the held-out pairs: the "
                                 "implicit accuracy (ties broken by the loss; the initial model counts as chance, 0.5), "
                                 "or the loss alone (at DPO's beta 5000 a few confidently wrong pairs dominate it)")
    early_stopping: bool = opt(True, "keep the weights of the best held-out scoring (step 0 = the initial model counts) "
                               "and stop after `patience` scorings without a better one; false = train all steps, keep "
                               "the last")
    patience: int = opt(3, "early_stopping: scorings without a better held-out one before the run stops")
    overfit_gap: float = opt(0.25, "warn (loudly) when implicit accuracy on training pairs exceeds the held-out one by "
                             "this much")

    derives_steps = True

    def validate(self) -> None:
        super().validate()
        if not self.epochs > 0:
            raise ConfigError(f"epochs: must be > 0; got {self.epochs}")
        for key in ("max_auto_steps", "heldout_min_pairs", "heldout_max_pairs", "heldout_draws", "patience"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1; got {getattr(self, key)}")
        if self.heldout_every < 0:
            raise ConfigError(f"heldout_every: must be >= 0 (0 = max_steps / 10); got {self.heldout_every}")
        if self.heldout_max_pairs < self.heldout_min_pairs:
            raise ConfigError(f"heldout_max_pairs: must be >= heldout_min_pairs ({self.heldout_min_pairs}); got "
                              f"{self.heldout_max_pairs}")
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise ConfigError(f"heldout_fraction: must be in [0, 0.5] (0 = no held-out pairs); got {self.heldout_fraction}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction: must be in [0, 1); got {self.warmup_fraction}")
        if self.warmup_fraction and self.lr_warmup_steps:
            raise ConfigError("warmup_fraction, lr_warmup_steps: give one (a fraction of max_steps or a number of steps)")
        if not 0.0 < self.overfit_gap <= 1.0:
            raise ConfigError(f"overfit_gap: must be in (0, 1]; got {self.overfit_gap}")
        if self.max_steps == 0 and self.trained_adapter == "sara" and self.sara_progressive_step == -1:
            raise ConfigError("sara_progressive_step: -1 (half of max_steps) needs max_steps before the data is read; "
                              "pass --max_steps N or --sara_progressive_step N (0 = never)")


# ---------------------------------------------------------------------------------------------
# Parsing


def _base_type(tp):
    """The concrete type of a field annotation (``int``, ``float``, ``bool``, ``str``, ``list``)."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}.get(tp.split("[")[0], str)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def _coerce(key: str, value: Any, tp) -> Any:
    base = _base_type(tp)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is list:
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("["):
                    value = yaml.safe_load(text)
                else:
                    value = [v.strip() for v in text.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
    except (TypeError, ValueError, yaml.YAMLError):
        name = getattr(base, "__name__", str(base))
        raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    return value


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _unknown(cls, key: str) -> ConfigError:
    names = list(_fields(cls))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(names))}"
    return ConfigError(f"{key}: unknown config key for `{cls.method}`{hint}")


def build_config(cls, values: dict) -> TrainConfig:
    """``cls`` from a dict of raw values (YAML or strings), type-checked and validated."""
    types_ = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in types_:
            raise _unknown(cls, key)
        kwargs[key] = _coerce(key, value, types_[key])
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def parse_overrides(argv: list[str]) -> dict:
    """``["--key", "value", "--flag", "--k=v"]`` -> ``{"key": "value", "flag": "true", "k": "v"}``."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"{arg}: expected --key value (config keys are given as --key value)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value, i = "true", i + 1
        out[key.replace("-", "_")] = value
    return out


def load_config(cls, config_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < YAML ``config_file`` < ``overrides``; validated."""
    values = read_yaml(config_file) if config_file else {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update(overrides or {})
    return build_config(cls, values)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    data = {"method": cfg.method, **cfg.to_dict()}
    from .. import atomic

    atomic.write_text(path, yaml.safe_dump(data, sort_keys=False))


def describe(cls) -> str:
    """One line per key: ``--key (type, default): help`` -- the CLI's epilog."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = f" one of {{{', '.join(f.metadata['choices'])}}}" if f.metadata.get("choices") else ""
        tp = _base_type(_fields(cls)[f.name])
        lines.append(f"  --{f.name} ({getattr(tp, '__name__', tp)}, default {default!r}){extra}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
