"""PSO: Pairwise Sample Optimization for timestep-distilled (few-step) models (Miao et al., *Tuning
Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization*, ICLR 2025, arXiv:2410.03190).

Plain denoising-loss fine-tuning of a few-step model blurs its few-step samples. PSO contrasts the
training samples (x+) with *reference samples drawn from the distilled model itself* (x-), so the
model keeps its own few-step distribution while it moves towards the targets.

Offline (``--mode offline``; style / concept customisation from an image folder). The references are
sampled once, at setup, from the frozen initial model (K steps, ``num_references`` of them, the
``reference_prompts``); each target is paired with a random one. Training uses only the K distilled
timesteps, winner and reference share ``t`` and ``eps``; ``e(x)`` is the per-sample denoising error in
the model's prediction space (epsilon-MSE = the paper's sigma_t^-2 weighted x0-MSE):

    pso:     m = [e_ref(x+) - lam e_ref(x-)] - [e_theta(x+) - lam e_theta(x-)],   L = -log sigmoid(beta m) + gamma e_theta(x-)
    pso_db:  L = relu(1 - beta (lam e_theta(x-) - e_theta(x+))) + gamma e_theta(x-)   (no reference model)

The prior ``gamma e_theta(x-)`` (``prior_loss_weight``, "keep the lose image fit") is added to every loss
type, as the released DreamBooth script does after either loss; ``--prior_loss_weight 0`` drops it. With
lam = 1 and gamma = 0, ``pso`` at beta is Diffusion-DPO (``dpo.dpo_loss``) at 2 beta. Note: with the
released DreamBooth defaults (beta 5, lam 0.1, gamma 0.5) and the hinge active, the gradient of ``pso_db``
is ``beta grad e(x+) - (lam beta - gamma) grad e(x-) = 5 grad e(x+)``: the reference terms cancel, and
what remains differs from plain fine-tuning by the distilled-timestep subset.

Online (``--mode online``; preference tuning with any registered reward): per prompt two K-step
trajectories of the current model with the consistency-model step made stochastic,
``x0_hat = f_theta(x_tk)``, ``x_tk+1 ~ N(alpha x0_hat, sigma^2 I)`` (``logprob.renoise_step_with_logprob``),
sharing x_T (as D3PO; the official DMD2 script draws different x_T, see ``share_initial_noise``). The
reward of the final images labels the pair ``h = (+1, -1) | (-1, +1) | (0, 0)`` (ties); over each
stochastic transition (the last, deterministic one excluded):

    L = -log sigmoid(beta [h0 log clamp(r0, 1 +- eps) + h1 log clamp(r1, 1 +- eps)]),  r = p_theta / p_ref

i.e. SPO's clipped pairwise loss (``spo.spo_loss``) with the winner first; tied pairs carry no gradient.
The rollout is drawn inside each optimiser step from the step's own generators, so resuming is exact.

Paper vs official code (we follow the paper): the released DMD2 launcher overrides to 8 steps / 7
transitions for a 4-step model (we use the model's K steps, K - 1 transitions); its reference generator
is None for seed 0 (ours is always seeded); ``neg_generate_freq`` and ``gamma_pso`` are parsed but
unused there (references are generated once here too; no margin term).

Timesteps: an ``LCMScheduler`` model is trained and sampled at the timesteps its scheduler uses for K
steps (the testbed's 4: 999, 759, 499, 259); any other scheduler at the paper's ``s k + s - 1``,
``s = 1000 / K`` (4: 249, 499, 749, 999).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data as D
from .config import LR_SCHEDULERS, ConfigError, TrainConfig, choice, opt
from .logprob import PromptCache, guided_prediction, renoise_step_with_logprob
from .pairs import FASHION_PROMPTS, read_prompts, resolve_reward
from .sft import CaptionedImages, encode_targets
from .spo import spo_loss
from .trainer import Method

DEFAULT_LR = {"offline": 2e-4, "online": 1e-4}  # DreamBooth scripts; online: official 1e-5 x10 (dpo.py's rule)
DEFAULT_BETA = {"offline": 5.0, "online": 50.0}


@dataclass
class PSOConfig(TrainConfig):
    model: str = opt("testbed:sd-lcm", "a few-step model: 'testbed:sd-lcm' (the testbed's LCM student), a local "
                     "diffusers folder or hub id (SD1.x / SDXL)")
    mode: str = choice("offline", ("offline", "online"), "offline: targets from --data against self-sampled references; "
                       "online: paired stochastic rollouts labelled by --reward")
    num_distilled_steps: int = opt(4, "K: the model's sampling steps; training uses only these timesteps")
    guidance_scale: float = opt(7.5, "the guidance scale of rollouts and references: an LCM UNet's w input (no CFG "
                                "pass), CFG for other UNets")
    beta: float = opt(0.0, "beta; 0 = the mode's default: offline 5 (released scripts), online 50")
    learning_rate: float = opt(0.0, "peak learning rate; 0 = the mode's default: offline 2e-4, online 1e-4")
    lr_scheduler: str = choice("constant", LR_SCHEDULERS, "as the released scripts: constant")
    lora_rank: int = opt(16, "LoRA rank r (DreamBooth / DMD2: 16)")
    # -- offline ------------------------------------------------------------------------------------
    loss_type: str = choice("pso", ("pso", "pso_db"), "offline loss: pso (frozen initial model as reference) or "
                            "pso_db (reference-free hinge + prior term)")
    data: str = opt("", "offline targets: a folder of captioned images (metadata.jsonl or NAME.txt) or testbed:SUBSET")
    reference_prompts: list = opt([], "prompts of the reference samples (the class prompt); [] = the targets' captions")
    num_references: int = opt(20, "reference samples drawn once from the initial model (num_negatives)")
    neg_defactor: float = opt(0.1, "lam: weight of the reference samples' error (1 = the symmetric DPO form)")
    prior_loss_weight: float = opt(0.5, "gamma: prior term gamma e(x-) on the references' error, added to both "
                                   "loss types as the released script does (0 = none)")
    random_flip: bool = opt(False, "flip each target horizontally with p = 0.5")
    # -- online ---------------------------------------------------------------------------------------
    prompts: list = opt(list(FASHION_PROMPTS), "online training prompts: a list or a .txt/.json file")
    reward: str = opt("", "online: the reward labelling each pair (diffplug finetune --list-rewards)")
    eps: float = opt(0.1, "online: ratio clipping, r clamped to [1 - eps, 1 + eps]")
    share_initial_noise: bool = opt(True, "online: the two trajectories of a pair start from the same x_T (D3PO)")

    method = "pso"

    def __post_init__(self):
        self.learning_rate = self.learning_rate or DEFAULT_LR.get(self.mode, 2e-4)
        self.beta = self.beta or DEFAULT_BETA.get(self.mode, 5.0)

    def validate(self) -> None:
        self.__post_init__()
        super().validate()
        if self.num_distilled_steps < 1:
            raise ConfigError(f"num_distilled_steps: must be >= 1; got {self.num_distilled_steps}")
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0; got {self.beta}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate: must be > 0; got {self.learning_rate}")
        if self.mode == "offline":
            if not self.data:
                raise ConfigError("data: required with --mode offline; a folder of captioned images or testbed:SUBSET")
            if self.num_references < 1:
                raise ConfigError(f"num_references: must be >= 1; got {self.num_references}")
            if self.neg_defactor < 0 or self.prior_loss_weight < 0:
                raise ConfigError("neg_defactor / prior_loss_weight: must be >= 0")
        else:
            if not self.reward:
                raise ConfigError("reward: required with --mode online; a registered reward (diffplug finetune --list-rewards)")
            if self.num_distilled_steps < 2:
                raise ConfigError("num_distilled_steps: online PSO needs >= 2 steps (the last transition is deterministic)")
            if not 0 < self.eps < 1:
                raise ConfigError(f"eps: must be in (0, 1); got {self.eps}")


def distilled_timesteps(scheduler, k: int) -> torch.Tensor:
    """The K sampling timesteps of a distilled model, descending: ``LCMScheduler``'s own for K steps,
    else the paper's ``s j + s - 1`` (``s = T / K``, j = K-1..0)."""
    if hasattr(scheduler, "get_scalings_for_boundary_condition_discrete"):
        from diffusers import LCMScheduler

        s = LCMScheduler.from_config(scheduler.config)
        s.set_timesteps(k)
        return s.timesteps.long().cpu()
    n = scheduler.config.num_train_timesteps
    if n % k:
        raise ConfigError(f"num_distilled_steps: {n} training timesteps are not divisible by K = {k}")
    step = n // k
    return torch.arange(k - 1, -1, -1) * step + step - 1


def pso_loss(err_w, err_l, ref_err_w, ref_err_l, beta: float, lam: float):
    """Offline ``pso``: -> ``(loss per pair, margin m)``; log 2 where the model equals its reference."""
    margin = (ref_err_w - lam * ref_err_l) - (err_w - lam * err_l)
    return -F.logsigmoid(beta * margin), margin


def pso_db_loss(err_w, err_l, beta: float, lam: float):
    """Offline ``pso_db`` (reference-free): the hinge on ``lam e(x-) - e(x+)``."""
    return torch.relu(1.0 - beta * (lam * err_l - err_w))


def pair_labels(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards`` (B, 2) -> ``h`` (B, 2): (+1, -1) where the first is higher, (-1, +1), or (0, 0) on a tie."""
    h0 = torch.sign(rewards[:, 0] - rewards[:, 1])
    return torch.stack([h0, -h0], dim=1)


class PSO(Method):
    name = "pso"
    Config = PSOConfig

    # -- shared ------------------------------------------------------------------------------------------
    def setup(self, trainer):
        cfg, model = self.config, trainer.model
        self.scheduler = type(model.scheduler).from_config(model.scheduler.config)
        self.timesteps = distilled_timesteps(self.scheduler, cfg.num_distilled_steps)
        self.lcm = "timestep_cond" in model.encode_prompts([""], trainer.resolution)
        trainer._print(f"{cfg.mode}: distilled timesteps {self.timesteps.tolist()}"
                       + (f", guidance scale {cfg.guidance_scale} as the UNet's input" if self.lcm else ""))
        if cfg.mode == "online":
            self.prompts = read_prompts(cfg.prompts)
            self.reward = resolve_reward(cfg.reward)
            self.prompt_cache = PromptCache(model, trainer.resolution)
            self.batch_logs = {}
            return self.prompts, lambda items: {"prompts": list(items)}
        targets = CaptionedImages(cfg.data, trainer.resolution)
        self._sample_references(trainer, list(cfg.reference_prompts) or list(dict.fromkeys(targets.captions)))
        trainer._print(f"data: {len(targets)} target images from {cfg.data}; {len(self.ref_prompts)} references")
        return targets, CaptionedImages.collate

    def denoise(self, trainer, unet, x, t, conditions: dict) -> torch.Tensor:
        """The model output the sampler uses: an LCM UNet with its guidance input, else CFG."""
        model = trainer.model
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if self.lcm:
            return model.predict(unet, x, t, {k: c for k, (c, _) in conditions.items()})
        return guided_prediction(model, unet, x, t, conditions, self.config.guidance_scale)

    # -- offline ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample_references(self, trainer, prompts: list[str]) -> None:
        """``num_references`` K-step samples (latents) of the frozen initial model, seeded."""
        cfg, model = self.config, trainer.model
        self.ref_prompts = [prompts[i % len(prompts)] for i in range(cfg.num_references)]
        g = torch.Generator().manual_seed(cfg.seed)
        shape = model.latent_shape(trainer.resolution)
        x = torch.randn((cfg.num_references, *shape), generator=g).to(trainer.device)
        cond = model.encode_prompts(self.ref_prompts, trainer.resolution, uncond=True)
        ts = self.timesteps
        with model.reference(model.unet) as ref:
            for k, t in enumerate(ts):
                pred = self.denoise(trainer, ref, x, t, cond)
                nxt = ts[k + 1] if k + 1 < len(ts) else -1
                x, _, x0 = renoise_step_with_logprob(self.scheduler, pred, t, x, nxt, noise=torch.randn(x.shape, generator=g))
        self.ref_latents = x0.float()

    def offline_loss(self, trainer, batch):
        cfg, model, device = self.config, trainer.model, trainer.device
        n = len(batch["captions"])
        gens = trainer.generators(batch["positions"])
        x0_w = encode_targets(trainer, batch["images"], gens, cfg.random_flip)
        shape = model.latent_shape(trainer.resolution)
        pick = D.randint(gens, 0, len(self.ref_prompts))
        x0_l = self.ref_latents[pick.to(self.ref_latents.device)].to(device)
        t = self.timesteps[D.randint(gens, 0, len(self.timesteps))]
        eps = D.randn(gens, shape).to(device)
        t2 = torch.cat([t, t]).to(device)
        x_t, target = model.noisy(torch.cat([x0_w, x0_l]), torch.cat([eps, eps]), t2)  # shared t and eps
        cond = model.encode_prompts(list(batch["captions"]) + [self.ref_prompts[i] for i in pick.tolist()], trainer.resolution)
        err = (trainer.predict(trainer.unet, x_t, t2, cond) - target).pow(2).mean(dim=(1, 2, 3))
        logs = {"err_target": err[:n].mean().detach(), "err_reference": err[n:].mean().detach()}
        prior = cfg.prior_loss_weight * err[n:]  # every loss type, as released
        if cfg.loss_type == "pso_db":
            return (pso_db_loss(err[:n], err[n:], cfg.beta, cfg.neg_defactor) + prior).mean(), logs
        with trainer.reference() as ref:
            ref_err = (trainer.predict(ref, x_t, t2, cond) - target).pow(2).mean(dim=(1, 2, 3))
        losses, margin = pso_loss(err[:n], err[n:], ref_err[:n], ref_err[n:], cfg.beta, cfg.neg_defactor)
        logs.update(margin=margin.mean().detach(), implicit_acc=(margin > 0).float().mean().detach())
        return (losses + prior).mean(), logs

    # -- online ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, trainer, prompts: list[str], positions) -> dict:
        """Two stochastic K-step trajectories per prompt (rows 2i, 2i+1) of the current model ->
        ``{"x": (K, 2B, ...) the inputs of each step, "rewards": (B, 2), "final": images}``."""
        cfg, model, device = self.config, trainer.model, trainer.device
        gens = trainer.generators(positions)
        shape = model.latent_shape(trainer.resolution)

        def pair_noise():  # prompt i's generator draws both members' noise
            a, b = D.randn(gens, shape), D.randn(gens, shape)
            return torch.stack([a, b], dim=1).flatten(0, 1).to(device)

        x = pair_noise()
        if cfg.share_initial_noise:
            x = x[0::2].repeat_interleave(2, dim=0)
        prompts2 = [p for p in prompts for _ in range(2)]
        cond = self.prompt_cache(prompts2)
        xs, ts = [], self.timesteps
        for k, t in enumerate(ts):
            xs.append(x)
            pred = self.denoise(trainer, trainer.unet, x, t, cond)
            nxt = ts[k + 1] if k + 1 < len(ts) else -1
            x, _, x0 = renoise_step_with_logprob(self.scheduler, pred, t, x, nxt, noise=pair_noise())
        images = model.decode(x0)
        rewards = torch.as_tensor(self.reward(images, prompts2)).float().cpu().view(-1, 2)
        return {"x": torch.stack(xs), "rewards": rewards, "images": images}

    def prepare(self, trainer, batch):
        if self.config.mode == "offline":
            return [batch]
        prompts = list(batch["prompts"])
        roll = self.rollout(trainer, prompts, batch["positions"])
        h = pair_labels(roll["rewards"])
        self.batch_logs = {"reward_mean": roll["rewards"].mean().item(), "tie_fraction": (h[:, 0] == 0).float().mean().item()}
        return [{"x": roll["x"], "h": h, "prompts": prompts}]

    def online_loss(self, trainer, part):
        cfg = self.config
        x, h, ts = part["x"], part["h"].to(trainer.device), self.timesteps
        k, b2 = len(ts) - 1, x.shape[1]  # the K - 1 stochastic transitions
        src, dst = x[:-1].flatten(0, 1), x[1:].flatten(0, 1)
        t = ts[:-1].repeat_interleave(b2).to(src.device)
        t_next = ts[1:].repeat_interleave(b2).to(src.device)
        cond = self.prompt_cache([p for p in part["prompts"] for _ in range(2)])
        cond = {key: (c.repeat(k, *[1] * (c.dim() - 1)), u.repeat(k, *[1] * (u.dim() - 1))) for key, (c, u) in cond.items()}
        logp = renoise_step_with_logprob(self.scheduler, self.denoise(trainer, trainer.unet, src, t, cond), t, src, t_next, prev_sample=dst)[1]
        with trainer.reference() as ref:
            ref_logp = renoise_step_with_logprob(self.scheduler, self.denoise(trainer, ref, src, t, cond), t, src, t_next, prev_sample=dst)[1]
        logp, ref_logp = logp.view(k, -1, 2), ref_logp.view(k, -1, 2)
        win = (h[:, 1] > 0).long()  # index of the winner in each pair
        decided = h[:, 0] != 0
        rows = torch.arange(len(h), device=h.device)
        pick = lambda v, j: v[:, rows, j]  # noqa: E731  (K-1, B)
        losses, clipped = spo_loss(pick(logp, win), pick(logp, 1 - win), pick(ref_logp, win), pick(ref_logp, 1 - win), cfg.beta, cfg.eps)
        weight = decided.float().expand_as(losses)
        loss = (losses * weight).sum() / weight.sum().clamp(min=1.0)
        logs = {"clipped_fraction": clipped.float().mean().detach(), "log_ratio": (logp - ref_logp).mean().detach()}
        return loss, logs

    def loss(self, trainer, batch):
        if self.config.mode == "offline":
            return self.offline_loss(trainer, batch)
        return self.online_loss(trainer, batch)


__all__ = ["PSOConfig", "PSO", "distilled_timesteps", "pso_loss", "pso_db_loss", "pair_labels"]
