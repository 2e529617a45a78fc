"""diffplug.finetune: one accelerate trainer; each method is a Config + a loss (+ its data).

    diffplug finetune dpo --output_dir runs/dpo --max_steps 500
    diffplug finetune spo --output_dir runs/spo --max_steps 200
    diffplug finetune find --prompt "a photo of a shirt" --reward classifier_logprob --output_dir runs/find
    accelerate launch -m diffplug.finetune spo --output_dir runs/spo   # multi-GPU

From Python::

    from diffplug.finetune import DPOConfig, DiffusionDPO, Trainer
    Trainer(DiffusionDPO(DPOConfig(output_dir="runs/dpo", data="pairs.jsonl"))).train()
"""

from .config import ConfigError, TrainConfig, load_config
from .trainer import EMA, Method, Trainer


def __getattr__(name):  # methods import lazily (they pull in diffusers pipelines)
    import importlib

    if name.startswith("__") or name in ("dpo", "spo", "spm", "find", "deediff", "sft", "sara", "pso"):
        raise AttributeError(name)  # let the import system load submodules itself
    for sub in ("dpo", "spo", "spm", "find", "deediff", "sft", "pso"):
        module = importlib.import_module(f"{__name__}.{sub}")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "TrainConfig", "load_config", "EMA", "Method", "Trainer",
           "DPOConfig", "DiffusionDPO", "dpo_loss", "SPOConfig", "SPO", "SPMConfig", "SPMTraining",
           "FINDConfig", "FIND", "NoisePolicy", "load_noise_policy",
           "DeeDiffConfig", "DeeDiff", "SFTConfig", "SFT"]
