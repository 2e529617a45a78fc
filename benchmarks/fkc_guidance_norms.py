"""Size and spread of the guidance difference ||eps_c - eps_u||^2 that drives FKC-CFG's weights, on the
testbed UNet and DiT (why FKC behaves differently on the two; see fkc_results.md).

    python benchmarks/fkc_guidance_norms.py

64 seeded noises for "a photo of a sneaker", scaled to the noise level of steps 0, 5, 10, 15 of the
20-step DDIM schedule (noise only: a probe of the networks' guidance field, not a sampling trajectory).
Prints mean and std over the 64 of ||eps_c - eps_u||^2 summed over the 16x16x4 latent.
"""

import torch

from diffplug import testbed
from diffplug.pipelines import family_of
from diffplug.samplers import encode_condition


def main() -> None:
    torch.set_num_threads(1)
    for name in ("sd", "dit"):
        pipe = testbed.load(name)
        family = family_of(pipe)
        pipe.scheduler.set_timesteps(20)
        cond = encode_condition(pipe, ["a photo of a sneaker"], num_images_per_prompt=64)
        uncond = encode_condition(pipe, [""], num_images_per_prompt=64)
        noise = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        rows = []
        with torch.no_grad():
            for i in (0, 5, 10, 15):
                t = pipe.scheduler.timesteps[i]
                x = noise * (1 - pipe.scheduler.alphas_cumprod[t]).sqrt()
                d = (family.model(x, t, **cond) - family.model(x, t, **uncond)).pow(2).sum((1, 2, 3))
                rows.append(f"t={int(t)}: {d.mean():.1f} +- {d.std():.1f}")
        print(f"{name}: " + ", ".join(rows))


if __name__ == "__main__":
    main()
