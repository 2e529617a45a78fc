"""A stochastic sampler on a pipeline without ``prepare_extra_step_kwargs`` (Flux) draws its noise from the
call's generator: the same seed gives the same images whatever torch's global RNG holds."""

import torch

from diffplug.guidance import CFG
from diffplug.pipelines import from_pipe
from diffplug.samplers import FKCSampler
from diffplug.testing import tiny_pipeline


def _images(pipe, global_seed, seed, sampler, count):
    torch.manual_seed(global_seed)
    run = from_pipe(pipe, guidance=CFG(3.0), sampler=sampler)
    return run("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="pt",
               num_images_per_prompt=count, negative_prompt="", max_sequence_length=pipe.tokenizer_2.model_max_length).images


def test_fkc_noise_on_flux_follows_the_call_generator_not_the_global_rng():
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    for sampler, count in ((lambda: FKCSampler(1, correct=False), 1), (lambda: FKCSampler(2, ess_threshold=1.0), 2)):
        a = _images(pipe, 1, 0, sampler(), count)
        b = _images(pipe, 2, 0, sampler(), count)
        c = _images(pipe, 1, 5, sampler(), count)
        assert torch.equal(a, b)  # same call seed, other global RNG: the same images
        assert not torch.allclose(a, c)  # another call seed: other noise, other images
