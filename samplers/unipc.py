"""A fast UniPC: diffusers' UniPC maths, read once per schedule as linear rows.

Usage::

    from diffplug.samplers import FastUniPCScheduler

    pipe.scheduler = FastUniPCScheduler.from_config(pipe.scheduler.config)  # CLI: --scheduler unipc-fast

One multistep step is *linear* in the sample and the buffered model outputs, with coefficients that
depend on the schedule only.  ``PrecomputedSteps`` reads those coefficients once per schedule by
applying diffusers' own update functions (UniPC's ``multistep_uni_p_bh_update`` /
``multistep_uni_c_bh_update``, DPM-Solver's) to unit vectors, so the maths stays diffusers' and a
step is a handful of ``tensor * float`` kernels: no host-device synchronisation, no per-step
small-tensor algebra, all in float32.  ``FastUniPCScheduler`` equals ``UniPCMultistepScheduler`` to
float32 rounding (``tests/test_schedulers_contract.py``); DC-Solver (``dc_solver.py``) is this
scheduler plus dynamic compensation of the buffer between corrector and predictor.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput  # noqa: F401

from ..predictions import split

# SchedulerMixin is imported so that ``DiffusionPipeline.from_pretrained`` can load a pipeline saved with a
# scheduler from this module: diffusers looks the base class up as an attribute of the module it records.

__all__ = ["FastUniPCScheduler", "PrecomputedSteps", "check_num_inference_steps"]

_PREDICTION = {"epsilon": "epsilon", "sample": "sample", "v_prediction": "v_prediction", "flow_prediction": "flow"}


def check_num_inference_steps(n, num_train_timesteps: int) -> None:
    """A clear error for a step count diffusers would silently turn into an empty or wrong schedule."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be a whole number from 1 to num_train_timesteps={num_train_timesteps}, "
            f"got {n!r}; pass e.g. set_timesteps(20)"
        )


def check_prediction_type(prediction_type) -> None:
    if prediction_type not in _PREDICTION:
        raise ValueError(f"prediction_type must be one of {', '.join(_PREDICTION)}, got {prediction_type!r}")


@dataclass
class _Row:
    """One step as linear maps: conversion noise level, corrector and predictor coefficients."""

    alpha: float  # noise level of the model input at t_i (for the output conversion)
    sigma: float
    order: int  # predictor order at this step
    corrector: tuple[float, ...] | None  # on (last_sample, *buffer before the push, m_new)
    predictor: tuple[float, ...]  # on (sample, *buffer after the push)


def lincomb(coefficients: Sequence[float], tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``sum_k c_k T_k`` with host-float ``c_k``: one kernel per nonzero term, no host-device traffic."""
    out = None
    for c, t in zip(coefficients, tensors):
        if c == 0.0:
            continue
        if t is None:
            raise RuntimeError("a step needs a buffered model output that was never computed")
        out = t * c if out is None else out.add_(t, alpha=c)
    return out


def _stock_flow_sigmas(sigmas) -> bool:
    """Whether ``sigmas`` are flow pipelines' stock base schedule ``linspace(1, 1/n, n)`` (before the
    shift); it is within 1e-3 of UniPC's own flow base ``linspace(1, 1/1000, n + 1)[:-1]``."""
    s = np.asarray([float(v) for v in sigmas], dtype=np.float64)
    return len(s) > 0 and bool(np.allclose(s, np.linspace(1.0, 1.0 / len(s), len(s)), rtol=0, atol=1e-6))


def translate_flow_match(cls, config):
    """A FlowMatch* scheduler config expressed in the keys UniPC / DPM-Solver use for flow matching.

    FlowMatch-only keys (``shift``, ``base_shift``, ...) are dropped; going back needs
    ``FlowMatchEulerDiscreteScheduler.from_config(config, shift=config.flow_shift)``.
    """
    if not isinstance(config, Mapping):
        return config
    name = config.get("_class_name")
    by_name = isinstance(name, str) and name.startswith("FlowMatch")
    by_keys = name is None and "shift" in config and "beta_schedule" not in config and "use_flow_sigmas" not in config
    if not (by_name or by_keys):
        return config
    keep = cls._get_init_keys(cls)
    cfg = {k: v for k, v in config.items() if k in keep or k.startswith("_")}
    cfg["use_flow_sigmas"] = True
    cfg["prediction_type"] = "flow_prediction"
    cfg["flow_shift"] = float(config.get("shift", 1.0))
    return cfg


class PrecomputedSteps:
    """A diffusers multistep ODE solver run from linear rows read once per schedule.

    Subclasses (mixed in before the diffusers scheduler) provide ``_data_prediction``,
    ``_orders(start)`` and ``_probe(j, order, corrector)``; ``_compensate(i, start)`` is a hook
    between the buffer push and the predictor (DC-Solver's dynamic compensation).
    """

    @property
    def _buffer_size(self) -> int:
        return self.config.solver_order

    def _reset(self) -> None:
        n = self._buffer_size
        self.model_outputs = [None] * n
        self.timestep_list = [None] * n
        self.last_sample = None
        self.lower_order_nums = 0
        self._rows: dict[int, list[_Row]] = {}
        self._times: list[float] = []
        self._schedule_mu = getattr(self, "_schedule_mu", None)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As ``ConfigMixin.from_config``; FlowMatch* configs are translated to ``use_flow_sigmas``."""
        return super().from_config(translate_flow_match(cls, config), return_unused_kwargs, **kwargs)

    def _check_set_timesteps(self, num_inference_steps, timesteps, sigmas) -> None:
        if timesteps is None and sigmas is None:
            check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)

    def _after_set_timesteps(self, device, custom: bool = False) -> None:
        """Check the new schedule, reset the buffers (timesteps still on the host), then move them.

        ``custom``: the schedule came from explicit ``timesteps`` / ``sigmas`` (used by subclasses).
        ``_times``: the steps' times, the timesteps, or on flow schedules ``sigma * T`` unrounded
        (diffusers rounds flow timesteps down to integers)."""
        self._reset()
        self._check_schedule()
        if self.config.get("use_flow_sigmas"):
            self._times = (self.sigmas[:-1].double() * self.config.num_train_timesteps).tolist()
        else:
            self._times = [float(t) for t in self.timesteps.tolist()]
        self.timesteps = self.timesteps.to(device)

    def _check_schedule(self) -> None:
        """Every step must lower the noise level: a step of zero length is 0/0 in the multistep
        coefficients (diffusers' solvers return NaN). Step counts near ``num_train_timesteps`` do this:
        'linspace' rounds two timesteps to one at 1000 steps, 'leading' with steps_offset=1 reaches
        timestep 1000 (outside 0..999, clamped to 999's noise level) at 999."""
        cfg, T = self.config, self.config.num_train_timesteps
        t, sigma = self.timesteps.tolist(), self.sigmas.double().tolist()
        where = f"timestep_spacing={cfg.timestep_spacing!r}" + (
            f", steps_offset={cfg.steps_offset}" if cfg.timestep_spacing == "leading" else ""
        )
        where = f"{len(t)} timesteps with {where}"
        fix = f"use fewer steps, or timestep_spacing={'linspace' if cfg.timestep_spacing == 'trailing' else 'trailing'!r}"
        if not cfg.get("use_flow_sigmas"):
            out = [v for v in t if not 0 <= v <= T - 1]
            if out:
                raise ValueError(
                    f"{type(self).__name__}: {where}: timestep {out[0]} is outside the model's 0..{T - 1}; its noise "
                    f"level is clamped to the nearest one's, so one step has zero length (diffusers' solvers return NaN); {fix}"
                )
        for j in range(len(sigma) - 1):
            if not sigma[j + 1] < sigma[j]:
                nxt = f"timestep {t[j + 1]}" if j + 1 < len(t) else "the final noise level"
                raise ValueError(
                    f"{type(self).__name__}: {where}: the step from timestep {t[j]} to {nxt} does not lower the noise "
                    f"level ({sigma[j]:.6g} -> {sigma[j + 1]:.6g}), a step of zero length (diffusers' solvers return NaN); {fix}"
                )

    def _rows_for(self, start: int) -> list[_Row]:
        """The linear rows of every step from ``start`` on (built once per schedule and start index)."""
        rows = self._rows.get(start)
        if rows is None:
            alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas.float())
            alpha, sigma = alpha.tolist(), sigma.tolist()
            orders, correct = self._orders(start)
            rows = [None] * start
            for j in range(start, len(self._times)):
                corrector = self._probe(j, orders[j - 1], corrector=True) if correct[j] else None
                rows.append(_Row(alpha[j], sigma[j], orders[j], corrector, self._probe(j, orders[j], False)))
            self._rows[start] = rows
        return rows

    def _probe_with(self, j: int, fn: Callable, n_inputs: int) -> tuple[float, ...]:
        """Coefficients of the linear update ``fn`` at step ``j``: apply it to unit vectors (float64)."""
        basis = list(torch.eye(n_inputs, dtype=torch.float64).unsqueeze(1))  # n_inputs x (1, n_inputs)
        saved = self._step_index, self.model_outputs
        try:
            self._step_index = j
            self.model_outputs = basis[1 : 1 + self._buffer_size]
            out = fn(basis)
        finally:
            self._step_index, self.model_outputs = saved
        return tuple(float(c) for c in out.reshape(-1).tolist())

    # ---- the step ------------------------------------------------------------------------------

    def _convert(self, row: _Row, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The solver's model output: x0 (data prediction) or epsilon, in float32."""
        x0, eps = split(model_output, sample, row.alpha, row.sigma, _PREDICTION[self.config.prediction_type])
        if not self._data_prediction:
            return eps
        return self._threshold_sample(x0) if self.config.thresholding else x0

    def _compensate(self, i: int, start: int) -> None:
        """Hook: change the buffer after the push, before the predictor (nothing here)."""

    def _fast_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
            self._start = self.step_index
        i, start = self.step_index, self._start
        x, self.model_outputs, _ = self._trial(i, model_output, sample)  # corrector, then the push
        self.timestep_list = [*self.timestep_list[1:], timestep]
        self._compensate(i, start)
        self.last_sample = x
        row = self._rows_for(start)[i]
        prev = lincomb(row.predictor, [x, *self.model_outputs])
        self.this_order = row.order
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        return prev.to(sample.dtype)

    # ---- pieces of a step as pure functions (the DC search differentiates through them) ----------

    def _trial(self, i: int, model_output: torch.Tensor, sample: torch.Tensor):
        """Step ``i`` up to the predictor: ``(x, buffer, start)`` after the corrector and the push.

        Pure (the scheduler is not modified).
        """
        start = self._start if self.step_index is not None else i
        row = self._rows_for(start)[i]
        x = sample.float()
        m = self._convert(row, model_output.float(), x)
        if row.corrector is not None:  # UniC: correct x_{t_i} with the output evaluated at it
            x = lincomb(row.corrector, [self.last_sample, *self.model_outputs, m])
        return x, [*self.model_outputs[1:], m], start

    def _predict(self, i: int, start: int, x, buffer):
        """The predictor of step ``i`` (differentiable: no in-place ops)."""
        row = self._rows_for(start)[i]
        return sum(c * t for c, t in zip(row.predictor, [x, *buffer]) if c != 0.0)

    def _correct(self, j: int, start: int, last_sample, buffer, model_output, sample):
        """Corrector of step ``j`` (if it has one) given the buffer before its push; else ``sample``."""
        rows = self._rows_for(start)
        if j >= len(rows) or rows[j].corrector is None:
            return sample
        m = self._convert(rows[j], model_output.float(), sample)
        return sum(c * t for c, t in zip(rows[j].corrector, [last_sample, *buffer, m]) if c != 0.0)

    def _has_corrector(self, j: int, start: int) -> bool:
        rows = self._rows_for(start)
        return j < len(rows) and rows[j].corrector is not None


def merged_signature(base_init, *extras: Callable, **defaults) -> inspect.Signature:
    """``base_init``'s parameters followed by each of ``extras``' keyword parameters (config keys a
    diffplug scheduler adds to the diffusers scheduler it extends), with ``defaults`` overriding theirs."""
    base = list(inspect.signature(base_init).parameters.values())
    added = [p for extra in extras for p in inspect.signature(extra).parameters.values() if p.kind is p.KEYWORD_ONLY]
    added = [p.replace(kind=p.POSITIONAL_OR_KEYWORD, default=defaults.get(p.name, p.default)) for p in added]
    return inspect.Signature([*base, *added])


def flow_shift_config(
    *, base_image_seq_len: int = 256, max_image_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15,
):  # fmt: skip
    """Signature holder: the dynamic-shift keys of a FlowMatch config (defaults: FluxPipeline's). The solvers
    never read them; they keep them so that a Flux-style pipeline, which computes ``mu`` from
    ``scheduler.config``, still uses the model's own values after ``X.from_config(pipe.scheduler.config)``
    (diffusers' own UniPC drops them, and the pipeline silently falls back to Flux's numbers)."""


FLOW_SHIFT_KEYS = tuple(inspect.signature(flow_shift_config).parameters)


def pop_flow_shift(kwargs: dict) -> dict:
    """``kwargs`` without :data:`FLOW_SHIFT_KEYS` (config-only: the base scheduler's ``__init__`` has none)."""
    return {k: v for k, v in kwargs.items() if k not in FLOW_SHIFT_KEYS}


class FastUniPCScheduler(PrecomputedSteps, UniPCMultistepScheduler):
    """``UniPCMultistepScheduler`` with the same config and results (to float32 rounding), faster.

    A step is a few ``tensor * float`` kernels with coefficients read once per schedule from
    diffusers' own UniPC update functions: no host-device sync after the first step.  The maths
    runs in float32; ``prev_sample`` has the input's dtype.  ``solver_p`` is not supported.
    """

    def _init(self, *args, **kwargs):
        if kwargs.get("solver_p") is not None:
            raise ValueError(f"{type(self).__name__} does not support solver_p (a foreign predictor); leave it None")
        check_prediction_type(kwargs.get("prediction_type", "epsilon"))
        super().__init__(*args, **pop_flow_shift(kwargs))
        self._reset()

    _init.__signature__ = merged_signature(UniPCMultistepScheduler.__init__, flow_shift_config)
    __init__ = register_to_config(_init)
    del _init

    _data_prediction = property(lambda self: self.predict_x0)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ):
        """UniPC's ``set_timesteps`` plus custom ``timesteps`` (descending training timesteps)."""
        self._check_set_timesteps(num_inference_steps, timesteps, sigmas)
        self._schedule_mu = mu  # dynamic shifting's mu (DC-Solver's CPR box checks it)
        if timesteps is not None:
            self._set_custom_timesteps(timesteps, num_inference_steps, sigmas, mu)
        else:
            super().set_timesteps(num_inference_steps, device=None, sigmas=sigmas, mu=mu)
        stock = sigmas is not None and _stock_flow_sigmas(sigmas)  # what Chroma/SD3-style pipelines pass
        self._after_set_timesteps(device, custom=timesteps is not None or (sigmas is not None and not stock))

    def _set_custom_timesteps(self, timesteps, num_inference_steps, sigmas, mu) -> None:
        cfg = self.config
        if sigmas is not None:
            raise ValueError("pass either `timesteps` or `sigmas` to set_timesteps, not both")
        if num_inference_steps is not None and num_inference_steps != len(timesteps):
            raise ValueError(f"num_inference_steps={num_inference_steps} disagrees with len(timesteps)={len(timesteps)}")
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            raise ValueError("custom `timesteps` cannot be combined with karras/exponential/beta sigmas in the config")
        t = np.asarray([float(v) for v in timesteps], dtype=np.float64)
        if len(t) < 1 or np.any(np.diff(t) >= 0) or t[0] > cfg.num_train_timesteps - 1 or t[-1] < 0:
            raise ValueError(
                f"timesteps must be strictly decreasing within [0, {cfg.num_train_timesteps - 1}], got {list(timesteps)}"
            )
        UniPCMultistepScheduler.set_timesteps(self, len(t), mu=mu)  # resets the solver state; schedule replaced below
        if cfg.use_flow_sigmas:  # flow: the timesteps are already shifted, sigma = t / T
            s = np.minimum(t / cfg.num_train_timesteps, 1 - 1e-6)  # as UniPC: sigma = 1 makes log(alpha) infinite
            last = s[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
        else:  # VP: the training sigmas at those timesteps, as UniPC's default branch
            table = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
            s = np.interp(t, np.arange(len(table)), table)
            last = table[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.append(s, last).astype(np.float32))
        self.timesteps = torch.from_numpy(t.round().astype(np.int64))
        self.num_inference_steps = len(t)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One UniPC step: the corrector for the current point, then the predictor."""
        prev = self._fast_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _orders(self, start: int):
        """UniPC's predictor order per step (warm-up, lower_order_final) and where its corrector runs."""
        n, p = len(self._times), self.config.solver_order
        orders, correct = {}, {}
        for j in range(start, n):
            cap = min(p, n - j) if self.config.lower_order_final else p
            orders[j] = min(cap, j - start + 1)
            correct[j] = j > start and (j - 1) not in self.disable_corrector
        return orders, correct

    def _probe(self, j: int, order: int, corrector: bool) -> tuple[float, ...]:
        B = self._buffer_size
        if corrector:  # inputs: last_sample, buffer (B), m_new
            fn = lambda e: UniPCMultistepScheduler.multistep_uni_c_bh_update(  # noqa: E731
                self, this_model_output=e[B + 1], last_sample=e[0], this_sample=e[0], order=order
            )
            return self._probe_with(j, fn, B + 2)
        fn = lambda e: UniPCMultistepScheduler.multistep_uni_p_bh_update(self, e[0], sample=e[0], order=order)  # noqa: E731
        return self._probe_with(j, fn, B + 1)

