"""A learned initial-noise policy (FIND, ``diffplug finetune find``): per prompt N(mean, std^2) over the
initial latent z_T. Sampling reads it (``diffplug sample --noise-policy``); FIND writes it.

    policy = load_noise_policy("D/final/noise_policy.safetensors")
    latents = policy.sample_initial_noise(prompts, 4, generator=torch.manual_seed(0), pipe=pipe)
    images = pipe(prompts, num_images_per_prompt=4, latents=latents).images

The file is read through ``diffplug.checked``: a NaN mean, an inf or non-positive std, a wrong shape or
dtype is an error naming the file before any latent is drawn.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

FORMAT = "diffplug-find-noise-policy/1"
WHAT = "a FIND noise policy (D/final/noise_policy.safetensors written by diffplug finetune find)"
FIX = "train it again with `diffplug finetune find` (it writes D/final/noise_policy.safetensors), or pass the right file"


class NoisePolicy:
    """A learned FIND policy: per prompt N(mean, std^2) over z_T, plus what it was trained with."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, prompts: list[str], meta: dict):
        self.mean, self.std, self.prompts, self.meta = mean, std, list(prompts), dict(meta)
        self.latent_shape = tuple(mean.shape[1:])

    def save(self, path) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "prompts": json.dumps(self.prompts), "latent_shape": json.dumps(self.latent_shape),
                **{k: json.dumps(v) for k, v in self.meta.items()}}
        save_file({"mean": self.mean.detach().float().cpu().contiguous(), "std": self.std.detach().float().cpu().contiguous()},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "NoisePolicy":
        """Read and check a policy file (``diffplug.checked``): format, prompts, ``mean`` and ``std`` of
        shape (prompts, *latent_shape), float32, finite, ``std > 0``; nothing is returned otherwise."""
        from ..checked import Spec, UserFileError, read_metadata, read_safetensors

        path = Path(path)
        meta = read_metadata(path, what=WHAT, fix=FIX)
        if meta.get("format") != FORMAT:
            raise UserFileError(path, f"not a FIND noise policy (format {meta.get('format')!r}, expected {FORMAT!r})",
                                what=WHAT, fix=FIX)
        try:
            fields = {k: json.loads(v) for k, v in meta.items() if k != "format"}
            prompts, shape = fields.pop("prompts"), tuple(fields.pop("latent_shape"))
            if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
                raise ValueError("prompts is not a list of strings")
            if not all(isinstance(s, int) and s > 0 for s in shape):
                raise ValueError(f"latent_shape {list(shape)} is not a list of sizes")
        except (ValueError, KeyError, TypeError) as e:
            raise UserFileError(path, f"bad metadata ({type(e).__name__}: {e})", what=WHAT, fix=FIX) from None
        rows = (len(prompts), *shape)
        t = read_safetensors(path, {"mean": Spec(rows, torch.float32), "std": Spec(rows, torch.float32, positive=True)},
                             what=WHAT, fix=FIX)
        return cls(t["mean"], t["std"], prompts, fields)

    def index(self, prompts) -> list[int]:
        """Each prompt's row; a prompt the policy was not trained on is an error."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        unknown = [p for p in prompts if p not in self.prompts]
        if unknown:
            raise ValueError(f"prompt {unknown[0]!r}: the noise policy has no distribution for it; it was trained on "
                             f"{self.prompts} (train one with `diffplug finetune find --prompt ...`)")
        return [self.prompts.index(p) for p in prompts]

    def check(self, pipe=None, height=None, width=None, **settings) -> None:
        """Latent shape must match (error); ``settings`` (num_inference_steps, guidance_scale, eta,
        scheduler, guidance) that differ from training are warned about."""
        if pipe is not None:
            from ..pipelines import family_of

            family = family_of(pipe)
            h0, w0 = family.default_size()
            shape = tuple(family.latent_shape(1, height or h0, width or w0)[1:])
            if shape != self.latent_shape:
                raise ValueError(f"latents: the noise policy draws latents of shape {self.latent_shape}, this pipeline "
                                 f"at {height or h0}x{width or w0} needs {shape}; sample at the size and model it was "
                                 f"trained on ({self.meta.get('model')})")
            settings.setdefault("scheduler", type(pipe.scheduler).__name__)
        for key, value in settings.items():
            trained = self.meta.get(key)
            if value is not None and trained is not None and value != trained:
                warnings.warn(f"noise policy: trained with {key}={trained!r}, sampling with {value!r}; its "
                              "distribution was fitted to the training settings", stacklevel=3)

    def sample_initial_noise(self, prompts, num_images_per_prompt: int = 1, generator=None, *, pipe=None, height=None,
                             width=None, **settings) -> torch.Tensor:
        """``latents=`` for ``pipe(prompts, num_images_per_prompt=n, latents=...)``: prompt-major rows
        ``mean + std * eps``. With one ``generator`` eps is the pipeline's own draw, so an untrained
        policy (0, 1) reproduces ``pipe(..., generator=g)``; a list gives one generator per row."""
        rows = [i for i in self.index(prompts) for _ in range(num_images_per_prompt)]
        self.check(pipe, height, width, **settings)
        shape = (len(rows), *self.latent_shape)
        if isinstance(generator, (list, tuple)):
            if len(generator) != len(rows):
                raise ValueError(f"generator: {len(generator)} generators for {len(rows)} latents")
            eps = torch.stack([torch.randn(self.latent_shape, generator=g) for g in generator])
        else:
            eps = torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu")
        z = self.mean[rows].to(eps.device) + self.std[rows].to(eps.device) * eps
        return z.to(pipe.device) if pipe is not None else z


def load_noise_policy(path) -> NoisePolicy:
    return NoisePolicy.load(path)


__all__ = ["NoisePolicy", "load_noise_policy", "FORMAT"]
