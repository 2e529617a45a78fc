"""DC-Solver: equivalence with UniPC / DPM-Solver++, compensation semantics, CPR, config contract, search."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from diffplug.predictions import join, noise_levels, split
from diffplug.samplers import DCDPMSolverScheduler, DCSolverScheduler
from diffplug.samplers.dc_solver import (
    compensation_weights,
    cpr_ratios,
    fit_cpr,
    reference_trajectory,
    sd21_cpr_coefficients,
    search_ratios,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PTYPE = {"epsilon": "epsilon", "v_prediction": "v_prediction", "flow_prediction": "flow"}

# Gaussian data x0 ~ N(mu, s^2) per dimension: the denoiser is closed-form, and so is the PF-ODE
# solution (the standardised value (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) is conserved).
_g = torch.Generator().manual_seed(0)
MU = torch.randn(16, generator=_g)
S = 0.05 + 0.5 * torch.rand(16, generator=_g)
MU_U, S_U = 0.3 * torch.randn(16, generator=_g), torch.ones(16)


def _eps(x, a, s, mu, std):
    return s * (x - a * mu) / (a**2 * std**2 + s**2)


def gaussian_model(scheduler, guidance: float = 1.0):
    """``model_fn(x, t)`` of the scheduler's prediction type; ``guidance`` != 1 mixes in CFG with a broad Gaussian."""
    ptype = PTYPE[scheduler.config.prediction_type]

    def model_fn(x, t):
        a, s = noise_levels(scheduler, torch.as_tensor(t).reshape(1))
        eps = _eps(x, a, s, MU, S)
        if guidance != 1.0:
            uncond = _eps(x, a, s, MU_U, S_U)
            eps = uncond + guidance * (eps - uncond)
        return join((x - s * eps) / a, eps, a, s, ptype)

    return model_fn


def exact_solution(scheduler, noise):
    a, s = noise_levels(scheduler, scheduler.timesteps[:1])
    return MU + S * (noise - a * MU) / torch.sqrt(a**2 * S**2 + s**2)


def run(scheduler, model_fn, noise, steps=None):
    """Sample the whole trajectory; returns every step's prev_sample."""
    if steps is not None:
        scheduler.set_timesteps(steps)
    x, outs = noise.clone(), []
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t), t, x).prev_sample
        outs.append(x)
    return outs


NOISE = torch.randn(8, 16, generator=_g)
CLOSE = dict(rtol=1e-5, atol=1e-5)  # the two differ only in float32 rounding order

UNIPC_CONFIGS = [
    dict(SD),
    dict(SD, prediction_type="v_prediction"),
    dict(SD, solver_order=3),
    dict(SD, disable_corrector=[0]),
    dict(SD, use_karras_sigmas=True),
    dict(SD, predict_x0=False, final_sigmas_type="sigma_min"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
]


@pytest.mark.parametrize("config", UNIPC_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k not in SD))
@pytest.mark.parametrize("ratios", ["null", "ones"])
def test_unit_ratios_reproduce_unipc(config, ratios):
    steps = 6
    unipc = UniPCMultistepScheduler(**config)
    dc = DCSolverScheduler(**config, dc_ratios=None if ratios == "null" else [1.0] * steps)
    unipc.set_timesteps(steps)
    dc.set_timesteps(steps)
    model_fn = gaussian_model(unipc)
    # step by step from the same inputs, then whole trajectories
    x = NOISE.clone()
    for t in unipc.timesteps:
        out = model_fn(x, t)
        a, b = unipc.step(out, t, x).prev_sample, dc.step(out, t, x).prev_sample
        torch.testing.assert_close(b, a, **CLOSE)
        x = a
    for a, b in zip(run(unipc, model_fn, NOISE, steps), run(dc, model_fn, NOISE, steps)):
        torch.testing.assert_close(b, a, **CLOSE)


def test_equivalence_tolerance_detects_a_small_compensation():
    """The tolerance above is tight enough to see a 1 % change of one ratio."""
    unipc, dc = UniPCMultistepScheduler(**SD), DCSolverScheduler(**SD, dc_ratios=[1, 1, 1.01, 1, 1, 1])
    model_fn = gaussian_model(unipc)
    a, b = run(unipc, model_fn, NOISE, 6)[-1], run(dc, model_fn, NOISE, 6)[-1]
    assert not torch.allclose(a, b, **CLOSE)


class ReferenceDC(UniPCMultistepScheduler):
    """The spec's DC written the slow, obvious way on top of diffusers' own UniPC functions."""

    def __init__(self, ratios, **config):
        super().__init__(**config)
        self.ratios = ratios

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.model_outputs, self.timestep_list = [None] * 3, [None] * 3

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        m = self.convert_model_output(model_output, sample=sample)
        if i > 0 and i - 1 not in self.disable_corrector and self.last_sample is not None:
            sample = self.multistep_uni_c_bh_update(
                this_model_output=m, last_sample=self.last_sample, this_sample=sample, order=self.this_order
            )
        self.model_outputs = self.model_outputs[1:] + [m]
        self.timestep_list = self.timestep_list[1:] + [float(timestep)]
        order = min(self.config.solver_order, len(self.timesteps) - i) if self.config.lower_order_final else 2
        self.this_order = min(order, self.lower_order_nums + 1)
        if i >= 2 and self.ratios[i] != 1:
            t0, t1, t2 = self.timestep_list[::-1]
            tau = t1 + self.ratios[i] * (t0 - t1)
            m0, m1, m2 = self.model_outputs[::-1]
            self.model_outputs[-1] = (
                m0 * (tau - t1) * (tau - t2) / ((t0 - t1) * (t0 - t2))
                + m1 * (tau - t0) * (tau - t2) / ((t1 - t0) * (t1 - t2))
                + m2 * (tau - t0) * (tau - t1) / ((t2 - t0) * (t2 - t1))
            )
        self.last_sample = sample
        prev = self.multistep_uni_p_bh_update(model_output, sample=sample, order=self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        return (prev,)


@pytest.mark.parametrize("config", [dict(SD), dict(SD, prediction_type="v_prediction", disable_corrector=[0])])
def test_compensation_matches_the_spec(config):
    ratios = [1.0, 1.0, 0.8, 1.2, 0.9, 1.1, 1.05]
    ref, dc = ReferenceDC(ratios, **config), DCSolverScheduler(**config, dc_ratios=ratios)
    ref.set_timesteps(7)
    dc.set_timesteps(7)
    model_fn = gaussian_model(dc, guidance=3.0)
    x = NOISE.clone()
    for t in dc.timesteps:
        out = model_fn(x, t)
        a, b = ref.step(out, t, x)[0], dc.step(out, t, x).prev_sample
        torch.testing.assert_close(b, a, **CLOSE)
        # the compensated output is what the buffer holds for the next corrector / compensations
        torch.testing.assert_close(dc.model_outputs[-1], ref.model_outputs[-1], **CLOSE)
        x = a
    plain = run(UniPCMultistepScheduler(**config), model_fn, NOISE, 7)[-1]
    assert (plain - x).abs().max() > 1e-3  # compensation did change the trajectory


@pytest.mark.parametrize("ratio", [1.0, 0.0, 0.37, 1.6, -0.5])
def test_lagrange_compensation_exact_on_quadratics(ratio):
    a, b, c = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    times = [401.0, 601.0, 801.0]  # t_i, t_{i-1}, t_{i-2}
    m = [a + b * t + c * t * t for t in times]
    w = compensation_weights(times, ratio)
    tau = times[1] + ratio * (times[0] - times[1])
    torch.testing.assert_close(sum(wk * mk for wk, mk in zip(w, m)), a + b * tau + c * tau * tau)
    # K = 3 reproduces cubics; a linear-only interpolant would not reproduce the quadratic
    d = torch.randn(4, 5, dtype=torch.float64)
    times4 = [*times, 999.0]
    m4 = [a + b * t + c * t * t + d * t**3 for t in times4]
    w4 = compensation_weights(times4, ratio)
    torch.testing.assert_close(sum(wk * mk for wk, mk in zip(w4, m4)), a + b * tau + c * tau**2 + d * tau**3)
    if ratio not in (0.0, 1.0):
        w2 = compensation_weights(times[:2], ratio)
        assert not torch.allclose(w2[0] * m[0] + w2[1] * m[1], a + b * tau + c * tau * tau)


def test_compensation_weights_differentiable():
    rho = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    w = compensation_weights([400.0, 600.0, 800.0], rho)
    sum(wk * v for wk, v in zip(w, (1.0, 3.0, 7.0))).backward()  # quadratic through (400,1),(600,3),(800,7)
    # p(t) = 1 + (t-400)/100 + (t-400)(t-600)/40000 ; dp/drho = p'(tau) * (400 - 600)
    tau = 600 + 0.7 * (400 - 600)
    expected = (1 / 100 + (2 * tau - 1000) / 40000) * (400 - 600)
    assert rho.grad.item() == pytest.approx(expected, rel=1e-10)


# ---- CPR ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, nfe, expected",
    [
        (7.5, 5, [1, 1, 1.0271, 0.7392, 1.2263]),
        (6, 6, [1, 1, 1.1056, 0.9250, 0.6616, 1.3009]),
        (4, 8, [1, 1, 0.7964, 1.0991, 1.0634, 0.9278, 0.9308, 1.3110]),
    ],
)
def test_cpr_reproduces_published_sd21_vectors(cfg, nfe, expected):
    assert len(sd21_cpr_coefficients()) == 36
    np.testing.assert_allclose(cpr_ratios(cfg, nfe), expected, atol=5e-5)
    sched = DCSolverScheduler(**SD, dc_ratios="cpr", cpr_guidance_scale=cfg, cpr_coefficients="sd2.1")
    sched.set_timesteps(nfe)
    np.testing.assert_allclose(sched.compensation_ratios, expected, atol=5e-5)
    numbers = DCSolverScheduler(**SD, cpr_guidance_scale=cfg, cpr_coefficients=sd21_cpr_coefficients())
    numbers.set_timesteps(nfe)
    assert numbers.compensation_ratios == sched.compensation_ratios
    with pytest.raises(ValueError, match="sd2.1"):
        DCSolverScheduler(**SD, dc_ratios="cpr", cpr_guidance_scale=cfg, cpr_coefficients="sdxl")


def test_cpr_fit_recovers_the_predictions():
    P = sd21_cpr_coefficients()
    grid = [(g, n, cpr_ratios(g, n, P)) for g in (1.5, 3.0, 5.0, 7.5, 10.0) for n in (5, 6, 8, 10, 12, 15)]
    fitted = fit_cpr(grid)
    for g, n in [(4.0, 7), (9.0, 9), (2.0, 5)]:  # unseen configurations
        np.testing.assert_allclose(cpr_ratios(g, n, fitted), cpr_ratios(g, n, P), atol=1e-6)
    with pytest.raises(ValueError, match="entries"):
        fit_cpr([(7.5, 5, [1.0, 1.0])])


# ---- config contract -------------------------------------------------------------------------


def test_save_pretrained_round_trips_ratios(tmp_path):
    ratios = [1.0, 1.0, 0.93, 1.12, 0.81]
    sched = DCSolverScheduler(**SD, prediction_type="v_prediction", dc_ratios=ratios)
    sched.save_pretrained(tmp_path / "searched")
    saved = json.loads((tmp_path / "searched" / "scheduler_config.json").read_text())
    assert saved["dc_ratios"] == ratios and saved["_class_name"] == "DCSolverScheduler"
    loaded = DCSolverScheduler.from_pretrained(tmp_path / "searched")
    assert loaded.config.dc_ratios == ratios and loaded.config.prediction_type == "v_prediction"
    loaded.set_timesteps(5)
    assert loaded.compensation_ratios == ratios
    cpr = DCSolverScheduler(**SD, dc_ratios="cpr", cpr_guidance_scale=7.5, cpr_coefficients="sd2.1")
    cpr.save_pretrained(tmp_path / "cpr")
    again = DCSolverScheduler.from_pretrained(tmp_path / "cpr")
    again.set_timesteps(5)
    np.testing.assert_allclose(again.compensation_ratios, [1, 1, 1.0271, 0.7392, 1.2263], atol=5e-5)
    dpm = DCDPMSolverScheduler(**SD, dc_ratios=ratios)
    dpm.save_pretrained(tmp_path / "dpm")
    assert DCDPMSolverScheduler.from_pretrained(tmp_path / "dpm").config.dc_ratios == ratios


@pytest.mark.parametrize(
    "cls", [DDIMScheduler, DDPMScheduler, PNDMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler]
)
def test_from_config_swaps_both_ways(cls):
    original = cls(**SD, prediction_type="v_prediction", num_train_timesteps=1000)
    dc = DCSolverScheduler.from_config(original.config, dc_ratios=[1.0, 1.0, 0.9, 1.1])
    assert dc.config.prediction_type == "v_prediction" and dc.config.beta_schedule == "scaled_linear"
    assert dc.config.beta_end == 0.012 and dc.config.dc_ratios == [1.0, 1.0, 0.9, 1.1]
    torch.testing.assert_close(dc.alphas_cumprod, original.alphas_cumprod)
    back = cls.from_config(dc.config)
    assert type(back) is cls and back.config.prediction_type == "v_prediction"
    torch.testing.assert_close(back.alphas_cumprod, original.alphas_cumprod)
    dc.set_timesteps(4)
    assert len(dc.timesteps) == 4
    assert type(DCDPMSolverScheduler.from_config(original.config)) is DCDPMSolverScheduler


def test_from_flow_match_config():
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    dc = DCSolverScheduler.from_config(flow.config)
    assert dc.config.use_flow_sigmas and dc.config.prediction_type == "flow_prediction"
    assert dc.config.flow_shift == 3.0
    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    model_fn = gaussian_model(unipc)
    for a, b in zip(run(unipc, model_fn, NOISE, 5), run(dc, model_fn, NOISE, 5)):
        torch.testing.assert_close(b, a, **CLOSE)
    back = FlowMatchEulerDiscreteScheduler.from_config(dc.config, shift=dc.config.flow_shift)
    assert type(back) is FlowMatchEulerDiscreteScheduler and back.config.shift == 3.0


def test_set_timesteps_contract():
    params = inspect.signature(DCSolverScheduler.set_timesteps).parameters
    assert list(params)[1:] == ["num_inference_steps", "device", "timesteps", "sigmas", "mu"]
    default = DCSolverScheduler(**SD)
    default.set_timesteps(5)
    custom = DCSolverScheduler(**SD)
    custom.set_timesteps(timesteps=default.timesteps.tolist())
    torch.testing.assert_close(custom.timesteps, default.timesteps)
    torch.testing.assert_close(custom.sigmas, default.sigmas)
    custom.set_timesteps(timesteps=[999, 750, 500, 250, 100, 20])
    assert custom.timesteps.tolist() == [999, 750, 500, 250, 100, 20] and custom.sigmas[-1] == 0
    x = run(custom, gaussian_model(custom), NOISE)[-1]
    assert torch.isfinite(x).all()
    # flow: explicit sigmas, and mu with dynamic shifting, as UniPC
    flow_cfg = dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    unipc, dc = UniPCMultistepScheduler(**flow_cfg), DCSolverScheduler(**flow_cfg)
    for s in (unipc, dc):
        s.set_timesteps(sigmas=np.linspace(1.0, 0.1, 6), mu=0.8)
    torch.testing.assert_close(dc.sigmas, unipc.sigmas)
    torch.testing.assert_close(dc.timesteps, unipc.timesteps)
    with pytest.raises(ValueError, match="mu"):
        DCSolverScheduler(**flow_cfg).set_timesteps(5)
    with pytest.raises(ValueError, match="decreasing"):
        DCSolverScheduler(**SD).set_timesteps(timesteps=[100, 500])


def test_bad_configuration_is_explained():
    with pytest.raises(ValueError, match="search ratios for num_inference_steps=6"):
        DCSolverScheduler(**SD, dc_ratios=[1.0] * 5).set_timesteps(6)
    with pytest.raises(ValueError, match="cpr_guidance_scale"):
        DCSolverScheduler(**SD, cpr_guidance_scale=0)
    with pytest.raises(ValueError, match="'cpr'"):
        DCSolverScheduler(**SD, dc_ratios="searched")
    with pytest.raises(ValueError, match="36"):
        DCSolverScheduler(**SD, dc_ratios="cpr", cpr_guidance_scale=3.0, cpr_coefficients=[1.0] * 35)
    with pytest.raises(ValueError, match="dc_order"):
        DCSolverScheduler(**SD, dc_order=0)
    with pytest.raises(ValueError, match="algorithm_type"):
        DCDPMSolverScheduler(**SD, algorithm_type="sde-dpmsolver++")


def test_begin_index_and_fp16_inputs():
    unipc, dc = UniPCMultistepScheduler(**SD), DCSolverScheduler(**SD, dc_ratios=None)
    for s in (unipc, dc):
        s.set_timesteps(8)
        s.set_begin_index(3)
    model_fn = gaussian_model(unipc)
    x_u = x_d = NOISE.clone()
    for t in unipc.timesteps[3:]:
        x_u = unipc.step(model_fn(x_u, t), t, x_u).prev_sample
        x_d = dc.step(model_fn(x_d, t), t, x_d).prev_sample
    torch.testing.assert_close(x_d, x_u, **CLOSE)
    # half-precision inputs: the result comes back in half, computed in float32
    half, full = DCSolverScheduler(**SD, dc_ratios=[1, 1, 0.9, 1.1, 1]), DCSolverScheduler(**SD, dc_ratios=[1, 1, 0.9, 1.1, 1])
    half.set_timesteps(5)
    full.set_timesteps(5)
    x = NOISE.half()
    for t in half.timesteps:
        out = model_fn(x.float(), t).half()
        y_half, y_full = half.step(out, t, x).prev_sample, full.step(out.float(), t, x.float()).prev_sample
        assert y_half.dtype == torch.float16
        torch.testing.assert_close(y_half, y_full.half())
        x = y_half


def test_step_never_reads_device_values(monkeypatch):
    """After the first step (which locates the start index) a step does no host-device sync."""
    dc = DCSolverScheduler(**SD, dc_ratios=[1, 1, 0.9, 1.1, 1.2, 0.95])
    dc.set_timesteps(6)
    model_fn = gaussian_model(dc)
    outs = [model_fn(NOISE, t) for t in dc.timesteps]
    x = dc.step(outs[0], dc.timesteps[0], NOISE).prev_sample

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device sync inside step()")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for i in range(1, 6):
        x = dc.step(outs[i], dc.timesteps[i], x).prev_sample
    monkeypatch.undo()
    assert torch.isfinite(x).all()


# ---- DC for a predictor-only solver ------------------------------------------------------------


@pytest.mark.parametrize("config", [dict(SD), dict(SD, solver_order=3, prediction_type="v_prediction")])
def test_dc_dpm_solver(config):
    dpm, dc = DPMSolverMultistepScheduler(**config), DCDPMSolverScheduler(**config)
    model_fn = gaussian_model(dpm)
    for a, b in zip(run(dpm, model_fn, NOISE, 7), run(dc, model_fn, NOISE, 7)):
        torch.testing.assert_close(b, a, **CLOSE)
    ratios = [1, 1, 1.3, 1.2, 1.1, 1.0, 0.9]
    comp = DCDPMSolverScheduler(**config, dc_ratios=ratios)
    comp.set_timesteps(7)
    times = comp.timesteps.tolist()
    x = NOISE.clone()
    for i, t in enumerate(comp.timesteps):
        out = model_fn(x, t)
        before = list(comp.model_outputs)
        a, s = comp._sigma_to_alpha_sigma_t(comp.sigmas[i])
        x0 = split(out, x, a, s, PTYPE[comp.config.prediction_type])[0]
        x = comp.step(out, t, x).prev_sample
        if i >= 2:  # the buffer holds the Lagrange-compensated x0 prediction
            w = compensation_weights([times[i], times[i - 1], times[i - 2]], ratios[i])
            expected = w[0] * x0 + w[1] * before[-1] + w[2] * before[-2]
            torch.testing.assert_close(comp.model_outputs[-1], expected, **CLOSE)
    assert (x - run(dpm, model_fn, NOISE, 7)[-1]).abs().max() > 1e-3


# ---- ratio search ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DCSolverScheduler, DCDPMSolverScheduler])
def test_search_reduces_error_to_the_exact_solution(cls):
    sched = cls(**SD)
    sched.set_timesteps(5)
    model_fn = gaussian_model(sched)
    exact = exact_solution(sched, NOISE)
    reference = reference_trajectory(model_fn, sched, NOISE, 200)
    assert torch.mean((reference[-1] - exact) ** 2) < 1e-3  # the 200-step DDIM ground truth is close to exact
    result = search_ratios(model_fn, sched, NOISE, 5, reference=reference)
    assert len(result.ratios) == 5 and result.ratios[:2] == [1.0, 1.0]
    assert all(b <= a for a, b in zip(result.losses_initial, result.losses_searched))
    searched = result.scheduler()
    assert type(searched) is cls
    assert searched.config.dc_ratios == result.ratios
    plain_err = torch.mean((run(sched, model_fn, NOISE, 5)[-1] - exact) ** 2)
    dc_err = torch.mean((run(searched, model_fn, NOISE, 5)[-1] - exact) ** 2)
    assert dc_err < 0.5 * plain_err, (dc_err, plain_err)


def test_search_builds_its_own_reference_and_checks_input():
    sched = DCSolverScheduler(**SD, prediction_type="v_prediction")
    model_fn = gaussian_model(sched, guidance=3.0)
    result = search_ratios(model_fn, sched, NOISE[:4], 6, reference_steps=60, iters=5)
    assert len(result.ratios) == 6 and np.isfinite(result.final_mse)
    with pytest.raises(TypeError, match="DCSolverScheduler"):
        search_ratios(model_fn, UniPCMultistepScheduler(**SD), NOISE, 5)
    with pytest.raises(ValueError, match="N \\+ 1"):
        search_ratios(model_fn, sched, NOISE, 5, reference=[NOISE])


def test_first_steps_cannot_be_compensated():
    """Steps with fewer than dc_order + 1 buffered outputs ignore their ratio (the spec's guard)."""
    unipc, dc = UniPCMultistepScheduler(**SD), DCSolverScheduler(**SD, dc_ratios=[0.5, 1.7, 1, 1, 1])
    model_fn = gaussian_model(unipc)
    for a, b in zip(run(unipc, model_fn, NOISE, 5), run(dc, model_fn, NOISE, 5)):
        torch.testing.assert_close(b, a, **CLOSE)


def test_search_on_a_pipeline_and_cli(tmp_path):
    """``diffplug bench dc-search`` runs ``search_ratios_for_pipe`` on a (tiny, flow-matching) pipeline."""
    from diffplug.cli import main

    args = ["bench", "dc-search", "--model", "tiny-flow", "--device", "cpu", "--steps", "4", "--prompt", "a cat",
            "--guidance-scale", "5", "--reference-steps", "8", "--iters", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    loaded = DCSolverScheduler.from_pretrained(tmp_path)
    assert loaded.config.use_flow_sigmas and loaded.config.prediction_type == "flow_prediction"
    summary = json.loads((tmp_path / "dc_search.json").read_text())
    record = summary["results"][0]
    assert record["ratios"] == loaded.config.dc_ratios and len(record["ratios"]) == 4
    assert record["step_mse_searched"][0] <= record["step_mse_initial"][0]
    assert main(args) == 2  # refuses to overwrite without --force


def test_shipped_testbed_cpr_fit_loads():
    ratios = cpr_ratios(7.5, 5, "testbed")
    assert len(ratios) == 5 and ratios[:2] == [1.0, 1.0] and all(0.3 < r < 3 for r in ratios[2:])


# ---- safe defaults (issue 20) ----------------------------------------------------------------


def test_cpr_never_extrapolates_and_clamps_to_the_fit():
    cfg = DCSolverScheduler(**SD).config
    from diffplug.samplers.dc_solver import cpr_outside_fit

    assert max(abs(r) for r in cpr_ratios(7.5, 20, "testbed")) > 20  # the raw polynomial explodes off its grid
    for g, n in [(7.5, 20), (4.0, 25), (12.0, 10), (1.0, 8), (4.0, 4), (7.5, 50)]:
        assert cpr_outside_fit("testbed", g, n, cfg) is not None
        sched = DCSolverScheduler(**SD, cpr_guidance_scale=g)
        with pytest.warns(UserWarning, match="rho = 1"):
            sched.set_timesteps(n)
        assert sched.compensation_ratios == [1.0] * n
    lo, hi = 0.3246, 2.2968  # the searched ratios the testbed fit saw
    for g in (1.5, 3.0, 4.0, 6.0, 7.5):
        for n in range(5, 11):
            sched = DCSolverScheduler(**SD, cpr_guidance_scale=g)
            sched.set_timesteps(n)
            assert all(lo <= r <= hi for r in sched.compensation_ratios) and sched.compensation_ratios != [1.0] * n
    assert cpr_outside_fit("testbed", 4.0, 8, dict(cfg, solver_order=3)) is not None


def test_guidance_scale_told_used_unknown_falls_back():
    sched = DCSolverScheduler(**SD)  # no options: the scale is unknown until told
    with pytest.warns(UserWarning, match="guidance scale unknown"):
        sched.set_timesteps(8)
    assert sched.compensation_ratios == [1.0] * 8
    with sched.told_guidance_scale(4.0):
        sched.set_timesteps(8)
    assert sched.compensation_ratios == cpr_ratios(4.0, 8, "testbed", clamp=True) and sched.cpr_guidance is None
    sched.set_guidance_scale(7.5)
    sched.set_timesteps(8)
    assert sched.compensation_ratios == cpr_ratios(7.5, 8, "testbed", clamp=True)
    with pytest.raises(ValueError, match="guidance_scale"):
        sched.set_guidance_scale(-1)


def test_from_pipe_tells_a_dc_scheduler_its_guidance_scale():
    from diffplug.pipelines import from_pipe
    from diffplug.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    pipe.scheduler = DCSolverScheduler.from_config(pipe.scheduler.config)
    from_pipe(pipe)("a cat", num_inference_steps=6, guidance_scale=3.0, generator=torch.manual_seed(0), output_type="latent")
    assert pipe.scheduler.compensation_ratios == cpr_ratios(3.0, 6, "testbed", clamp=True)
    assert pipe.scheduler.cpr_guidance is None  # told for that call only


def test_defaults_on_the_testbed_no_worse_than_unipc():
    """No options, 1 image, two cells of ``benchmarks/dc_solver_defaults.py``'s grid (the full grid is there):
    DC-Solver told the scale is finite and within 1.05x of UniPC's error to a 200-step DDIM reference."""
    from diffplug import testbed
    from diffplug.samplers.dc_solver import guided_denoiser

    pipe = testbed.load("sd")
    for spacing, g, n, compensates in [("leading", 4.0, 10, True), ("linspace", 7.5, 20, False)]:
        config = {**pipe.scheduler.config, "timestep_spacing": spacing}
        model_fn, noise = guided_denoiser(pipe, ["a photo of a bag"], g, generator=torch.Generator().manual_seed(0))
        unipc, dc = UniPCMultistepScheduler.from_config(config), DCSolverScheduler.from_config(config)
        dc.set_guidance_scale(g)
        ref = DCSolverScheduler.from_config(config, dc_ratios=None)
        unipc.set_timesteps(n)
        ref.set_timesteps(timesteps=[int(unipc.timesteps[0])])
        truth = reference_trajectory(model_fn, ref, noise, 200)[-1]
        err = {}
        for name, sched in (("unipc", unipc), ("dc", dc)):
            with torch.no_grad():
                err[name] = torch.mean((run(sched, model_fn, noise, n)[-1] - truth) ** 2).item()
        assert math.isfinite(err["dc"]) and err["dc"] <= 1.05 * err["unipc"], (spacing, g, n, err)
        assert (dc.compensation_ratios != [1.0] * n) == compensates


# ---- step counts whose schedule has a zero-length step (issue 24) -----------------------------------


@pytest.mark.parametrize("cls", [DCSolverScheduler, DCDPMSolverScheduler])
@pytest.mark.parametrize(
    "spacing, steps, why, fewer",
    [("leading", 999, "timestep 1000 is outside the model's 0..999", 998),
     ("linspace", 1000, "from timestep 500 to timestep 500", 999),
     ("leading", 1000, "from timestep 1 to timestep 1", 998),
     ("trailing", 998, "timestep -1 is outside", 999)],
)
def test_step_counts_with_a_zero_length_step_are_refused_with_the_cause(cls, spacing, steps, why, fewer):
    """Where diffusers' UniPC returns NaN (or fails an assert), two steps at one noise level, DC-Solver
    names the cause at set_timesteps; a step count that avoids it is accepted."""
    config = DDIMScheduler(**SD, steps_offset=1, timestep_spacing=spacing).config
    sched = cls.from_config(config, dc_ratios=None)
    with pytest.raises(ValueError, match=f"{why}.*zero length.*use fewer steps"):
        sched.set_timesteps(steps)
    sched.set_timesteps(fewer)


def test_the_zero_length_step_is_what_makes_stock_unipc_return_nan():
    config = DDIMScheduler(**SD, steps_offset=1, timestep_spacing="leading").config
    for steps, finite in [(999, False), (998, True)]:
        stock, ours = UniPCMultistepScheduler.from_config(config), DCSolverScheduler.from_config(config, dc_ratios=None)
        stock.set_timesteps(steps)
        x = NOISE[:1].clone()
        for t in stock.timesteps:
            x = stock.step(0.1 * x, t, x).prev_sample
        assert bool(torch.isfinite(x).all()) == finite
        if finite:
            ours.set_timesteps(steps)
            y = NOISE[:1].clone()
            for t in ours.timesteps:
                y = ours.step(0.1 * y, t, y).prev_sample
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


# ---- flow-matching schedules (issue 23) -------------------------------------------------------------

FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def _fit_file(tmp_path, searched, config, name="cpr_fit.json"):
    from diffplug.samplers.dc_solver import cpr_fit_record

    path = tmp_path / name
    path.write_text(json.dumps(cpr_fit_record(searched, config, about="test")))
    return str(path)


def test_flow_box_is_keyed_on_the_shift_and_mu(tmp_path):
    from diffplug.samplers.dc_solver import cpr_outside_fit

    r6, r10 = [1, 1, 0.9, 1.1, 1.0, 1.2], [1, 1, 0.8, 0.9, 1.0, 1.1, 1.0, 0.95, 1.05, 1.3]
    static = DCSolverScheduler(**FLOW, flow_shift=3.0).config
    fit = _fit_file(tmp_path, [(2.0, 6, r6, None), (5.0, 10, r10, None)], static)
    box = json.loads(open(fit).read())["fitted_on"]
    assert box["shift"] == [3.0, 3.0] and box["config"]["use_flow_sigmas"] == [True]
    assert box["guidance_scale"] == [2.0, 5.0] and box["num_inference_steps"] == [6, 10] and box["ratios"] == [0.8, 1.3]
    assert cpr_outside_fit(fit, 4.0, 8, static) is None
    assert "flow_shift=2 outside the fitted shift 3-3" in cpr_outside_fit(fit, 4.0, 8, dict(static, flow_shift=2.0))
    assert "use_flow_sigmas=False" in cpr_outside_fit(fit, 4.0, 8, DCSolverScheduler(**SD).config)
    assert "guidance scale 7" in cpr_outside_fit(fit, 7.0, 8, static)
    dynamic = DCSolverScheduler(**FLOW, use_dynamic_shifting=True).config  # Flux: shift = exp(mu)
    fit = _fit_file(tmp_path, [(2.0, 6, r6, 0.4), (5.0, 10, r10, 0.8)], dynamic, "dynamic.json")
    assert json.loads(open(fit).read())["fitted_on"]["shift"] == pytest.approx([math.exp(0.4), math.exp(0.8)])
    assert cpr_outside_fit(fit, 4.0, 8, dynamic, mu=0.6) is None
    assert "mu=1.1 (shift exp(mu) = 3.004) outside the fitted shift" in cpr_outside_fit(fit, 4.0, 8, dynamic, mu=1.1)
    sched = DCSolverScheduler(**FLOW, use_dynamic_shifting=True, cpr_coefficients=fit, cpr_guidance_scale=4.0)
    sched.set_timesteps(8, mu=0.6)
    assert sched.compensation_ratios[2:] != [1.0] * 6 and all(0.8 <= r <= 1.3 for r in sched.compensation_ratios)
    with pytest.warns(UserWarning, match=r"dynamic.json' CPR fit cannot predict ratios here \(mu=1.1"):
        sched.set_timesteps(8, mu=1.1)
    assert sched.compensation_ratios == [1.0] * 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"coefficients": [1.0] * 35}))
    with pytest.raises(ValueError, match=r"bad.json: a CPR fit file needs 'coefficients': 36 finite numbers"):
        DCSolverScheduler(cpr_coefficients=str(bad))
    with pytest.raises(ValueError, match="cannot read the CPR fit file"):
        DCSolverScheduler(cpr_coefficients=str(tmp_path / "missing.json"))


def test_the_flow_testbed_fit_ships_and_is_the_flow_default():
    """The flow testbed's CPR fit (``--ship-cpr testbed-flow``, benchmarks/testbed_results.md) ships and is
    what a flow schedule uses by default: inside its box (the testbed's own schedule, shift exp(mu) = 1)
    it compensates with no warning; finite coefficients, ratios within the searched range; outside the
    box (shift 3) it still falls back to UniPC loudly."""
    import warnings
    from pathlib import Path

    import diffplug.samplers
    from diffplug.samplers.dc_solver import CPR_FITS, DEFAULT_FLOW_CPR_FIT, cpr_fit_box
    from diffplug.testbed.models import FLOW_SCHEDULER_CONFIG

    assert DEFAULT_FLOW_CPR_FIT == "testbed-flow" and CPR_FITS["testbed-flow"] == "dc_solver_cpr_testbed_flow.json"
    shipped = json.loads((Path(diffplug.samplers.__file__).parent / CPR_FITS["testbed-flow"]).read_text())
    coefficients = np.asarray(shipped["coefficients"], dtype=float)
    assert coefficients.size == 36 and np.isfinite(coefficients).all() and np.abs(coefficients).max() > 0
    box = cpr_fit_box("testbed-flow")
    assert box["config"]["use_flow_sigmas"] == [True] and box["shift"] == pytest.approx([1.0, 1.0])
    assert box["guidance_scale"] == [1.0, 7.5] and box["num_inference_steps"] == [4, 10]
    lo, hi = box["ratios"]
    assert 0 < lo <= hi and math.isfinite(hi)

    flow = FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)  # the flow testbed's scheduler (load("flux"))
    for scale, steps in [(1.0, 4), (4.0, 8), (7.5, 10)]:
        sched = DCSolverScheduler.from_config(flow.config, cpr_guidance_scale=scale)  # no cpr_coefficients: the default
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            sched.set_timesteps(steps, mu=0.0)  # FluxPipeline's mu on the testbed: 0 (base = max shift = log 1)
        ratios = sched.compensation_ratios
        assert ratios == pytest.approx(cpr_ratios(scale, steps, "testbed-flow", clamp=True))
        assert all(math.isfinite(r) and lo - 1e-9 <= r <= hi + 1e-9 for r in ratios[2:]), ratios
        if (scale, steps) == (4.0, 8):
            assert ratios[2:] != [1.0] * (steps - 2)  # it compensates
    shifted = DCSolverScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, cpr_guidance_scale=4.0)
    with pytest.warns(UserWarning, match=r"'testbed-flow' CPR fit cannot predict ratios here \(.*shift"):
        shifted.set_timesteps(8)
    assert shifted.compensation_ratios == [1.0] * 8


def test_flow_reference_is_a_fine_euler_trajectory():
    """On a flow schedule the reference (DDIM, eta = 0) is the Euler integration of the flow ODE: the
    same as diffusers' FlowMatchEulerDiscreteScheduler stepping through the same 200 noise levels."""
    sched = DCSolverScheduler(**FLOW, flow_shift=3.0, dc_ratios=None)
    sched.set_timesteps(1)  # one interval, sigma_0 -> 0, split into 200 Euler steps
    model_fn = lambda x, t: torch.tanh(x) - 0.5 * MU  # noqa: E731 (any velocity field of x)
    ours = reference_trajectory(model_fn, sched, NOISE, 200)[-1]
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    euler.set_timesteps(sigmas=np.linspace(float(sched.sigmas[0]), 0.0, 201)[:-1].tolist())
    x = NOISE.clone()
    for t in euler.timesteps:
        x = euler.step(model_fn(x, t), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


FLUX_G, FLUX_N = 4.0, 8


@pytest.fixture(scope="module")
def flux_search(tmp_path_factory):
    """One ratio search on a tiny stock FluxPipeline (true CFG 4, 8 steps, its own dynamic-shift mu)
    against the 200-step Euler reference, and a CPR fit file made from it."""
    from diffplug.samplers.dc_solver import search_ratios_for_pipe
    from diffplug.testing import tiny_pipeline

    torch.set_num_threads(1)
    pipe = tiny_pipeline("flux-schnell")
    flux_config = pipe.scheduler.config  # FlowMatchEulerDiscreteScheduler with dynamic shifting
    pipe.scheduler = DCSolverScheduler.from_config(flux_config)
    result = search_ratios_for_pipe(pipe, ["a cat"], FLUX_G, FLUX_N, generator=torch.Generator().manual_seed(0), iters=10)
    fit = _fit_file(tmp_path_factory.mktemp("flux"), [(FLUX_G, FLUX_N, result.ratios, result.mu)], pipe.scheduler.config)
    return pipe, result, fit, flux_config


def test_search_on_a_flux_pipeline_reduces_error_to_the_euler_reference(flux_search):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from diffplug.samplers.dc_solver import guided_denoiser

    pipe, result, *_ = flux_search
    assert result.mu == pytest.approx(calculate_shift(64, 256, 4096, 0.5, 1.15))  # 32x32 px = 8x8 packed tokens
    assert result.ratios[:2] == [1.0, 1.0] and any(abs(r - 1) > 0.02 for r in result.ratios[2:])
    model_fn, x_T = guided_denoiser(pipe, ["a cat"], FLUX_G, generator=torch.Generator().manual_seed(0))
    plain = DCSolverScheduler.from_config(pipe.scheduler.config, dc_ratios=None)
    plain.set_timesteps(FLUX_N, mu=result.mu)
    truth = reference_trajectory(model_fn, plain, x_T, 200)[-1]
    with torch.no_grad():
        err_plain = torch.mean((run(plain, model_fn, x_T)[-1] - truth) ** 2).item()
    assert result.final_mse < 0.9 * err_plain, (result.final_mse, err_plain)


def test_compensation_engages_in_a_stock_flux_pipeline_inside_the_box_only(flux_search):
    import warnings

    from diffplug.samplers import FastUniPCScheduler

    pipe, _, fit, config = flux_search

    def sample(scheduler, g=FLUX_G, n=FLUX_N, size=32):
        pipe.scheduler = scheduler  # the diffusers way, then the stock pipe(...)
        return pipe("a cat", negative_prompt="", true_cfg_scale=g, num_inference_steps=n, height=size, width=size,
                    generator=torch.Generator().manual_seed(1), output_type="latent").images

    dc = DCSolverScheduler.from_config(config, cpr_coefficients=fit, cpr_guidance_scale=FLUX_G)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inside = sample(dc)
    assert not [w for w in caught if "DC-Solver" in str(w.message)]
    assert dc.compensation_ratios[2:] != [1.0] * (FLUX_N - 2)
    plain = sample(FastUniPCScheduler.from_config(config))
    assert torch.isfinite(inside).all() and (inside - plain).abs().max() > 1e-4  # compensated != plain UniPC
    for kw, why in [({"g": 12.0}, "guidance scale 12 outside"), ({"n": 16}, "16 steps outside"),
                    ({"size": 64}, r"mu=0.5 \(shift exp\(mu\) = 1.649\) outside the fitted shift 1.596")]:
        outside = DCSolverScheduler.from_config(config, cpr_coefficients=fit, cpr_guidance_scale=kw.get("g", FLUX_G))
        with pytest.warns(UserWarning, match=f"CPR fit cannot predict ratios here \\({why}.*plain UniPC"):
            got = sample(outside, **kw)
        assert outside.compensation_ratios == [1.0] * kw.get("n", FLUX_N)
        torch.testing.assert_close(got, sample(FastUniPCScheduler.from_config(config), **kw), rtol=0, atol=1e-6)


def test_dc_search_cli_fits_a_flow_cpr_file_the_scheduler_loads(tmp_path):
    """``diffplug bench dc-search`` with several configurations writes cpr_fit.json (coefficients and
    box) for any pipeline, flow ones included; the scheduler compensates with it inside its box."""
    from diffplug.cli import main

    args = ["bench", "dc-search", "--model", "tiny-flow", "--device", "cpu", "--steps", "5", "6", "--prompt", "a cat",
            "--guidance-scale", "3", "5", "--reference-steps", "8", "--iters", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    fit = json.loads((tmp_path / "cpr_fit.json").read_text())
    box = fit["fitted_on"]
    assert len(fit["coefficients"]) == 36 and box["shift"] == [3.0, 3.0] and box["num_inference_steps"] == [5, 6]
    assert box["guidance_scale"] == [3.0, 5.0] and "dc-search" in fit["source"]
    sched = DCSolverScheduler.from_config(
        FlowMatchEulerDiscreteScheduler(shift=3.0).config, cpr_coefficients=str(tmp_path / "cpr_fit.json"), cpr_guidance_scale=4.0
    )
    sched.set_timesteps(6)
    assert sched.compensation_ratios == cpr_ratios(4.0, 6, str(tmp_path / "cpr_fit.json"), clamp=True)
    assert sched.compensation_ratios != [1.0] * 6


@pytest.mark.parametrize("cls", ["FastUniPCScheduler", "DCSolverScheduler", "DCDPMSolverScheduler"])
def test_a_swapped_solver_keeps_the_models_dynamic_shift_for_the_stock_flux_pipeline(cls):
    """FluxPipeline computes mu from scheduler.config (base/max shift and sequence lengths): after the
    diffusers-style swap the model's own values must still be there (diffusers' UniPC drops them and the
    pipeline falls back to Flux's 0.5 / 1.15). Here base = max shift = 0, so mu = 0 and the schedule is unshifted."""
    import diffplug.samplers
    from diffplug.testing import tiny_pipeline

    pipe = tiny_pipeline("flux-schnell")
    config = {**pipe.scheduler.config, "use_dynamic_shifting": True, "base_shift": 0.0, "max_shift": 0.0}
    flow = FlowMatchEulerDiscreteScheduler.from_config(config)
    extra = {} if cls == "FastUniPCScheduler" else {"dc_ratios": None}  # plain solver: this is about the schedule
    pipe.scheduler = getattr(diffplug.samplers, cls).from_config(flow.config, **extra)
    assert (pipe.scheduler.config.base_shift, pipe.scheduler.config.max_shift) == (0.0, 0.0)
    seen = {}
    set_timesteps = pipe.scheduler.set_timesteps

    def spy(*a, **k):
        seen["mu"] = k.get("mu")
        return set_timesteps(*a, **k)

    pipe.scheduler.set_timesteps = spy
    pipe("a", num_inference_steps=3, height=32, width=32, output_type="latent", max_sequence_length=16)
    assert seen["mu"] == 0.0
