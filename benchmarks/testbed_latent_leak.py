"""Does the testbed's sample brightness follow the prompt, or the mean that x_T leaks?

    python benchmarks/testbed_latent_leak.py [--weights DIR ...]

For each weights folder (default: the shipped testbed): the VAE's per-channel latent means of held-out
Fashion-MNIST and emoji (in scaled latent units) and what sqrt(abar_T) of them adds to x_T; then the
mean intensity of samples (10 Fashion-MNIST class prompts, 32 held-out emoji prompts; CFG 3, DDIM 30
steps, seed 0) started from plain noise and from noise plus that leak of each domain's mean, next to
the real images' mean intensity. If brightness moves with the added mean and not with the prompt, the
denoiser reads the image's brightness from x_T, which sampling noise does not carry.
"""

from __future__ import annotations

import argparse

import torch

from testbed_quality import heldout_emoji  # this folder's script (run from here)

from diffplug import testbed
from diffplug.evals import brightness
from diffplug.testbed import data as D
from diffplug.testbed.train import to_model_range


@torch.no_grad()
def latent_mean(vae, images: torch.Tensor) -> torch.Tensor:
    return (vae.encode(to_model_range(images)).latent_dist.mean * vae.config.scaling_factor).mean((0, 2, 3))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", nargs="+", default=[str(testbed.WEIGHTS_DIR)])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    emoji_prompts, emoji_images = heldout_emoji(32)
    prompts = {"fashion": [D.prompt_for_class(k) for k in range(10)], "emoji": emoji_prompts}
    real = {"fashion": D.fashion_mnist("test").images[:2000], "emoji": emoji_images}
    print("real mean intensity: " + ", ".join(f"{k} {brightness(v).mean().item():.3f}" for k, v in real.items()))
    print("| weights | latent mean (fashion) | latent mean (emoji) | prompts | x_T = noise | + fashion leak | + emoji leak |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.weights:
        pipe = testbed.load("sd", weights=folder)
        mu = {k: latent_mean(pipe.vae, v[:500]) for k, v in real.items()}
        pipe.scheduler.set_timesteps(30)
        a = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps[0]].sqrt()
        for domain, ps in prompts.items():
            noise = torch.randn(len(ps), 4, 16, 16, generator=torch.Generator().manual_seed(0))
            cells = []
            for shift in (None, "fashion", "emoji"):  # x_T = sqrt(1 - abar) eps + sqrt(abar) mu
                z = noise if shift is None else noise * (1 - a**2).sqrt() + a * mu[shift].view(1, 4, 1, 1)
                images = pipe(ps, num_inference_steps=30, guidance_scale=3.0, latents=z, output_type="pt").images
                cells.append(f"{brightness(images).mean().item():.3f}")
            means = [" ".join(f"{v:.2f}" for v in mu[k].tolist()) for k in ("fashion", "emoji")]
            print(f"| {folder} | {means[0]} | {means[1]} | {domain} | " + " | ".join(cells) + " |", flush=True)
    print(f"sqrt(abar) at the first of 30 DDIM steps: {a.item():.4f}; std of a 16x16 noise's spatial mean: 0.0625")


if __name__ == "__main__":
    main()
