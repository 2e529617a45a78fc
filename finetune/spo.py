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
give the means of both.

Flow models (SD3, Flux, Chroma, Z-Image): the transition is the reverse SDE with the flow ODE's marginals
and its Gaussian log-density (``logprob.flow_sde_step_with_logprob``, Flow-GRPO's; ``eta`` is its noise
level a) on the model's own flow schedule (Flux: packed latents, dynamic shift); ``logprob.OnlineStep``
picks the step for the family, and the SPM is trained on the flow model's noise levels (``spm.py``).

Update schedule (official ``train_spo.py``): a rollout of ``train_batch_size`` prompts yields N_valid
transitions; they are shuffled and cut into mini-batches of ``transitions_per_step`` (10), one
optimiser step each, ceil(N_valid / 10) steps per rollout; then the next rollout. ``max_steps``
counts *optimiser steps*; a rollout's remaining mini-batches are saved with each checkpoint
(``spo_rollout_<rank>.safetensors``), so a resume in the middle of a rollout is exact. The SPM must
be trained first (``diffplug finetune spo-pm --reward NAME``); ``--reward`` names that reward (checked
against the SPM) and is the held-out ``eval_reward`` unless one is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D
from ..predictions import noise_levels, split
from .config import ConfigError, TrainConfig, opt
from .logprob import OnlineStep, PromptCache, guided_prediction
from .model import FAMILIES
from .pairs import FASHION_PROMPTS, read_prompts
from .spm import load_preference_model
from .trainer import Method


@dataclass
class SPOConfig(TrainConfig):
    prompts: list = opt(list(FASHION_PROMPTS), "training prompts: a list or a .txt/.json file")
    preference_model: str = opt("", "a trained step-aware preference model: a `diffplug finetune spo-pm` output folder (required)")
    reward: str = opt("", "the reward the preference model was trained on (checked against it; required)")
    backbone: str = opt("", "the preference model's backbone when it is a module:function (must match the recorded one)")
    eval_reward: str = opt("", "reward of the held-out evaluations; '' = --reward")
    transitions_per_step: int = opt(10, "valid transitions per optimiser step: a rollout gives ceil(N_valid / this) "
                                        "steps (official: 10); 0 = one step per rollout")
    num_steps: int = opt(20, "DDIM sampling steps of the rollouts")
    eta: float = opt(1.0, "DDIM eta of the rollouts (1 = DDPM variance); flow models: the reverse SDE's noise level a, "
                          "g = a sqrt(sigma / (1 - sigma)) (Flow-GRPO: 0.7; finetune/logprob.py)")
    divert_start_step: int = opt(4, "plain denoising steps before the resampler starts branching")
    num_sample_each_step: int = opt(4, "k: candidates per step (SD-1.5: 4, SDXL: 2)")
    num_inner_step: int = opt(1, "steps each candidate runs before the comparison (SD-1.5: 1, SDXL: 3)")
    threshold: float = opt(0.3, "keep a pair only if softmax([s_win, s_lose]) differs by more (SD-1.5: 0.3)")
    beta: float = opt(10.0, "beta of the pairwise loss")
    eps: float = opt(0.1, "ratio clipping: r is clamped to [1 - eps, 1 + eps]")
    train_cfg: bool = opt(True, "apply CFG (guidance_scale) to the policy and reference log-probs, as sampled")
    transitions_per_micro_batch: int = opt(0, "transitions per backward pass; 0 = all of an optimiser step's at once")
    # paper defaults for SD-1.5 (LoRA r = 4, alpha 4, lr 6e-5, wd 1e-4)
    learning_rate: float = opt(6e-5, "peak learning rate")
    lora_rank: int = opt(4, "LoRA rank r")
    lora_alpha: float = opt(4.0, "LoRA alpha")
    adam_weight_decay: float = opt(1e-4)

    method = "spo"

    def __post_init__(self):
        if not self.eval_reward:
            self.eval_reward = self.reward  # documented default: evaluate on the trained reward

    def validate(self) -> None:
        self.__post_init__()
        super().validate()
        if not self.preference_model:
            raise ConfigError("preference_model: required; train one with `diffplug finetune spo-pm --reward NAME "
                              "--output_dir D`, then pass --preference_model D --reward NAME")
        if not self.reward:
            raise ConfigError("reward: required; the reward the preference model was trained on (spo-pm --reward)")
        if self.transitions_per_step < 0:
            raise ConfigError(f"transitions_per_step: must be >= 0; got {self.transitions_per_step}")
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

    def __init__(self, model, step: OnlineStep, preference_model, cfg: SPOConfig):
        self.model, self.step, self.spm, self.cfg = model, step, preference_model, cfg
        self.scheduler = step.scheduler

    def _x0_images(self, pred, x, t):
        """Predicted clean images (decoded, [0, 1]) of ``x`` at ``t``."""
        alpha, sigma = noise_levels(self.scheduler, torch.as_tensor(t).reshape(-1).cpu())
        shape = (-1,) + (1,) * (x.dim() - 1)  # (B, C, h, w), or Flux's packed (B, tokens, 4C)
        x0 = split(pred, x, alpha.to(x.device).view(shape), sigma.to(x.device).view(shape), self.model.prediction_type)[0]
        return self.model.decode(x0)

    @torch.no_grad()
    def __call__(self, unet, prompts: list[str], gens: list[torch.Generator], size: int, device) -> dict:
        """-> transitions ``{"x_t_w", "x_w", "x_t_l", "x_l", "t", "prompt", "valid", "scores"}``: one row per
        prompt and denoising step after the divert step. With ``num_inner_step = 1`` the winner and the
        loser share their parent (``x_t_w == x_t_l``); with m > 1 (SPO-SDXL) each candidate runs m
        steps before the comparison and the j-th transitions of the two chains form a pair."""
        cfg, model = self.cfg, self.model
        b, k, n, m = len(prompts), cfg.num_sample_each_step, cfg.num_steps, cfg.num_inner_step
        steps = self.step.timesteps  # DDIM's integer timesteps, or a flow schedule's 1000 sigma
        conditions = model.encode_prompts(prompts, size, uncond=True)
        cond_k = {key: (c.repeat_interleave(k, 0), u.repeat_interleave(k, 0)) for key, (c, u) in conditions.items()}
        shape = model.latent_shape(size)
        prompts_k = [p for p in prompts for _ in range(k)]
        rows = torch.arange(b, device=device)

        def step(pred, t, x_cur, gen_rows):
            return self.step(pred, t, x_cur, noise=D.randn(gen_rows, shape, device))[0]

        gens_k = [g for g in gens for _ in range(k)]  # candidate j of prompt i draws from prompt i's generator
        x = D.randn(gens, shape, device) * self.step.init_noise_sigma
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
            times.append(steps[i].item())
            i += 1
            for _ in range(m - 1):
                if i >= n:
                    break
                flat = cands.flatten(0, 1)
                pred = guided_prediction(model, unet, flat, steps[i], cond_k, cfg.guidance_scale)
                cands = step(pred, steps[i], flat, gens_k).view(b, k, *shape)
                chain.append(cands)
                times.append(steps[i].item())
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
                rec["t"].append(torch.full((b,), t_, dtype=steps.dtype))
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
    families = FAMILIES  # DDIM on noise-prediction models, the flow SDE on flow models (OnlineStep)
    steps_change_run_state = True  # prepare() pops the rollout queue before the update
    Config = SPOConfig

    KEYS = ("x_t_w", "x_w", "x_t_l", "x_l", "t")

    def setup(self, trainer):
        cfg = self.config
        self.prompts = read_prompts(cfg.prompts)
        self.spm = load_preference_model(cfg.preference_model, cfg.reward, cfg.backbone or None).to(trainer.device).eval().requires_grad_(False)
        self.step = OnlineStep(trainer.model, cfg.num_steps, cfg.eta, trainer.resolution)
        self.resampler = StepwiseResampler(trainer.model, self.step, self.spm, cfg)
        self.scheduler = self.step.scheduler
        self.prompt_cache = PromptCache(trainer.model, trainer.resolution)
        self.queue, self.batch_logs = [], {}  # the current rollout's remaining mini-batches
        self.stats = {"rollouts": 0, "empty_rollouts": 0, "valid": 0}
        self.initial = [p.detach().clone() for p in trainer.model.trainable_parameters()]
        return self.prompts, lambda items: {"prompts": list(items)}

    # -- rollouts -> shuffled mini-batches ------------------------------------------------------------
    def rollout(self, trainer, batch) -> None:
        """Sample the batch's prompts with the resampler; queue its valid transitions, shuffled, in
        mini-batches of ``transitions_per_step`` (one optimiser step each)."""
        cfg = self.config
        prompts = list(batch["prompts"])
        tr = self.resampler(trainer.unet, prompts, trainer.generators(batch["positions"]), trainer.resolution, trainer.device)
        valid = tr["valid"]
        self.stats["rollouts"] += 1
        self.batch_logs = {"valid_pair_fraction": valid.float().mean().item(), "spm_score_mean": tr["scores"].mean().item()}
        idx = valid.nonzero()[:, 0]
        self.stats["valid"] += len(idx)
        if len(idx) == 0:  # nothing to learn from: one zero-weighted transition keeps processes in step
            self.stats["empty_rollouts"] += 1
            trainer._print(f"WARNING: step {trainer.step}: rollout {self.stats['rollouts']} has no valid pair "
                           f"(valid_pair_fraction 0, threshold {cfg.threshold}): nothing to learn. Lower --threshold "
                           "or train the preference model longer (diffplug finetune spo-pm).")
            chunks, weight = [torch.zeros(1, dtype=torch.long)], 0.0
        else:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(batch["positions"][0]))
            idx = idx[torch.randperm(len(idx), generator=g)]
            size = cfg.transitions_per_step or len(idx)
            chunks, weight = list(idx.split(size)), None
        for sel in chunks:
            item = {k: tr[k][sel.to(tr[k].device)].cpu() for k in self.KEYS}
            item["prompts"] = [prompts[i] for i in tr["prompt"][sel].tolist()]
            item["weight"] = torch.tensor(1.0 / len(sel) if weight is None else weight)
            self.queue.append(item)

    def prepare(self, trainer, batch):
        """One optimiser step's micro-batches: the next mini-batch of the current rollout (a new
        rollout, from this step's prompts, when the last one is used up)."""
        if not self.queue:
            self.rollout(trainer, batch)
        item = self.queue.pop(0)
        chunk = self.config.transitions_per_micro_batch or len(item["t"])
        cond = self.prompt_cache(item["prompts"])
        parts = []
        for sel in torch.arange(len(item["t"])).split(chunk):
            part = {k: item[k][sel].to(trainer.device) for k in ("x_t_w", "x_w", "x_t_l", "x_l")}
            part.update(t=item["t"][sel], weight=float(item["weight"]), conditions={k: (c[sel], u[sel]) for k, (c, u) in cond.items()})
            parts.append(part)
        return parts

    # -- exact resume in the middle of a rollout ----------------------------------------------------------
    def save_run_state(self, trainer, folder: Path) -> None:
        self._save_queue(Path(folder) / f"spo_rollout_{trainer.accelerator.process_index}.safetensors")

    def restore_run_state(self, trainer, folder: Path) -> None:
        self._load_queue(Path(folder) / f"spo_rollout_{trainer.accelerator.process_index}.safetensors")

    def _save_queue(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{i}.{k}": v.contiguous() for i, item in enumerate(self.queue) for k, v in item.items() if k != "prompts"}
        meta = {"prompts": json.dumps([item["prompts"] for item in self.queue]), "logs": json.dumps(self.batch_logs),
                "stats": json.dumps(self.stats)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors or {"empty": torch.zeros(0)}, str(path), metadata=meta)

    def _load_queue(self, path: Path) -> None:
        """The unfinished rollout, read whole and checked (``diffplug.checked``: keys, one latent shape,
        finite values, weights >= 0) before the run takes any of it."""
        from ..checked import Spec, UserFileError, read_header, read_safetensors

        what = "SPO's unfinished rollout in a checkpoint (written by diffplug finetune spo)"
        if not path.is_file():
            raise ConfigError(f"resume: {path.parent} has no {path.name} (SPO's unfinished rollout); it was not written by this SPO")
        entries, meta = read_header(path, what=what)
        try:
            prompts, logs, stats = (json.loads(meta[k]) for k in ("prompts", "logs", "stats"))
            if not (isinstance(prompts, list) and all(isinstance(p, list) for p in prompts)):
                raise ValueError("prompts is not a list of prompt lists")
            if not (isinstance(logs, dict) and isinstance(stats, dict)):
                raise ValueError("logs / stats are not JSON objects")
        except (KeyError, ValueError) as e:
            raise UserFileError(path, f"bad metadata ({type(e).__name__}: {e})", what=what) from None
        rank = len(entries.get("0.x_w", (None, (0, 0, 0, 0)))[1])
        latent = Spec(("n0",) + tuple(f"d{j}" for j in range(1, rank)), (torch.float32, torch.float16, torch.bfloat16))
        expect = {"empty": Spec((0,))} if not prompts else {}
        for i, p in enumerate(prompts):
            n = (len(p),)  # one prompt per transition
            expect.update({f"{i}.{k}": Spec(n + latent.shape[1:], latent.dtype) for k in self.KEYS if k != "t"})
            expect[f"{i}.t"] = Spec(n, finite=True)
            expect[f"{i}.weight"] = Spec((), low=0.0)
        tensors = read_safetensors(path, expect, what=what)
        self.queue = [{**{k: tensors[f"{i}.{k}"] for k in self.KEYS + ("weight",)}, "prompts": p} for i, p in enumerate(prompts)]
        self.batch_logs, self.stats = logs, stats

    def save_final(self, trainer, module, folder: Path) -> None:
        """The LoRA / UNet as usual, and a loud warning when the run learned nothing."""
        trainer.model.save_final(module, folder)
        moved = max((float((p.detach() - p0).abs().max()) for p, p0 in zip(trainer.model.trainable_parameters(), self.initial)), default=0.0)
        st = self.stats
        if st["valid"] == 0 or moved == 0.0:
            trainer._print(f"WARNING: this SPO run learned nothing: {st['valid']} valid transitions in {st['rollouts']} "
                           f"rollouts ({st['empty_rollouts']} without any valid pair), weights moved by {moved:.3g}. "
                           "The saved model equals the initial one. Lower --threshold, or retrain the preference "
                           "model (diffplug finetune spo-pm) and check its held-out step-wise accuracy.")
        elif st["empty_rollouts"]:
            trainer._print(f"warning: {st['empty_rollouts']} of {st['rollouts']} rollouts had no valid pair")

    def loss(self, trainer, part):
        cfg, model = self.config, trainer.model
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
        logp = [self.step(preds[j], t, parents[j], prev_sample=part[k])[1] for j, k in enumerate(("x_w", "x_l"))]
        ref_logp = [self.step(ref_preds[j], t, parents[j], prev_sample=part[k])[1] for j, k in enumerate(("x_w", "x_l"))]
        losses, clipped = spo_loss(logp[0], logp[1], ref_logp[0], ref_logp[1], cfg.beta, cfg.eps)
        logs = {"clipped_fraction": clipped.float().mean().detach(),
                "log_ratio_win": (logp[0] - ref_logp[0]).mean().detach(),
                "log_ratio_lose": (logp[1] - ref_logp[1]).mean().detach()}
        return part["weight"] * losses.sum(), logs


__all__ = ["SPOConfig", "SPO", "StepwiseResampler", "compare", "spo_loss"]
