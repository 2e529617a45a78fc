"""SPO: step-aware (step-by-step) preference optimisation (Liang et al., arXiv:2406.04314, CVPR 2025).

Online: each batch of prompts is sampled with DDIM (eta = 1) by the *current* model through the
step-wise resampler (Sec. 3.3):

1. denoise normally for ``divert_start_step`` steps;
2. from the shared ``x_t`` draw ``k`` candidates ``x_{t-1}^(j)`` from the stochastic DDIM transition;
3. judge the candidates with the step-aware preference model (SPM) on their predicted clean images
   at their timestep; win = argmax, lose = argmin; keep the pair if
   ``softmax([s_win, s_lose])`` differs by more than ``threshold``; record ``(x_t, x_win, x_lose, t)``;
4. a uniformly random candidate continues; branch ``k`` new ones from it; repeat to the end (the
   final candidates are scored on their decoded images at t = 0).

SPO-SDXL (``num_inner_step = m > 1``): each candidate runs ``m`` steps before the comparison, and the
j-th transitions of the winning and the losing chain form a pair (their parents then differ).

Loss per recorded transition (Sec. 3.4), with the frozen initial model as reference and the DDIM
log-density averaged over latent elements (``logprob.ddim_step_with_logprob``):

    r = exp(log p_theta(x_{t-1} | x_t) - log p_ref(x_{t-1} | x_t)),   r_hat = clamp(r, 1 - eps, 1 + eps)
    L = -log sigmoid(beta * (log r_hat_win - log r_hat_lose))

Both candidates share their parent ``x_t``, so one (CFG) forward of the policy and one of the reference
give the means of both. One optimiser step per batch of prompts: the gradients of all valid
transitions of the batch are averaged (the official code takes several optimiser steps over
mini-batches of the transitions; set ``transitions_per_micro_batch`` to bound memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data as D
from ..predictions import noise_levels, split
from .config import ConfigError, TrainConfig, opt
from .logprob import ddim_step_with_logprob, guided_prediction
from .pairs import FASHION_PROMPTS, read_prompts
from .spm import load_preference_model
from .trainer import Method


@dataclass
class SPOConfig(TrainConfig):
    prompts: list = opt(list(FASHION_PROMPTS), "training prompts: a list or a .txt/.json file")
    preference_model: str = opt(
        "testbed",
        "step-aware preference model: an spo-pm output folder, or a backbone (testbed | clip:<folder> | "
        "module:function) used untrained (= the backbone scorer at every t)",
    )
    num_steps: int = opt(20, "DDIM sampling steps of the rollouts")
    eta: float = opt(1.0, "DDIM eta of the rollouts (1 = DDPM variance)")
    divert_start_step: int = opt(4, "plain denoising steps before the resampler starts branching")
    num_sample_each_step: int = opt(4, "k: candidates per step (SD-1.5: 4, SDXL: 2)")
    num_inner_step: int = opt(1, "steps each candidate runs before the comparison (SD-1.5: 1, SDXL: 3)")
    threshold: float = opt(0.3, "keep a pair only if softmax([s_win, s_lose]) differs by more (SD-1.5: 0.3)")
    beta: float = opt(10.0, "beta of the pairwise loss")
    eps: float = opt(0.1, "ratio clipping: r is clamped to [1 - eps, 1 + eps]")
    train_cfg: bool = opt(True, "apply CFG (guidance_scale) to the policy and reference log-probs, as sampled")
    transitions_per_micro_batch: int = opt(0, "transitions per backward pass; 0 = all of a batch at once")
    # paper defaults for SD-1.5 (LoRA r = 4, alpha 4, lr 6e-5, wd 1e-4)
    learning_rate: float = opt(6e-5, "peak learning rate")
    lora_rank: int = opt(4, "LoRA rank r")
    lora_alpha: float = opt(4.0, "LoRA alpha")
    adam_weight_decay: float = opt(1e-4)

    method = "spo"

    def validate(self) -> None:
        super().validate()
        if self.num_steps < 2:
            raise ConfigError(f"num_steps: must be >= 2; got {self.num_steps}")
        if not 0 <= self.divert_start_step < self.num_steps:
            raise ConfigError(f"divert_start_step: must be in [0, num_steps={self.num_steps}); got {self.divert_start_step}")
        if self.num_inner_step < 1:
            raise ConfigError(f"num_inner_step: must be >= 1; got {self.num_inner_step}")
        if self.num_sample_each_step < 2:
            raise ConfigError(f"num_sample_each_step: need >= 2 candidates to form a pair; got {self.num_sample_each_step}")
        if not self.eta > 0:
            raise ConfigError(f"eta: must be > 0 (the transition needs a density); got {self.eta}")
        if not 0 <= self.threshold < 1:
            raise ConfigError(f"threshold: must be in [0, 1); got {self.threshold}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"eps: must be in (0, 1); got {self.eps}")
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0; got {self.beta}")
        if self.transitions_per_micro_batch < 0:
            raise ConfigError(f"transitions_per_micro_batch: must be >= 0; got {self.transitions_per_micro_batch}")


def compare(scores: torch.Tensor, threshold: float):
    """SPO's compare function. ``scores``: (B, k) -> ``(win, lose, valid)``: indices of the best and the
    worst candidate, and whether ``softmax([s_win, s_lose])`` separates them by more than ``threshold``."""
    win, lose = scores.argmax(dim=1), scores.argmin(dim=1)
    pair = torch.stack([scores.gather(1, win[:, None])[:, 0], scores.gather(1, lose[:, None])[:, 0]], dim=1)
    p = pair.softmax(dim=1)
    return win, lose, (p[:, 0] - p[:, 1]) > threshold


def spo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta: float, eps: float):
    """-> ``(loss per transition, clipped mask (2, N))``; the clamp has zero gradient outside [1-eps, 1+eps]."""
    ratio_w = torch.clamp(torch.exp(logp_w - ref_logp_w), 1 - eps, 1 + eps)
    ratio_l = torch.clamp(torch.exp(logp_l - ref_logp_l), 1 - eps, 1 + eps)
    losses = -F.logsigmoid(beta * (torch.log(ratio_w) - torch.log(ratio_l)))
    raw = torch.stack([logp_w - ref_logp_w, logp_l - ref_logp_l]).exp()
    return losses, (raw < 1 - eps) | (raw > 1 + eps)


class StepwiseResampler:
    """The branching sampler of SPO (written once; a later method may subclass ``compare``)."""

    def __init__(self, model, scheduler, preference_model, cfg: SPOConfig):
        self.model, self.scheduler, self.spm, self.cfg = model, scheduler, preference_model, cfg

    def _x0_images(self, pred, x, t):
        """Predicted clean images (decoded, [0, 1]) of ``x`` at ``t``."""
        alpha, sigma = noise_levels(self.scheduler, torch.as_tensor(t).reshape(-1).cpu())
        x0 = split(pred, x, alpha.to(x.device).view(-1, 1, 1, 1), sigma.to(x.device).view(-1, 1, 1, 1), self.model.prediction_type)[0]
        return self.model.decode(x0)

    @torch.no_grad()
    def __call__(self, unet, prompts: list[str], gens: list[torch.Generator], size: int, device) -> dict:
        """-> transitions ``{"x_t_w", "x_w", "x_t_l", "x_l", "t", "prompt", "valid", "scores"}``: one row per
        prompt and denoising step after the divert step. With ``num_inner_step = 1`` the winner and the
        loser share their parent (``x_t_w == x_t_l``); with m > 1 (SPO-SDXL) each candidate runs m
        steps before the comparison and the j-th transitions of the two chains form a pair."""
        cfg, model, sched = self.cfg, self.model, self.scheduler
        b, k, n, m = len(prompts), cfg.num_sample_each_step, cfg.num_steps, cfg.num_inner_step
        sched.set_timesteps(n)
        steps = sched.timesteps
        conditions = model.encode_prompts(prompts, size, uncond=True)
        cond_k = {key: (c.repeat_interleave(k, 0), u.repeat_interleave(k, 0)) for key, (c, u) in conditions.items()}
        shape = model.latent_shape(size)
        prompts_k = [p for p in prompts for _ in range(k)]
        rows = torch.arange(b, device=device)

        def step(pred, t, x_cur, gen_rows):
            return ddim_step_with_logprob(sched, pred, t, x_cur, n, cfg.eta, noise=D.randn(gen_rows, shape, device))[0]

        gens_k = [g for g in gens for _ in range(k)]  # candidate j of prompt i draws from prompt i's generator
        x = D.randn(gens, shape, device) * sched.init_noise_sigma
        for i in range(cfg.divert_start_step):  # 1. plain denoising
            x = step(guided_prediction(model, unet, x, steps[i], conditions, cfg.guidance_scale), steps[i], x, gens)

        rec = {key: [] for key in ("x_t_w", "x_w", "x_t_l", "x_l", "t", "prompt", "valid", "scores")}
        i = cfg.divert_start_step
        pred_x = guided_prediction(model, unet, x, steps[i], conditions, cfg.guidance_scale)
        while i < n:
            # 2. branch k candidates from x; each runs up to m steps (chain[s]: (B, k, ...) latents)
            chain, times = [x[:, None].expand(b, k, *shape)], []
            cands = torch.stack([step(pred_x, steps[i], x, gens) for _ in range(k)], dim=1)
            chain.append(cands)
            times.append(int(steps[i]))
            i += 1
            for _ in range(m - 1):
                if i >= n:
                    break
                flat = cands.flatten(0, 1)
                pred = guided_prediction(model, unet, flat, steps[i], cond_k, cfg.guidance_scale)
                cands = step(pred, steps[i], flat, gens_k).view(b, k, *shape)
                chain.append(cands)
                times.append(int(steps[i]))
                i += 1
            # 3. judge the chain ends with the SPM at their timestep (the final ones at t = 0, decoded)
            flat = cands.flatten(0, 1)
            if i < n:
                pred_end = guided_prediction(model, unet, flat, steps[i], cond_k, cfg.guidance_scale)
                scores = self.spm(self._x0_images(pred_end, flat, steps[i]), prompts_k, torch.full((b * k,), float(steps[i])))
            else:
                scores = self.spm(model.decode(flat), prompts_k, torch.zeros(b * k))
            scores = scores.view(b, k)
            win, lose, valid = compare(scores, cfg.threshold)
            for s_, t_ in enumerate(times):
                rec["x_t_w"].append(chain[s_][rows, win])
                rec["x_w"].append(chain[s_ + 1][rows, win])
                rec["x_t_l"].append(chain[s_][rows, lose])
                rec["x_l"].append(chain[s_ + 1][rows, lose])
                rec["t"].append(torch.full((b,), t_, dtype=torch.long))
                rec["prompt"].append(torch.arange(b))
                rec["valid"].append(valid.cpu())
                rec["scores"].append(scores.float().cpu())
            # 4. one candidate, uniformly at random, continues
            choice = D.randint(gens, 0, k, device)
            x = cands[rows, choice]
            if i < n:
                pred_x = pred_end.view(b, k, *shape)[rows, choice]
        out = {key: torch.cat(v) for key, v in rec.items()}
        out["final"] = x
        return out


class SPO(Method):
    name = "spo"
    Config = SPOConfig

    def setup(self, trainer):
        from diffusers import DDIMScheduler

        cfg = self.config
        self.prompts = read_prompts(cfg.prompts)
        self.spm = load_preference_model(cfg.preference_model).to(trainer.device).eval().requires_grad_(False)
        scheduler = DDIMScheduler.from_config(trainer.model.scheduler.config)
        self.resampler = StepwiseResampler(trainer.model, scheduler, self.spm, cfg)
        self.scheduler = scheduler
        return self.prompts, lambda items: {"prompts": list(items)}

    def prepare(self, trainer, batch):
        cfg = self.config
        gens = trainer.generators(batch["positions"])
        prompts = batch["prompts"]
        tr = self.resampler(trainer.unet, prompts, gens, trainer.resolution, trainer.device)
        valid = tr["valid"]
        self.batch_logs = {
            "valid_pair_fraction": valid.float().mean().item(),
            "spm_score_mean": tr["scores"].mean().item(),
        }
        idx = valid.nonzero()[:, 0]
        weight = 1.0 / max(len(idx), 1)
        if len(idx) == 0:  # nothing to learn from: one zero-weighted transition keeps processes in step
            idx, weight = torch.zeros(1, dtype=torch.long), 0.0
        chunk = cfg.transitions_per_micro_batch or len(idx)
        conditions = trainer.model.encode_prompts(prompts, trainer.resolution, uncond=True)
        parts = []
        for sel in idx.split(chunk):
            p = tr["prompt"][sel].to(trainer.device)
            part = {key: tr[key][sel.to(tr[key].device)] for key in ("x_t_w", "x_w", "x_t_l", "x_l")}
            part.update(t=tr["t"][sel], weight=weight, conditions={k: (c[p], u[p]) for k, (c, u) in conditions.items()})
            parts.append(part)
        return parts

    def loss(self, trainer, part):
        cfg, model, sched = self.config, trainer.model, self.scheduler
        scale = cfg.guidance_scale if cfg.train_cfg else 1.0
        t, cond = part["t"].to(part["x_w"].device), part["conditions"]
        shared = torch.equal(part["x_t_w"], part["x_t_l"])  # num_inner_step = 1: one parent, one forward
        x_t = part["x_t_w"] if shared else torch.cat([part["x_t_w"], part["x_t_l"]])
        t_in = t if shared else torch.cat([t, t])
        cond_in = cond if shared else {k: (torch.cat([c, c]), torch.cat([u, u])) for k, (c, u) in cond.items()}
        pred = guided_prediction(model, trainer.unet, x_t, t_in, cond_in, scale)
        with trainer.reference() as ref:
            ref_pred = guided_prediction(model, ref, x_t, t_in, cond_in, scale)
        if shared:
            preds, ref_preds, parents = (pred, pred), (ref_pred, ref_pred), (x_t, x_t)
        else:
            preds, ref_preds, parents = pred.chunk(2), ref_pred.chunk(2), x_t.chunk(2)
        n = cfg.num_steps
        logp = [ddim_step_with_logprob(sched, preds[j], t, parents[j], n, cfg.eta, prev_sample=part[k])[1] for j, k in enumerate(("x_w", "x_l"))]
        ref_logp = [ddim_step_with_logprob(sched, ref_preds[j], t, parents[j], n, cfg.eta, prev_sample=part[k])[1] for j, k in enumerate(("x_w", "x_l"))]
        losses, clipped = spo_loss(logp[0], logp[1], ref_logp[0], ref_logp[1], cfg.beta, cfg.eps)
        logs = {"clipped_fraction": clipped.float().mean().detach(),
                "log_ratio_win": (logp[0] - ref_logp[0]).mean().detach(),
                "log_ratio_lose": (logp[1] - ref_logp[1]).mean().detach()}
        return part["weight"] * losses.sum(), logs


__all__ = ["SPOConfig", "SPO", "StepwiseResampler", "compare", "spo_loss"]
