"""benchmarks/finetune_bench.py: a FIND arm's images pair with the base's, seed by seed."""

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

PROMPTS = ["a photo of a shirt", "a photo of a coat"]


def test_find_policy_pairs_with_the_base_on_flux(tmp_path):
    """With a FIND run present every model draws z_T = mean + std * eps from the same eps: a policy file at
    the prior N(0, I) reproduces the base's images exactly; a moved mean changes them. (Flux's own draw is
    in the unpacked layout, so without prior_latents the base would not pair with the policy.)"""
    from finetune_bench import POLICY_FILE, sample

    from diffplug.samplers.noise_policy import NoisePolicy

    torch.set_num_threads(1)
    kw = dict(prompts=PROMPTS, per_prompt=2, seed=3, steps=2, cfg=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty negative prompt of true CFG
        base = sample("tiny:flux", None, prior_latents=True, **kw)
        shape = (len(PROMPTS), 64, 16)  # tiny flux at its default size: 64 packed tokens of 16 channels
        NoisePolicy(torch.zeros(shape), torch.ones(shape), PROMPTS, {}).save(tmp_path / POLICY_FILE)
        prior = sample("tiny:flux", tmp_path, **kw)
        NoisePolicy(torch.full(shape, 0.5), torch.ones(shape), PROMPTS, {}).save(tmp_path / POLICY_FILE)
        moved = sample("tiny:flux", tmp_path, **kw)
    assert base.shape == (4, 3, *base.shape[2:])
    assert torch.equal(prior, base)
    assert (moved - base).abs().amax() > 1e-2
