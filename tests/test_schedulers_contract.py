"""Every diffplug scheduler: diffusers' contract (input checks, save/load in a pipeline) and the fast UniPC."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffplug.samplers import (
    DCDPMSolverScheduler,
    DCSolverScheduler,
    FastUniPCScheduler,
)
from diffplug.samplers.unipc import FLOW_SHIFT_KEYS
from diffplug.testing import tiny_pipeline
from diffusers import DDIMScheduler, DiffusionPipeline, UniPCMultistepScheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULERS = [FastUniPCScheduler, DCSolverScheduler, DCDPMSolverScheduler]
CLOSE = dict(rtol=1e-5, atol=1e-5)  # float32 rounding order only


def _model(scheduler):
    """A smooth, nonlinear stand-in for a network: output depends on x and t."""
    w = torch.linspace(-1, 1, 64).reshape(4, 4, 4)

    def model_fn(x, t):
        s = float(t) / 1000
        return torch.tanh(x * (0.5 + s)) + w * (1 - s) + 0.1 * torch.sin(3 * x)

    return model_fn


def _trajectory(scheduler, steps, noise, **kwargs):
    scheduler.set_timesteps(steps, **kwargs)
    model_fn, x, out = _model(scheduler), noise.clone(), []
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t), t, x).prev_sample
        out.append(x)
    return out


NOISE = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
CONFIGS = [
    dict(SD),
    dict(SD, prediction_type="v_prediction"),
    dict(SD, prediction_type="sample"),
    dict(SD, solver_order=1),
    dict(SD, solver_order=3),
    dict(SD, solver_type="bh1", final_sigmas_type="sigma_min"),  # bh1 to sigma 0 is NaN in diffusers too
    dict(SD, disable_corrector=[0, 2]),
    dict(SD, lower_order_final=False, final_sigmas_type="sigma_min"),  # order 2 to sigma 0: NaN in diffusers
    dict(SD, predict_x0=False, final_sigmas_type="sigma_min"),  # noise prediction to sigma 0: NaN in diffusers too
    dict(SD, final_sigmas_type="sigma_min"),
    dict(SD, use_karras_sigmas=True),
    dict(SD, timestep_spacing="leading", steps_offset=1),
    dict(SD, timestep_spacing="trailing"),
    dict(SD, thresholding=True, sample_max_value=1.5),
    dict(beta_schedule="linear", prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k not in SD) or "sd")
@pytest.mark.parametrize("steps", [1, 2, 4, 7, 15])
def test_fast_unipc_equals_diffusers_unipc(config, steps):
    reference, fast = UniPCMultistepScheduler(**config), FastUniPCScheduler(**config)
    for a, b in zip(_trajectory(reference, steps, NOISE), _trajectory(fast, steps, NOISE)):
        torch.testing.assert_close(b, a, **CLOSE)
    # the same config, plus the dynamic-shift keys kept for Flux-style pipelines (unipc.FLOW_SHIFT_KEYS)
    kept = {k: v for k, v in fast.config.items() if k not in FLOW_SHIFT_KEYS}
    assert kept | {"_class_name": None} == dict(reference.config) | {"_class_name": None}


def test_fast_unipc_equality_test_can_fail():
    """A 1e-4 change of one output at one step is seen by the tolerance above."""
    reference, fast = UniPCMultistepScheduler(**SD), FastUniPCScheduler(**SD)
    for s in (reference, fast):
        s.set_timesteps(6)
    model_fn, x_a, x_b = _model(fast), NOISE.clone(), NOISE.clone()
    for i, t in enumerate(fast.timesteps):
        x_a = reference.step(model_fn(x_a, t), t, x_a).prev_sample
        x_b = fast.step(model_fn(x_b, t) + (1e-4 if i == 3 else 0.0), t, x_b).prev_sample
    assert not torch.allclose(x_a, x_b, **CLOSE)


def test_fast_unipc_is_dc_solver_without_compensation():
    fast, dc = FastUniPCScheduler(**SD), DCSolverScheduler(**SD, dc_ratios=None)
    for a, b in zip(_trajectory(fast, 8, NOISE), _trajectory(dc, 8, NOISE)):
        assert torch.equal(a, b)
    assert isinstance(dc, FastUniPCScheduler)  # one implementation: DC-Solver = fast UniPC + compensation


def test_fast_unipc_from_config_and_cli_name():
    from diffplug.pipelines.registry import make_scheduler

    pipe = tiny_pipeline("sd")
    sched = make_scheduler("unipc-fast", pipe)
    assert type(sched) is FastUniPCScheduler and sched.config.beta_end == pipe.scheduler.config.beta_end
    assert type(DDIMScheduler.from_config(sched.config)) is DDIMScheduler
    with pytest.raises(ValueError, match="solver_p"):
        FastUniPCScheduler(solver_p=DDIMScheduler())


# ---- input checks (issue 19, item 8) -----------------------------------------------------------


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", None, 1001])
def test_set_timesteps_rejects_bad_step_counts(cls, bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls(**SD).set_timesteps(bad)


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize("spacing, steps", [("linspace", 1000), ("leading", 999)])
def test_step_counts_that_repeat_a_noise_level_are_refused(cls, spacing, steps):
    """1000 'linspace' steps round two timesteps to one, 999 'leading' steps (offset 1) reach timestep
    1000: a zero-length step, NaN in diffusers' solvers; ours say so at set_timesteps."""
    sched = cls(**SD, timestep_spacing=spacing, steps_offset=1)
    with pytest.raises(ValueError, match="zero length.*use fewer steps"):
        sched.set_timesteps(steps)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_unknown_prediction_type_fails_at_construction(cls):
    with pytest.raises(ValueError, match="prediction_type"):
        cls(**SD, prediction_type="bogus")
    sched = cls(**SD)
    sched.set_timesteps(np.int64(3))  # numpy integers are whole numbers too
    assert len(sched.timesteps) == 3


# ---- save_pretrained / DiffusionPipeline.from_pretrained round trip (issue 19, item 9) -----------


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_pipeline_round_trip(cls, tmp_path):
    pipe = tiny_pipeline("sd")
    options = {"dc_ratios": [1.0, 1.0, 0.9, 1.1]} if cls is not FastUniPCScheduler else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    pipe.save_pretrained(tmp_path)
    library, name = json.loads((tmp_path / "model_index.json").read_text())["scheduler"]
    assert name == cls.__name__ and library.startswith("diffplug.samplers")
    loaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded.scheduler) is cls
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = pipe("a cat", num_inference_steps=4, latents=latents, output_type="latent").images
    b = loaded("a cat", num_inference_steps=4, latents=latents, output_type="latent").images
    torch.testing.assert_close(b, a)
