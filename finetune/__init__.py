"""diffplug.finetune: one accelerate trainer; each method is a Config + a loss (+ its data).

    diffplug finetune dpo --output_dir runs/dpo --max_steps 500
    diffplug finetune spo --output_dir runs/spo --max_steps 200
    accelerate launch -m diffplug.finetune spo --output_dir runs/spo   # multi-GPU

From Python::

    from diffplug.finetune import DPOConfig, DiffusionDPO, Trainer
    Trainer(DiffusionDPO(DPOConfig(output_dir="runs/dpo", data="pairs.jsonl"))).train()
"""

from .config import ConfigError, TrainConfig, load_config
from .trainer import EMA, Method, Trainer


def __getattr__(name):  # methods import lazily (they pull in diffusers pipelines)
    from . import dpo, spm, spo

    for module in (dpo, spo, spm):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(name)


__all__ = ["ConfigError", "TrainConfig", "load_config", "EMA", "Method", "Trainer",
           "DPOConfig", "DiffusionDPO", "dpo_loss", "SPOConfig", "SPO", "SPMConfig", "SPMTraining"]
