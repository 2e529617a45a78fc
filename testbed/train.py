"""Train the testbed models: ``python -m diffplug.testbed.train vae|unet|dit|flux|lcm|classifier|scorer|judge``.

Every run is seeded and stops at ``--steps`` or after ``--minutes`` (whichever comes first); it
writes ``testbed/weights/<name>.safetensors`` (fp16), ``<name>.json`` (config) and
``<name>.record.json`` (device, threads, minutes, steps, final loss, the command). Rerun with
``--steps`` set to the recorded count to repeat a run. Existing weights are kept unless ``--force``.

Order: ``vae`` first (the diffusion models train on its latents), then ``unet``, ``dit`` and ``flux``, then
``lcm`` (the few-step student ``unet_lcm``, distilled from ``unet``);
``classifier``, ``scorer`` and ``judge`` (the independent evaluation classifier, trained on images the
classifier never saw: :func:`judge_split`) train on pixels and need nothing else.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from . import data as D
from . import models as M

EMOJI_REPEAT = 4  # emoji are ~5% of the images; repeat them so the colour set is seen often enough
FASHION_PER_CLASS = 1000  # Fashion-MNIST training images per class used by the diffusion models


# ---------------------------------------------------------------------------------------- utils
def training_set(split: str = "train") -> D.ImageSet:
    """Fashion-MNIST plus the emoji (repeated :data:`EMOJI_REPEAT` times in the training split)."""
    fashion, emo = D.fashion_mnist(split), D.emoji(split)
    return D.ImageSet.concat([fashion] + [emo] * (EMOJI_REPEAT if split == "train" else 1))


class Run:
    """Seeding, the stop rule, loss tracking and the record written next to the weights."""

    def __init__(self, args, name: str):
        self.args, self.name = args, name
        self.folder = Path(args.out)
        exists = (self.folder / f"{name}.safetensors").exists()
        if exists and not (args.force or args.resume):
            raise SystemExit(f"{self.folder / (name + '.safetensors')} exists; pass --force to overwrite it (or --resume)")
        if args.resume and not exists:
            raise SystemExit(f"--resume: {self.folder / (name + '.safetensors')} does not exist")
        self.previous = None
        if args.resume:  # earlier runs this one continues, kept in the record
            record = self.folder / f"{name}.record.json"
            self.previous = json.loads(record.read_text()) if record.is_file() else {}
        torch.manual_seed(args.seed)
        torch.set_num_threads(args.threads)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.start, self.step, self.smoothed, self.log = time.time(), 0, None, []
        self.used_autocast = False

    def minutes(self) -> float:
        return (time.time() - self.start) / 60.0

    def init(self, module: nn.Module) -> nn.Module:
        """The existing weights with --resume, else ``module`` as built."""
        return M.load_weights(module, self.name, self.folder).train() if self.args.resume else module

    def autocast(self):
        self.used_autocast = self.args.bf16
        return torch.autocast(torch.device(self.args.device).type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def running(self) -> bool:
        return self.step < self.args.steps and self.minutes() < self.args.minutes

    def optimize(self, opt, loss: torch.Tensor, clip: nn.Module | None = None, cosine: bool = False) -> None:
        """One optimiser step: warm-up learning rate (times a cosine over the time budget when
        ``cosine``), backward, optional grad-norm clip of ``clip``'s parameters at 1, then ``update``."""
        lr = lr_at(self.step, self.args.lr)
        if cosine:
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, self.minutes() / self.args.minutes)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        self.update(loss.item())

    def update(self, loss: float) -> None:
        self.step += 1
        self.smoothed = loss if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss
        if self.step % 50 == 0 or self.step == 1:
            self.log.append((self.step, round(self.minutes(), 2), round(self.smoothed, 5)))
            print(f"[{self.name}] step {self.step} {self.minutes():.1f} min loss {self.smoothed:.5f}", flush=True)

    def finish(self, module: nn.Module, config: dict, **extra) -> None:
        M.save_weights(module, self.name, config, self.folder)
        record = dict(
            model=self.name,
            device=self.args.device if self.args.device == "cpu" else torch.cuda.get_device_name(),
            cpu=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
            minutes=round(self.minutes(), 2),
            steps=self.step,
            batch_size=self.args.batch_size,
            lr=self.args.lr,
            seed=self.args.seed,
            final_loss=round(self.smoothed, 6) if self.smoothed is not None else None,
            parameters=sum(p.numel() for p in module.parameters()),
            torch=torch.__version__,
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            command="python -m diffplug.testbed.train " + " ".join(sys.argv[1:]),
            loss_curve=self.log,
            **extra,
        )
        if self.previous is not None:
            prev = {k: v for k, v in self.previous.items() if k != "resumed_from"}
            record["resumed_from"] = [prev] + self.previous.get("resumed_from", [])
            record["total_minutes"] = round(record["minutes"] + sum(r.get("minutes", 0) for r in record["resumed_from"]), 2)
            record["total_steps"] = record["steps"] + sum(r.get("steps", 0) for r in record["resumed_from"])
        record["autocast_bf16"] = self.used_autocast
        (self.folder / f"{self.name}.record.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "loss_curve"}), flush=True)


def lr_at(step: int, base: float, warmup: int = 100) -> float:
    return base * min(1.0, (step + 1) / warmup)


class EMA:
    """Exponential moving average of the weights, decay warmed up as min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay, self.n = copy.deepcopy(model).eval().requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (Fashion-MNIST and most emoji are mirror-plausible)."""
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


# ------------------------------------------------------------------------------------------ vae
def train_vae(args) -> None:
    from diffusers import AutoencoderKL

    run = Run(args, "vae")
    images = training_set("train").images
    vae = run.init(AutoencoderKL(**M.VAE_CONFIG))
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    while run.running():
        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=run.generator)
        x = flip(to_model_range(images[idx]), run.generator)
        with run.autocast():
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=run.generator)
            recon = vae.decode(z).sample.float()
        # reconstruction (L1 + L2) plus a small per-element KL keeping latents near N(0, s^2 I)
        kl = posterior.kl().float().mean() / z[0].numel()
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + args.kl_weight * kl
        run.optimize(opt, loss, cosine=True)
    vae.eval()
    with torch.no_grad():  # centre the latents, then scaling_factor = 1 / their std, on held-out images
        test = training_set("test").images
        sel = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(0))[:2000]
        x = to_model_range(test[sel])
        z = torch.cat([vae.encode(x[i : i + 250]).latent_dist.mean for i in range(0, len(x), 250)])
        shift = center_latents(vae, z.mean((0, 2, 3)))
        z = z - shift.view(1, -1, 1, 1)  # what the re-centred encoder now returns
        recon = torch.cat([vae.decode(z[i : i + 250]).sample for i in range(0, len(z), 250)])
        mse = (recon.clamp(-1, 1) - x).pow(2).mean().item() / 4.0  # in [0, 1] units
        scaling = 1.0 / z.std().item()
    config = dict(vae.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["scaling_factor"] = round(scaling, 5)
    run.finish(
        vae,
        config,
        heldout_mse=round(mse, 6),
        heldout_psnr=round(10 * math.log10(1.0 / mse), 2),
        latent_mean=round(z.mean().item(), 4),
        latent_std=round(z.std().item(), 4),
        centered_by=[round(v, 4) for v in shift.tolist()],
        kl_weight=args.kl_weight,
    )


@torch.no_grad()
def center_latents(vae, mean: torch.Tensor) -> torch.Tensor:
    """Fold a per-channel latent mean into the VAE's 1x1 quant convs: the encoder's posterior mean
    becomes ``mean`` lower and the decoder adds it back, so decode(encode(x)) is unchanged while the
    latents are zero-mean. The stock SD pipeline only divides by ``scaling_factor`` (no shift), and
    a large latent mean leaks through the noise schedule's last step (sqrt(abar_T) = 0.068): a
    denoiser trained on it reads the image's mean from x_T, which pure sampling noise lacks, and
    samples come out too bright. Returns the shift folded in."""
    c = vae.config.latent_channels
    vae.quant_conv.bias[:c] -= mean  # moments = [mean, logvar]
    vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mean
    return mean


# ---------------------------------------------------------------------- diffusion training data
def _cache_dir() -> Path:
    folder = D.data_root() / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def caption_table(captions: list[tuple[str, ...]]):
    """Unique captions (first: the empty prompt) and, per image, the indices of its captions."""
    unique = [""] + sorted({c for cs in captions for c in cs})
    where = {c: i for i, c in enumerate(unique)}
    width = max(len(cs) for cs in captions)
    index = torch.tensor([[where[cs[k % len(cs)]] for k in range(width)] for cs in captions])
    return unique, index


def text_embeddings(unique: list[str]):
    """MiniLM token embeddings (N, 32, 384) fp16 and attention masks (N, 32) of ``unique``, cached.

    Computed with the attention mask, as both testbed pipelines do (the SD text encoder's config
    sets ``use_attention_mask``); the text encoder is frozen, so this runs once.
    """
    import hashlib

    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(("\n".join(unique) + f"|{M.TEXT_MAX_LENGTH}").encode()).hexdigest()[:16]
    path = _cache_dir() / f"minilm-{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["embeds"], t["mask"]
    encoder, tokenizer = M.load_text_encoder()
    embeds, mask = M.encode_text(encoder, tokenizer, unique, masked=True)
    save_file({"embeds": embeds.half().contiguous(), "mask": mask.contiguous()}, str(path))
    return embeds.half(), mask


def latents_of(vae, images: torch.Tensor, vae_file: Path):
    """Posterior mean and std of every image (unscaled), cached per VAE weights file."""
    import hashlib

    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(vae_file.read_bytes() + str(images.shape[0]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"latents-{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["mean"], t["std"]
    means, stds = [], []
    device = next(vae.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for i in range(0, images.shape[0], 250):
            dist = vae.encode(to_model_range(images[i : i + 250]).to(device)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(path))
    return mean, std


def diffusion_set(per_class: int = FASHION_PER_CLASS) -> D.ImageSet:
    """The diffusion models' training images: the first ``per_class`` Fashion-MNIST training images
    of each class (file order) and every training emoji, emoji captioned "an emoji of <name>" only
    (the CPU budget of the text-embedding and latent precomputation)."""
    fashion = D.fashion_mnist("train")
    keep = torch.cat([torch.nonzero(fashion.labels == k).flatten()[:per_class] for k in range(len(D.FASHION_CLASSES))])
    emo = D.emoji("train")
    emo = D.ImageSet(emo.images, emo.labels, emo.names, [c[:1] for c in emo.captions])
    return D.ImageSet.concat([fashion.subset(keep.sort().values), emo])


def training_noise(shape, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """N(0, I), plus ``offset`` x N(0, 1) per (sample, channel) when ``offset`` > 0 ("offset noise"):
    x_T then carries a random per-channel mean, so a denoiser cannot read the image's mean from it."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


class DiffusionData:
    """Scaled VAE latents + caption embeddings of :func:`diffusion_set`, ~10% empty prompts,
    emoji drawn :data:`EMOJI_REPEAT` times as often as a Fashion-MNIST image."""

    def __init__(self, folder: Path, generator: torch.Generator, drop: float = 0.1, device: str = "cpu", offset_noise: float = 0.0):
        vae = M.load_model("vae", folder).to(device)
        self.scaling = vae.config.scaling_factor
        data = diffusion_set()
        self.mean, self.std = latents_of(vae, data.images, folder / "vae.safetensors")
        unique, self.index = caption_table(data.captions)
        self.embed_captions(unique)
        self.weights = torch.where(data.labels >= len(D.FASHION_CLASSES), float(EMOJI_REPEAT), 1.0)
        self.generator, self.drop, self.device, self.offset_noise = generator, drop, device, offset_noise
        self.scheduler = __import__("diffusers").DDPMScheduler(**M.SCHEDULE)

    def embed_captions(self, unique: list[str]) -> None:
        """The text conditioning of each distinct caption (the UNet's and DiT's: MiniLM tokens + mask)."""
        self.embeds, self.mask = text_embeddings(unique)

    def clean(self, size: int):
        """Scaled latents x_0 (drawn from the posterior) and caption indices (prompt dropout applied)."""
        g = self.generator
        idx = torch.multinomial(self.weights, size, replacement=True, generator=g)
        z0 = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g)) * self.scaling
        which = torch.randint(0, self.index.shape[1], (size,), generator=g)
        cap = self.index[idx, which]
        cap = torch.where(torch.rand(size, generator=g) < self.drop, torch.zeros_like(cap), cap)  # prompt dropout
        return z0, cap

    def batch(self, size: int):
        g = self.generator
        z0, cap = self.clean(size)
        noise = training_noise(z0.shape, g, self.offset_noise)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (size,), generator=g)
        zt = self.scheduler.add_noise(z0, noise, t)  # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        out = (zt, t, self.embeds[cap].float(), self.mask[cap], noise)
        return tuple(x.to(self.device) for x in out)


def flux_text_embeddings(unique: list[str]):
    """MiniLM (token embeddings (N, L, 384), pooled (N, 384)) of ``unique`` as FluxPipeline computes
    them at L = :data:`models.FLUX_TEXT_LENGTH` (no attention mask), fp16, cached."""
    import hashlib

    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(("\n".join(unique) + f"|flux|{M.FLUX_TEXT_LENGTH}").encode()).hexdigest()[:16]
    path = _cache_dir() / f"minilm-flux-{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["embeds"], t["pooled"]
    encoder, tokenizer = M.load_text_encoder()
    embeds, pooled = M.encode_flux_text(encoder, tokenizer, unique)
    save_file({"embeds": embeds.half().contiguous(), "pooled": pooled.half().contiguous()}, str(path))
    return embeds.half(), pooled.half()


class FlowData(DiffusionData):
    """:class:`DiffusionData`'s latents, captions and prompt dropout, with FluxPipeline's text
    embeddings (sequence + pooled) and the rectified-flow path x_sigma = (1 - sigma) x_0 + sigma eps."""

    def embed_captions(self, unique: list[str]) -> None:
        self.embeds, self.pooled = flux_text_embeddings(unique)

    def batch(self, size: int):
        """(x_sigma, sigma, token embeddings, pooled, velocity target eps - x_0). sigma is logit-normal
        (SD3's pre-training density, m = 0, s = 1: sigma = sigmoid(u), u ~ N(0, 1)), shifted by
        :data:`models.FLOW_SHIFT` as the sampler shifts it."""
        g = self.generator
        z0, cap = self.clean(size)
        eps = torch.randn(z0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(size, generator=g))
        s = M.FLOW_SHIFT
        sigma = s * sigma / (1 + (s - 1) * sigma)
        sb = sigma.view(-1, 1, 1, 1)
        xs = (1 - sb) * z0 + sb * eps  # x_sigma (flow.md section 1)
        out = (xs, sigma, self.embeds[cap].float(), self.pooled[cap].float(), eps - z0)
        return tuple(x.to(self.device) for x in out)


def train_flux(args) -> None:
    """The rectified-flow transformer of ``load("flux")``: v-prediction (v = eps - x_0) on the packed
    latents, called exactly as FluxPipeline calls it (timestep = sigma, no guidance embedding)."""
    from diffusers import FluxPipeline

    run = Run(args, "flux")
    batches = FlowData(Path(args.out), run.generator, device=args.device)
    model = run.init(M.build("flux")).to(args.device).train()
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    c, h, w = batches.mean.shape[1:]
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, args.device, torch.float32)
    txt_ids = torch.zeros(M.FLUX_TEXT_LENGTH, 3, device=args.device)
    extra = dict(ema_decay=args.ema, prompt_dropout=batches.drop, objective="rectified flow, velocity target eps - x0",
                 sigma_sampling="logit-normal (m=0, s=1), as SD3 pre-trains", shift=M.FLOW_SHIFT,
                 text_length=M.FLUX_TEXT_LENGTH, scheduler=M.FLOW_SCHEDULER_CONFIG)
    next_save = args.save_minutes
    while run.running():
        xs, sigma, emb, pooled, target = batches.batch(args.batch_size)
        n = xs.shape[0]
        with run.autocast():
            pred = model(hidden_states=FluxPipeline._pack_latents(xs, n, c, h, w), timestep=sigma,
                         pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids,
                         return_dict=False)[0].float()
        loss = (pred - FluxPipeline._pack_latents(target, n, c, h, w)).pow(2).mean()
        run.optimize(opt, loss, clip=model, cosine=True)
        ema.update(model)
        if run.minutes() >= next_save:  # a usable checkpoint every --save-minutes
            next_save += args.save_minutes
            run.finish(ema.model, _config(model), **extra)
    run.finish(ema.model, _config(model), **extra)


def _train_denoiser(args, name: str, model: nn.Module, forward) -> None:
    run = Run(args, name)
    batches = DiffusionData(Path(args.out), run.generator, device=args.device, offset_noise=args.offset_noise)
    model = run.init(model)
    model = model.to(args.device)
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model.train()
    while run.running():
        zt, t, emb, mask, noise = batches.batch(args.batch_size)
        with run.autocast():
            pred = forward(model, zt, t, emb, mask).float()
        loss = (pred - noise).pow(2).mean()  # epsilon prediction
        run.optimize(opt, loss, clip=model, cosine=True)
        ema.update(model)
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    run.finish(ema.model, config, ema_decay=args.ema, prompt_dropout=batches.drop, schedule=M.SCHEDULE,
               offset_noise=args.offset_noise)


def train_unet(args) -> None:
    unet = M.build("unet")

    def forward(model, zt, t, emb, mask):
        return model(zt, t, encoder_hidden_states=emb).sample

    _train_denoiser(args, "unet", unet, forward)


def train_dit(args) -> None:
    dit = M.build("dit")

    def forward(model, zt, t, emb, mask):
        return model(
            zt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample  # fmt: skip

    _train_denoiser(args, "dit", dit, forward)


# ------------------------------------------------------------------- lcm: the few-step student
LCM_TARGET_EMA = 0.95  # the consistency target network (LCM's mu)
LCM_HUBER_C = 1e-3  # pseudo-Huber constant (diffusers' LCM distillation script)


def guidance_embedding(w: torch.Tensor, dim: int = M.LCM_COND_DIM) -> torch.Tensor:
    """The UNet's ``timestep_cond`` for pipeline guidance scale ``w``, exactly as
    ``StableDiffusionPipeline`` computes it (embedding of ``w - 1``)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)


def consistency_fn(scheduler, model, x, t, emb, w_emb):
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat: what ``LCMScheduler.step`` returns as denoised."""
    eps = model(x, t, encoder_hidden_states=emb, timestep_cond=w_emb).sample
    return boundary(scheduler, x, t, eps)


def boundary(scheduler, x, t, eps):
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t.float())
    return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0


def train_lcm(args) -> None:
    """Latent consistency distillation (Luo et al. 2023, Alg. 1) of the testbed UNet into a few-step
    student with the guidance scale as an input (``time_cond_proj_dim``). Per step: x_0 from the
    data, a grid time t_n (50-step grid, skip k = 20), x_{t_n} by the forward process; the teacher
    takes one CFG-guided DDIM step t_n -> t_{n-k} at a scale w ~ U[w_min, w_max]; the loss is the
    pseudo-Huber distance between the student's f(x_{t_n}) and the EMA target's f(x_{t_{n-k}})."""
    from diffusers import LCMScheduler

    run = Run(args, "unet_lcm")
    batches = DiffusionData(Path(args.out), run.generator, drop=0.0, device=args.device)
    scheduler = LCMScheduler(**M.LCM_CONFIG)
    skip = M.SCHEDULE["num_train_timesteps"] // M.LCM_CONFIG["original_inference_steps"]
    teacher = M.load_model("unet", Path(args.out)).requires_grad_(False).to(args.device)
    student = M.build("unet_lcm")
    if not args.resume:  # start from the teacher; the guidance projection starts at zero
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student = run.init(student).to(args.device).train()
    target, ema = EMA(student, LCM_TARGET_EMA), EMA(student, args.ema)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    uncond = batches.embeds[0].float().to(args.device)
    extra = dict(teacher="unet", w_range=[args.w_min, args.w_max], skip=skip, target_ema=LCM_TARGET_EMA,
                 ema_decay=args.ema, huber_c=LCM_HUBER_C, scheduler=M.LCM_CONFIG)
    next_save = args.save_minutes
    while run.running():
        z0, cap = batches.clean(args.batch_size)
        emb = batches.embeds[cap].float()
        n = args.batch_size
        t = skip * torch.randint(1, M.LCM_CONFIG["original_inference_steps"] + 1, (n,), generator=run.generator) - 1
        s = (t - skip).clamp(min=0)
        w = args.w_min + (args.w_max - args.w_min) * torch.rand(n, generator=run.generator)
        noise = torch.randn(z0.shape, generator=run.generator)
        z0, emb, noise, t, s, w = (v.to(args.device) for v in (z0, emb, noise, t, s, w))
        xt = scheduler.add_noise(z0, noise, t)
        w_emb = guidance_embedding(w).to(args.device)
        with torch.no_grad():
            eps_c, eps_u = teacher(torch.cat([xt, xt]), torch.cat([t, t]),
                                   encoder_hidden_states=torch.cat([emb, uncond.expand_as(emb)])).sample.chunk(2)
            eps = eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u)  # CFG at scale w
            a_t, a_s = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1), scheduler.alphas_cumprod[s].view(-1, 1, 1, 1)
            x0 = (xt - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            xs = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps  # one DDIM step t_n -> t_{n-k}
            goal = consistency_fn(scheduler, target.model, xs, s, emb, w_emb)
        pred = consistency_fn(scheduler, student, xt, t, emb, w_emb)
        loss = ((pred - goal).pow(2) + LCM_HUBER_C**2).sqrt().sub(LCM_HUBER_C).mean()
        run.optimize(opt, loss, clip=student, cosine=True)
        target.update(student)
        ema.update(student)
        if run.minutes() >= next_save:  # a usable checkpoint every --save-minutes
            next_save += args.save_minutes
            run.finish(ema.model, _config(student), **extra)
    run.finish(ema.model, _config(student), **extra)


def _config(model: nn.Module) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------- scorers
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flips and +-2 pixel shifts (reflect-padded), on floats in [0, 1]."""
    x = flip(x, g)
    padded = nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[..., dy : dy + 32, dx : dx + 32]


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, fn) -> torch.Tensor:
    model.eval()
    out = torch.cat([fn(images[i : i + 500].float() / 255.0) for i in range(0, images.shape[0], 500)])
    model.train()
    return out


def train_classifier(args) -> None:
    run = Run(args, "classifier")
    data = training_set("train")
    model = M.Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    while run.running():
        idx = torch.randint(0, len(data), (args.batch_size,), generator=run.generator)
        x = _augment(data.images[idx].float() / 255.0, run.generator)
        loss = nn.functional.cross_entropy(model(x), data.labels[idx], label_smoothing=0.05)
        run.optimize(opt, loss, cosine=True)
    model.eval()
    acc = {}
    for split_name, held in (("fashion_mnist_test", D.fashion_mnist("test")), ("emoji_test", D.emoji("test"))):
        pred = _predict(model, held.images, model).argmax(-1)
        acc[split_name] = round((pred == held.labels).float().mean().item(), 4)
        if split_name == "emoji_test":
            coarse = pred >= len(D.FASHION_CLASSES)
            acc["emoji_test_is_emoji"] = round(coarse.float().mean().item(), 4)
    config = {"width": 32, "num_classes": len(D.CLASSES), "size": 32, "_classes": list(D.CLASSES)}
    run.finish(model, config, heldout_accuracy=acc)


def train_scorer(args) -> None:
    run = Run(args, "scorer")
    fashion, emo = D.fashion_mnist("train"), D.emoji("train")
    emo = D.ImageSet(emo.images, emo.labels, emo.names, [c[:1] for c in emo.captions])
    data = D.ImageSet.concat([fashion] + [emo] * EMOJI_REPEAT)  # captions as in diffusion_set
    unique, index = caption_table(data.captions)
    tokens, mask = text_embeddings(unique)
    m = mask.unsqueeze(-1).float()  # mean pooling over real tokens, as sentence-transformers
    text = nn.functional.normalize((tokens.float() * m).sum(1) / m.sum(1), dim=-1)
    model = M.ImageTower()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    while run.running():
        idx = torch.randint(0, len(data), (args.batch_size,), generator=run.generator)
        cap = index[idx, torch.randint(0, index.shape[1], (args.batch_size,), generator=run.generator)]
        img = model(_augment(data.images[idx].float() / 255.0, run.generator))
        logits = model.logit_scale.exp().clamp(max=100) * img @ text[cap].T
        # InfoNCE both ways; images sharing a caption (many "a photo of a sneaker") are all positives
        same = (cap[:, None] == cap[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
        )
        run.optimize(opt, loss, cosine=True)
    model.eval()
    acc = heldout_retrieval(model, text_of=lambda caps: _pooled(caps, unique, text))
    config = {"width": 32, "dim": 384, "size": 32, "logit_scale": round(model.logit_scale.exp().item(), 4)}
    run.finish(model, config, heldout_retrieval=acc)


def _pooled(captions: list[str], unique: list[str], table: torch.Tensor) -> torch.Tensor:
    where = {c: i for i, c in enumerate(unique)}
    missing = [c for c in captions if c not in where]
    if missing:
        encoder, tokenizer = M.load_text_encoder()
        tower = M.TextTower(encoder, tokenizer)
        extra = tower(missing)
        return torch.stack([table[where[c]] if c in where else extra[missing.index(c)] for c in captions])
    return table[[where[c] for c in captions]]


@torch.no_grad()
def heldout_retrieval(image_tower: nn.Module, text_of) -> dict:
    """Top-1 image->text accuracy: Fashion-MNIST test among the 10 class prompts; held-out emoji
    among all held-out emoji names (top-1 and top-5)."""
    fashion = D.fashion_mnist("test")
    prompts = [D.prompt_for_class(c) for c in D.FASHION_CLASSES]
    sims = _predict(image_tower, fashion.images, image_tower) @ text_of(prompts).T
    out = {"fashion_mnist_test_top1_of_10": round((sims.argmax(-1) == fashion.labels).float().mean().item(), 4)}
    emo = D.emoji("test")
    names = [c[0] for c in emo.captions]
    sims = _predict(image_tower, emo.images, image_tower) @ text_of(names).T
    rank = (sims > sims.diagonal()[:, None]).sum(-1)
    out[f"emoji_test_top1_of_{len(names)}"] = round((rank == 0).float().mean().item(), 4)
    out[f"emoji_test_top5_of_{len(names)}"] = round((rank < 5).float().mean().item(), 4)
    return out


# ------------------------------------------------------------------------------------- the CLI
STAGES = {"vae": train_vae, "unet": train_unet, "dit": train_dit, "flux": train_flux, "lcm": train_lcm, "classifier": train_classifier,
          "scorer": train_scorer}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffplug.testbed.train", description=__doc__.split("\n")[0])
    p.add_argument("model", choices=list(STAGES))
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget (default 10)")
    p.add_argument("--steps", type=int, default=10**9, help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=M.default_threads())
    p.add_argument("--kl-weight", type=float, default=1e-4, help="vae: weight of the per-element KL")
    p.add_argument("--ema", type=float, default=0.999, help="unet/dit/flux: EMA decay of the saved weights")
    p.add_argument("--offset-noise", type=float, default=0.0,
                   help="unet/dit: std of a per-channel constant added to the training noise (0: off)")
    p.add_argument("--w-min", type=float, default=2.0, help="lcm: smallest guidance scale distilled")
    p.add_argument("--w-max", type=float, default=8.0, help="lcm: largest guidance scale distilled")
    p.add_argument("--save-minutes", type=float, default=5.0, help="lcm/flux: write the weights every this many minutes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(M.WEIGHTS_DIR), help="weights folder (default: the package's)")
    p.add_argument("--force", action="store_true", help="overwrite existing weights")
    p.add_argument("--resume", action="store_true", help="start from the existing weights and extend their record")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 for these small models on CPU)")
    return p


DEFAULTS = {  # (batch size, learning rate)
    "vae": (64, 1e-3),
    "unet": (64, 1e-3),
    "dit": (64, 5e-4),
    "flux": (64, 5e-4),
    "lcm": (32, 2e-4),
    "classifier": (128, 2e-3),
    "scorer": (256, 2e-3),
}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    bs, lr = DEFAULTS[args.model]
    args.batch_size = args.batch_size or bs
    args.lr = args.lr or lr
    STAGES[args.model](args)


# ------------------------------------------------------------------------------------- the judge
JUDGE_FASHION_TRAIN = 5000  # the judge trains on Fashion-MNIST test[:5000] and is scored on test[5000:]


def judge_split() -> tuple[D.ImageSet, dict[str, D.ImageSet]]:
    """The judge's data, disjoint from the classifier's: the classifier trained on all of Fashion-MNIST
    train and on emoji("train"); the judge trains on Fashion-MNIST test[:5000] and emoji("test") (the
    held-out emoji names, repeated, less the 4 whose picture is also in emoji("train")), and is scored on Fashion-MNIST test[5000:] and emoji("train"),
    images it never saw (the diffusion models trained on Fashion-MNIST train and emoji train)."""
    fashion, emo, emo_train = D.fashion_mnist("test"), D.emoji("test"), D.emoji("train")
    seen = {bytes(x.numpy().tobytes()) for x in emo_train.images}  # 4 held-out emoji repeat a training picture
    emo = emo.subset([i for i, x in enumerate(emo.images) if bytes(x.numpy().tobytes()) not in seen])
    n = JUDGE_FASHION_TRAIN
    train = D.ImageSet.concat([fashion.subset(range(n))] + [emo] * EMOJI_REPEAT)
    held = {"fashion_mnist_test_5000_10000": fashion.subset(range(n, len(fashion))), "emoji_train": emo_train}
    return train, held


def train_judge(args) -> None:
    run = Run(args, "judge")
    data, held = judge_split()
    config = {"dim": 96, "depth": 3, "heads": 4, "patch": 4, "num_classes": len(D.CLASSES), "size": 32}
    model = run.init(M.Judge(**config))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    while run.running():
        idx = torch.randint(0, len(data), (args.batch_size,), generator=run.generator)
        x = _augment(data.images[idx].float() / 255.0, run.generator)
        loss = nn.functional.cross_entropy(model(x), data.labels[idx], label_smoothing=0.05)
        run.optimize(opt, loss, clip=model, cosine=True)
    model.eval()
    acc = {}
    for split_name, images in held.items():
        pred = _predict(model, images.images, model).argmax(-1)
        acc[split_name] = round((pred == images.labels).float().mean().item(), 4)
    run.finish(model, dict(config, _classes=list(D.CLASSES)), heldout_accuracy=acc,
               trained_on=f"fashion_mnist test[:{JUDGE_FASHION_TRAIN}] + emoji test (less pictures also in emoji train) "
                         f"x{EMOJI_REPEAT}")


STAGES["judge"] = train_judge
DEFAULTS["judge"] = (128, 1e-3)


if __name__ == "__main__":
    main()
