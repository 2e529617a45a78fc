"""FIND: fine-tuning the initial noise distribution with policy optimisation (Chen et al., ACM MM 2024,
arXiv:2407.19453; spec: shared/methods/find.md).

The diffusion model stays frozen. Per prompt ``c`` a Gaussian policy ``pi_phi = N(mu_c, diag sigma_c^2)``
over the initial latent ``z_T`` (the latent's shape) is learned; the environment is the frozen sampler
(any scheduler and guidance of diffplug's loop), the reward any registered reward. One iteration:

1. rollout: ``z_T ~ pi_phi``, sample the image with the frozen pipeline, ``R = r(x_0, c)``;
2. reward calibration: a value network ``V_psi([mu_c, sigma_c], e_c)`` (MLP 256-256-256-1 on the
   flattened mean and scale and the prompt's text embedding) is regressed onto the rollout's rewards
   (MSE, its own AdamW); advantage ``A = R - V_psi`` (``advantage=group``: the rewards standardised
   within each prompt's samples of the rollout instead, see below);
3. ratio ``rho = exp(log pi_phi(z_T) - log pi_old(z_T))`` with log-probabilities *averaged* over the
   latent's elements (as the paper's code), clamped to ``[1 - 0.2, 1 + 0.2]``;
4. ``L = -reward_weight * A * clamp(rho) + kl_weight * mean[(mu - 0)^2 + (sigma - 1)^2]``, one optimiser
   step per rollout (official: ``dist_train2.py`` steps once per iteration; its ``p_step`` only divides
   the logged averages). ``policy_steps > 1`` re-uses a rollout for several steps: our extension.

Choices, paper / official code -> here:

* ``pi_old`` is the initial N(0, I), set once and never refreshed (official; a hard trust region around
  the prior) -- ``ratio_reference=rollout`` gives PPO's previous policy instead;
* the ratio is clamped (official; no gradient outside the bounds) -- ``clip_mode=ppo`` takes PPO's
  ``min(rho A, clamp(rho) A)``;
* the official buffer pairs every update with its *oldest* reward; here each reward stays with the
  noise that produced it (the current rollout);
* the official README documents gradient clipping at 0.1 that the script never applies; here
  ``max_grad_norm`` defaults to 0.1 and is applied (by the trainer);
* ``advantage=group`` (not the paper's) replaces ``R - V`` by ``(R - mean) / std`` over the prompt's
  ``samples_per_prompt`` draws of the same rollout. The value network gives one value per prompt and
  follows the mean reward, not its rollout-to-rollout spread, so ``R - V`` keeps a per-rollout offset that
  pushes all of that rollout's draws the same way. On the testbed both gave the same held-out gain
  (``benchmarks/find_results.md``), so the default stays the paper's;
* sigma is parametrised as ``exp(log_sigma)`` (no clamp at 1e-4 needed);
* text embedding: the mean over tokens of the pipeline's own prompt encoding (the paper: CLIP's 768-d
  text feature); the value network trains on each rollout (``value_steps`` AdamW steps, lr 1e-4) with
  the rollouts of all processes gathered, so it is the same on every process.

Flow models (SD3, Flux, Chroma, Z-Image): the policy is over the latent in the denoiser's layout --
Flux's *packed* ``(tokens, 4C)`` latents, as ``pipe(latents=...)`` takes them -- and the rollouts run the
frozen flow pipeline with its own flow scheduler (``--scheduler auto``, the default: DDIM as the paper on
noise-prediction models, the model's own scheduler on flow models; ``flow-euler`` names it; a
noise-prediction sampler such as ``ddim`` is refused on a flow model). The sampler is chosen by ``eta``:

* ``eta = 0``: the flow ODE (the scheduler's Euler step): the image is a deterministic function of
  z_T, the cleaner reading of the paper's motivation (find.md);
* ``eta = a > 0`` (default 1): Flow-GRPO's reverse SDE with the ODE's marginals, noise level a
  (``logprob.FlowSDESampler``, ``flow_sde_step_with_logprob``), the analogue of the paper's DDIM
  eta = 1; its noise comes from the same per-sample generators as z_T, so a rollout is reproducible.

Using a learned policy (``D/final/noise_policy.safetensors``)::

    policy = load_noise_policy("D/final/noise_policy.safetensors")
    latents = policy.sample_initial_noise(prompts, 4, generator=torch.manual_seed(0), pipe=pipe)
    images = pipe(prompts, num_images_per_prompt=4, latents=latents).images

or ``diffplug sample --noise-policy D/final/noise_policy.safetensors --prompt P``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from . import state as run_state
from .config import LR_SCHEDULERS, ConfigError, TrainConfig, choice, opt
from .logprob import FlowSDESampler
from .model import FAMILIES
from .pairs import HARD_FASHION_PROMPTS, read_prompts, resolve_reward
from ..samplers.noise_policy import FORMAT, NoisePolicy, load_noise_policy  # noqa: F401  (re-exported)
from .trainer import Method



@dataclass
class FINDConfig(TrainConfig):
    prompts: list = opt(list(HARD_FASHION_PROMPTS), "prompts, one distribution each: a list or a .txt/.json file")
    prompt: str = opt("", "one prompt (instead of --prompts)")
    reward: str = opt("", "reward of the rollouts: a diffplug.evals reward name or module:function (required)")
    scheduler: str = opt("auto", "sampler of the rollouts: a `diffplug sample --scheduler` name; '' = the model's own; "
                         "auto = ddim (paper) on noise-prediction models, the model's own on flow models")
    guidance: str = opt("cfg", "guidance of the rollouts (cfg, apg, ag, linear-ag) at guidance_scale")
    guidance_opts: list = opt([], "guidance options as key=value (as diffplug sample --guidance-opt)")
    guidance_scale: float = opt(7.5, "guidance scale of the rollouts (paper: CFG 7.5)")
    num_steps: int = opt(50, "denoising steps of the rollouts (paper: DDIM 50)")
    eta: float = opt(1.0, "DDIM eta of the rollouts (paper: 1 = stochastic; 0 = deterministic given z_T); flow "
                          "models: 0 = the ODE, a > 0 = the reverse SDE with noise level a (Flow-GRPO: 0.7)")
    samples_per_prompt: int = opt(1, "z_T drawn per prompt per rollout (official num_samples: 1)")
    policy_steps: int = opt(1, "optimiser steps per rollout (official: 1; its p_step only scales the logs); "
                            "> 1 re-uses each rollout (our extension)")
    value_steps: int = opt(5, "value-network AdamW steps per rollout (official v_step: 5); 0 = no value network, A = R")
    value_lr: float = opt(1e-4, "value-network learning rate (official v_lr)")
    value_hidden: int = opt(256, "width of the value network's three hidden layers")
    advantage: str = choice("value", ("value", "group"),
                            "A = R - V (official) or (R - mean) / std over the prompt's samples of the rollout")
    reward_weight: float = opt(10.0, "weight of the policy term (official reward_weight)")
    kl_weight: float = opt(0.01, "weight of the squared distance of (mu, sigma) to the prior (0, 1) (official kl_weight)")
    ratio_clip: float = opt(0.2, "rho is clipped to [1 - this, 1 + this] (official ratio_clip)")
    ratio_reference: str = choice("initial", ("initial", "rollout"),
                                  "pi_old: the initial N(0, I) (official) or the policy that drew the rollout (PPO)")
    clip_mode: str = choice("clamp", ("clamp", "ppo"), "clamp(rho) * A (official) or PPO's min(rho A, clamp(rho) A)")
    # official defaults: 150 iterations (one optimiser step each), AdamW lr 1e-3, constant, no weight decay, clip 0.1
    max_steps: int = opt(150, "optimiser steps (150 rollouts x policy_steps 1 for one prompt, as official)")
    learning_rate: float = opt(1e-3, "policy learning rate")
    lr_scheduler: str = choice("constant", LR_SCHEDULERS, "diffusers.optimization.get_scheduler name")
    adam_weight_decay: float = opt(0.0)
    max_grad_norm: float = opt(0.1, "gradient clipping (documented by the official code, never applied there)")

    method = "find"

    def prompt_list(self) -> list[str]:
        prompts = [self.prompt] if self.prompt else read_prompts(self.prompts)
        if not prompts:
            raise ConfigError("prompts: empty; pass --prompt P or --prompts FILE")
        if len(set(prompts)) != len(prompts):
            raise ConfigError("prompts: a prompt is listed twice; each prompt gets one distribution")
        return prompts

    def validate(self) -> None:
        super().validate()
        if not self.reward:
            raise ConfigError("reward: required; pass --reward NAME (diffplug finetune --list-rewards) or module:function")
        for key in ("num_steps", "samples_per_prompt", "policy_steps", "value_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1; got {getattr(self, key)}")
        if self.advantage == "group" and self.samples_per_prompt < 2:
            raise ConfigError("advantage: 'group' compares a prompt's samples of one rollout; pass --samples_per_prompt >= 2")
        if self.value_steps < 0:
            raise ConfigError(f"value_steps: must be >= 0 (0 = no value network); got {self.value_steps}")
        if self.eta < 0:
            raise ConfigError(f"eta: must be >= 0; got {self.eta}")
        if not 0 < self.ratio_clip < 1:
            raise ConfigError(f"ratio_clip: must be in (0, 1); got {self.ratio_clip}")
        for key in ("reward_weight", "value_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0; got {getattr(self, key)}")
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight: must be >= 0; got {self.kl_weight}")
        self.prompt_list()


# -- the policy, its loss, the value network -----------------------------------------------------------


class InitialNoisePolicy(nn.Module):
    """One diagonal Gaussian over z_T per prompt: ``mean`` and ``log_std`` of shape (P, C, h, w)."""

    def __init__(self, num_prompts: int, latent_shape):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(num_prompts, *latent_shape))
        self.log_std = nn.Parameter(torch.zeros(num_prompts, *latent_shape))

    @property
    def std(self) -> torch.Tensor:
        return self.log_std.exp()

    @torch.no_grad()
    def sample(self, index: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """``z = mu + sigma * eps``, row i drawn from ``gens[i]`` (N(0, I) exactly at initialisation)."""
        eps = D.randn(gens, self.mean.shape[1:], self.mean.device)
        return self.mean[index] + self.std[index] * eps

    def log_prob(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Gaussian log-density averaged over the latent's elements (the paper's convention), (N,)."""
        return torch.distributions.Normal(self.mean[index], self.std[index]).log_prob(z).flatten(1).mean(1)

    def regulariser(self, index: torch.Tensor) -> torch.Tensor:
        """The paper's "KL": mean squared distance of (mu, sigma) to the prior's (0, 1), (N,)."""
        return (self.mean[index].square() + (self.std[index] - 1).square()).flatten(1).mean(1)

    def forward(self, z, index):  # through the (DDP-wrapped) module, so gradients synchronise
        return self.log_prob(z, index), self.regulariser(index)


def prior_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Mean element-wise log-density of N(0, I): the initial policy."""
    return (-0.5 * z.square() - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def find_loss(logp, logp_old, advantage, regulariser, reward_weight: float, kl_weight: float, clip: float,
              mode: str = "clamp"):
    """-> ``(loss, ratio)``: ``-reward_weight * A * clamp(rho, 1 - clip, 1 + clip) + kl_weight * reg``,
    averaged over samples (``mode="ppo"``: ``-min(rho A, clamp(rho) A)`` for the first term)."""
    ratio = torch.exp(logp - logp_old)
    clipped = ratio.clamp(1 - clip, 1 + clip)
    term = clipped * advantage if mode == "clamp" else torch.minimum(ratio * advantage, clipped * advantage)
    return -reward_weight * term.mean() + kl_weight * regulariser.mean(), ratio


def group_advantage(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Rewards standardised within each prompt's ``k`` consecutive samples: ``(R - mean) / std`` (0 if all equal)."""
    r = rewards.reshape(-1, k)
    return ((r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True).clamp_min(1e-8)).reshape(-1)


class NoiseValueNet(nn.Module):
    """``V([mu, sigma], e_text)``: the official ValueInit MLP (ReLU, 3 hidden layers, xavier last layer)."""

    def __init__(self, latent_numel: int, text_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * latent_numel + text_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.xavier_normal_(self.net[-1].weight)

    def forward(self, mean, std, text):
        return self.net(torch.cat([mean.flatten(1), std.flatten(1), text], 1))[:, 0]


# -- the learned policy as a file: samplers/noise_policy.py (sampling reads it; FIND writes it)


# -- the method on the shared trainer ---------------------------------------------------------------------


class FIND(Method):
    name = "find"
    Config = FINDConfig
    families = FAMILIES  # the policy is over the denoiser's latent layout (Flux: packed)

    def trainable(self, trainer):
        self.prompts = self.config.prompt_list()
        self.latent_shape = trainer.model.latent_shape(trainer.resolution)
        return InitialNoisePolicy(len(self.prompts), self.latent_shape)

    def setup(self, trainer):
        from ..pipelines import from_pipe
        from ..pipelines.registry import make_guidance, make_scheduler, parse_options

        cfg, model = self.config, trainer.model
        self.reward = resolve_reward(cfg.reward)
        pipe = model.pipe
        try:  # the environment: the frozen pipeline, its scheduler swapped the diffusers way
            name = ("" if model.is_flow else "ddim") if cfg.scheduler == "auto" else cfg.scheduler
            pipe.scheduler = make_scheduler(name or None, pipe)
            guidance = make_guidance(cfg.guidance, guidance_scale=cfg.guidance_scale, **parse_options(cfg.guidance_opts))
        except ValueError as e:
            raise ConfigError(f"scheduler/guidance: {e}") from None
        self.sampler = None
        if model.is_flow:
            self.sampler = self._flow_sampler(trainer, pipe.scheduler)
        elif cfg.eta and "eta" not in inspect.signature(pipe.scheduler.step).parameters:
            raise ConfigError(f"eta: {type(pipe.scheduler).__name__} has no eta; pass --eta 0 (or --scheduler ddim)")
        self.run = from_pipe(pipe, guidance=guidance, sampler=self.sampler)
        encoded = model.encode_prompts(self.prompts, trainer.resolution)  # the token sequence: (P, L, d)
        text = encoded.get("encoder_hidden_states", encoded.get("cap_feats"))  # Z-Image: its caption features
        self.text = text.mean(1).float().to(trainer.device)  # (P, d): mean over tokens
        numel = math.prod(self.latent_shape)
        self.value = NoiseValueNet(numel, self.text.shape[1], cfg.value_hidden).to(trainer.device)
        self.value_opt = torch.optim.AdamW(self.value.parameters(), lr=cfg.value_lr, weight_decay=0.0)
        self.item, self.remaining, self.batch_logs = None, 0, {}
        self.stats = {"rollouts": 0, "images": 0, "nfe": 0}
        n = len(self.prompts)
        return list(range(n)), lambda items: {"index": torch.tensor(items, dtype=torch.long)}

    def _flow_sampler(self, trainer, scheduler):
        """Flow models: a flow scheduler, and the SDE sampler when ``eta > 0`` (None: the ODE)."""
        from ..predictions import is_flow_scheduler

        cfg, name = self.config, type(trainer.model.pipe).__name__
        if not is_flow_scheduler(scheduler):
            raise ConfigError(f"scheduler: {cfg.scheduler!r} ({type(scheduler).__name__}) samples noise-prediction models; "
                              f"{cfg.model} ({name}) is a flow model: pass --scheduler auto (the default: its own) or flow-euler (or '' for its own "
                              "flow scheduler), with --eta 0 for the ODE or --eta A > 0 for the reverse SDE")
        if not cfg.eta:
            return None
        try:
            sampler = FlowSDESampler(cfg.eta)
            sampler.check_scheduler(scheduler)
        except ValueError as e:
            raise ConfigError(f"eta: {cfg.eta} asks for the flow SDE, but {e}; or pass --eta 0 for this scheduler's ODE") from None
        return sampler

    def _policy(self, trainer) -> InitialNoisePolicy:
        return trainer.accelerator.unwrap_model(trainer.unet)

    # -- one rollout: sample, score, calibrate ------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, trainer, batch) -> None:
        cfg, acc, k = self.config, trainer.accelerator, self.config.samples_per_prompt
        policy = self._policy(trainer)
        index = batch["index"].repeat_interleave(k).to(trainer.device)
        gens = [trainer.generators([p], salt=j)[0] for p in batch["positions"].tolist() for j in range(k)]
        z = policy.sample(index, gens)  # each generator: first z_T, then the sampler's own noise
        if self.sampler is not None:
            self.sampler.generators = gens  # the flow SDE's noise, per sample
        prompts = [self.prompts[i] for i in batch["index"].tolist()]
        eta = 0.0 if trainer.model.is_flow else cfg.eta  # flow: eta is the SDE sampler's noise level, not a pipeline argument
        out = self.run(prompts, num_images_per_prompt=k, latents=z, num_inference_steps=cfg.num_steps, eta=eta,
                       generator=gens, height=trainer.resolution, width=trainer.resolution, output_type="pt",
                       **trainer.model.prompt_arguments())  # T5-style prompts at the length the model was trained at
        rewards = torch.as_tensor(self.reward(out.images.float(), [self.prompts[i] for i in index.tolist()]))
        rewards = rewards.float().reshape(-1).to(trainer.device)
        value_loss = self._fit_value(policy, acc.gather(index), acc.gather(rewards)) if cfg.value_steps else 0.0
        baseline = self._value(policy, index) if cfg.value_steps else torch.zeros_like(rewards)
        advantage = group_advantage(rewards, k) if cfg.advantage == "group" else rewards - baseline
        logp_old = prior_log_prob(z) if cfg.ratio_reference == "initial" else policy.log_prob(z, index)
        self.item = {"z": z, "index": index, "advantage": advantage, "logp_old": logp_old}
        self.remaining = cfg.policy_steps
        self.stats["rollouts"] += 1
        self.stats["images"] += len(z) * acc.num_processes
        self.stats["nfe"] += out.nfe * len(z) * acc.num_processes
        self.batch_logs = {"reward": rewards.mean().item(), "value": baseline.mean().item(), "value_loss": value_loss,
                           "advantage_abs": advantage.abs().mean().item(), "nfe_total": self.stats["nfe"],
                           "mean_abs": policy.mean.abs().mean().item(), "std_mean": policy.std.mean().item()}

    def _value(self, policy, index):
        return self.value(policy.mean[index].detach(), policy.std[index].detach(), self.text[index])

    @torch.enable_grad()
    def _fit_value(self, policy, index, rewards) -> float:
        """``value_steps`` AdamW steps of MSE(V(mu, sigma, e), R) on this rollout (all processes')."""
        for _ in range(self.config.value_steps):
            loss = F.mse_loss(self._value(policy, index), rewards)
            self.value_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.value_opt.step()
        return float(loss.detach())

    def prepare(self, trainer, batch):
        """The current rollout, for ``policy_steps`` optimiser steps; then a new one from this batch."""
        if self.remaining == 0:
            self.rollout(trainer, batch)
        self.remaining -= 1
        return [self.item]

    def loss(self, trainer, part):
        cfg = self.config
        logp, reg = trainer.unet(part["z"], part["index"])
        loss, ratio = find_loss(logp, part["logp_old"], part["advantage"], reg, cfg.reward_weight, cfg.kl_weight,
                                cfg.ratio_clip, cfg.clip_mode)
        clipped = (ratio < 1 - cfg.ratio_clip) | (ratio > 1 + cfg.ratio_clip)
        return loss, {"ratio": ratio.mean().detach(), "clipped_fraction": clipped.float().mean(), "regulariser": reg.mean().detach()}

    # -- exact resume: the unfinished rollout and the value network --------------------------------------
    def save_run_state(self, trainer, folder: Path) -> None:
        rank = trainer.accelerator.process_index
        item = {k: v.cpu() for k, v in self.item.items()} if self.item is not None else None
        run_state.save_tree(Path(folder), f"find_rollout_rank{rank}",
                            {"item": item, "remaining": self.remaining, "logs": self.batch_logs, "stats": self.stats})
        if rank == 0:
            run_state.save_tree(Path(folder), "find_value", {"model": self.value.state_dict(), "optimizer": self.value_opt.state_dict()})

    def restore_run_state(self, trainer, folder: Path) -> None:
        rank, folder = trainer.accelerator.process_index, Path(folder)
        if not (folder / f"find_rollout_rank{rank}.json").is_file():
            raise ConfigError(f"resume: {folder} has no find_rollout_rank{rank}.json; it was not written by FIND")
        saved, value = run_state.load_tree(folder, f"find_rollout_rank{rank}"), run_state.load_tree(folder, "find_value")
        with run_state.reading(folder / "find_value.safetensors"):
            self.value.load_state_dict(value["model"])
            self.value_opt.load_state_dict(value["optimizer"])
        item = saved["item"]
        self.item = {k: v.to(trainer.device) for k, v in item.items()} if item is not None else None
        self.remaining, self.batch_logs, self.stats = int(saved["remaining"]), saved["logs"], saved["stats"]

    def save_final(self, trainer, module, folder: Path) -> None:
        """``folder/noise_policy.safetensors``: mean, std and what the policy was trained with."""
        cfg = self.config
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"model": cfg.model, "scheduler": type(trainer.model.pipe.scheduler).__name__ + (" + flow SDE" if self.sampler else ""),
                "num_inference_steps": cfg.num_steps, "guidance": cfg.guidance, "guidance_scale": cfg.guidance_scale,
                "eta": cfg.eta, "resolution": trainer.resolution, "reward": cfg.reward, "train_steps": cfg.max_steps,
                **self.stats}
        NoisePolicy(module.mean, module.std, self.prompts, meta).save(folder / "noise_policy.safetensors")
        moved = float(module.mean.detach().abs().max().item() + module.log_std.detach().abs().max().item())
        if moved == 0.0:
            trainer._print("WARNING: the policy did not move from N(0, I); the saved policy samples as the base model")


__all__ = ["FINDConfig", "FIND", "InitialNoisePolicy", "NoiseValueNet", "NoisePolicy", "find_loss", "group_advantage",
           "load_noise_policy", "prior_log_prob"]
