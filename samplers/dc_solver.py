"""DC-Solver: dynamic compensation for multistep diffusion solvers.

Usage::

    from diffplug.samplers import DCSolverScheduler
    from diffplug.samplers.dc_solver import search_ratios_for_pipe

    # ratios predicted by the cascade polynomial regression (the authors' SD-2.1 fit by default)
    pipe.scheduler = DCSolverScheduler.from_config(pipe.scheduler.config, dc_ratios="cpr", cpr_guidance_scale=7.5)
    # or searched for this model, CFG scale and NFE (10 prompts, 200-step DDIM ground truth), then kept
    result = search_ratios_for_pipe(pipe, prompts, guidance_scale=7.5, num_inference_steps=5)
    pipe.scheduler = result.scheduler()
    pipe.scheduler.save_pretrained("dc-solver-cfg7.5-nfe5")  # DCSolverScheduler.from_pretrained(...) later
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)  # and back

W. Zhao, H. Wang, J. Zhou, J. Lu, *DC-Solver: Improving Predictor-Corrector Diffusion Sampler via
Dynamic Compensation*, ECCV 2024, arXiv:2409.03755.

A predictor-corrector sampler (UniPC) evaluates the model output ``m_i`` at the *predicted* point
x~_{t_i}; the corrector then moves the sample to x^c_{t_i}, yet the next predictor still uses ``m_i``.
Dynamic compensation (DC, Sec. 3.2) replaces the newest buffered output by the Lagrange interpolant
through the last ``K + 1`` outputs (``K = dc_order``), evaluated at a ratio-shifted time::

    tau_i = t_{i-1} + rho_i (t_i - t_{i-1})
    m~_i  = sum_k m_{i-k} prod_{l != k} (tau_i - t_{i-l}) / (t_{i-k} - t_{i-l})

and writes ``m~_i`` back into the buffer, so the predictor at step i, the corrector at step i+1 and
later compensations all see it.  ``rho_i = 1`` is the plain solver.  Times are the scheduler's
timestep values (Lagrange weights are invariant to an affine change of time).  The ratios are
searched per (model, guidance scale, NFE) against a fine DDIM trajectory (``search_ratios``,
Sec. 3.3) or predicted by the cascade polynomial regression (``cpr_ratios``, Sec. 3.4).

Implementation.  ``DCSolverScheduler`` is ``FastUniPCScheduler`` (``unipc.py``: diffusers' UniPC read
once per schedule as linear rows, a step is a few ``tensor * float`` kernels with no host-device
sync) plus the compensation between its corrector and predictor; ``DCDPMSolverScheduler`` is the
same on DPM-Solver++.  The linear rows also make the solver algebra differentiable in ``rho`` for
the search.

Defaults.  ``DCSolverScheduler.from_config(config)`` compensates with the shipped testbed CPR fit at
the guidance scale ``from_pipe`` tells it (or ``cpr_guidance_scale``), clamps the predicted ratios to
the range the fit saw, and falls back to ``rho = 1`` (plain UniPC, with a warning) where the scale is
unknown or the fit would extrapolate (guidance, NFE or solver config outside its ``fitted_on`` box,
``cpr_fit_box``).

Flow matching (Flux, SD3, Chroma: ``use_flow_sigmas``).  The compensation acts on the same UniPC
data-prediction update; the times are ``sigma * 1000`` unrounded.  A fit's box then also bounds the
shift (``flow_shift``, or ``exp(mu)`` under dynamic shifting, where ``mu`` grows with the image's
token count).  Flow schedules default to the ``"testbed-flow"`` fit, the flow testbed's (shift 1; other shifts
fall back to UniPC with a warning).  Fit one for any pipeline with one command::

    diffplug bench dc-search --model M --guidance-scale 1.5 3 7.5 --steps 5 6 8 10 [--mu 0.5 0.8 1.15] --out DIR
    pipe.scheduler = DCSolverScheduler.from_config(pipe.scheduler.config, cpr_coefficients="DIR/cpr_fit.json",
                                                   cpr_guidance_scale=4.0)

(``--ship testbed-flow`` also writes it as the package's flow default.)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput  # noqa: F401 (see unipc.py)

from ..predictions import noise_levels, split
from .unipc import (
    _PREDICTION,
    FastUniPCScheduler,
    PrecomputedSteps,
    check_prediction_type,
    flow_shift_config,
    lincomb,
    merged_signature,
    pop_flow_shift,
)

__all__ = [
    "DCDPMSolverScheduler",
    "DCSolverScheduler",
    "SearchResult",
    "compensation_weights",
    "cpr_features",
    "cpr_fit_box",
    "cpr_fit_record",
    "flow_shift_of",
    "cpr_ratios",
    "fit_cpr",
    "reference_trajectory",
    "search_ratios",
    "search_ratios_for_pipe",
    "guided_denoiser",
    "pipeline_schedule",
    "sd21_cpr_coefficients",
    "shipped_cpr_coefficients",
]

# A stock pipeline cannot tell a scheduler its CFG scale. DC-Solver does not guess one: ratios predicted
# for 7.5 and sampled at 1 gave 2.5x UniPC's error on the testbed (benchmarks/dc_solver_results.md), so
# without ``set_guidance_scale`` (``from_pipe`` calls it) or ``cpr_guidance_scale`` it runs as UniPC.
DEFAULT_CPR_FIT = "testbed"
# Flow-matching schedules (use_flow_sigmas) default to this fit: the flow testbed's (shipped by
# ``benchmarks/dc_solver_mse.py --model testbed-flux ... --ship-cpr testbed-flow``; shift 1).
DEFAULT_FLOW_CPR_FIT = "testbed-flow"
# CPR fits shipped with the package, by name (``cpr_coefficients="sd2.1"``): JSON files next to this module.
# Any other fit file (``cpr_coefficients="DIR/cpr_fit.json"``, written by ``diffplug bench dc-search``) works too.
CPR_FITS = {
    "sd2.1": "dc_solver_cpr_sd21.json",
    "testbed": "dc_solver_cpr_testbed.json",
    "testbed-flow": "dc_solver_cpr_testbed_flow.json",
}
# The scheduler config keys a fit's box records (``fitted_on.config``); VP fits add timestep_spacing.
CPR_BOX_KEYS = ("solver_order", "solver_type", "predict_x0", "lower_order_final", "final_sigmas_type", "use_flow_sigmas")


# --------------------------------------------------------------------------------------------------
# Dynamic compensation (Sec. 3.2)


def compensation_weights(times: Sequence[float], ratio):
    """Lagrange weights of the DC interpolant, newest output first.

    ``times = (t_i, t_{i-1}, ..., t_{i-K})`` are the times of the buffered outputs; the interpolant is
    evaluated at ``tau = t_{i-1} + ratio * (t_i - t_{i-1})``.  ``ratio`` may be a float or a tensor
    (then the weights are tensors, differentiable in it).  ``ratio = 1`` gives ``(1, 0, ..., 0)``.
    """
    if len(times) < 2:
        raise ValueError(f"dynamic compensation needs at least 2 buffered times, got {len(times)}")
    t = [float(v) for v in times]
    if len(set(t)) != len(t):
        raise ValueError(f"dynamic compensation needs distinct times, got {t}")
    tau = t[1] + ratio * (t[0] - t[1])
    weights = []
    for k, t_k in enumerate(t):
        w = 1.0
        for l, t_l in enumerate(t):
            if l != k:
                w = w * ((tau - t_l) / (t_k - t_l))
        weights.append(w)
    return weights


# --------------------------------------------------------------------------------------------------
# Cascade polynomial regression (Sec. 3.4): rho(c, n, x) = sum_k a_k x^k, a_k = sum_j b_kj c^(2-j),
# b_kj = sum_m P_kjm n^(2-m), with c = CFG / 12, n = NFE / 50, x = step / NFE; linear in the 36 P_kjm.


def _is_fit_file(fit) -> bool:
    return isinstance(fit, str) and fit not in CPR_FITS and fit.endswith(".json")


def _load_fit(fit: str) -> dict:
    """A CPR fit by shipped name, or read from a ``.json`` fit file (checked: 36 finite coefficients)."""
    if _is_fit_file(fit):
        path = Path(fit)
        try:
            fit = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cpr_coefficients={fit!r}: cannot read the CPR fit file ({e})") from None
        coefficients = fit.get("coefficients") if isinstance(fit, dict) else None
        if not isinstance(coefficients, list) or len(coefficients) != 36 or not all(_is_number(c) for c in coefficients):
            raise ValueError(f"{path}: a CPR fit file needs 'coefficients': 36 finite numbers (diffplug bench dc-search writes one)")
        return fit
    return _shipped_fit(fit)


@functools.lru_cache(maxsize=None)
def _shipped_fit(name: str) -> dict:
    if name not in CPR_FITS:
        raise ValueError(f"unknown CPR fit {name!r}; shipped fits: {', '.join(CPR_FITS)}, a .json fit file, or 36 numbers")
    path = Path(__file__).with_name(CPR_FITS[name])
    if not path.is_file():
        raise ValueError(
            f"the {name!r} CPR fit is not in this install ({path.name} missing)"
            + (": no flow-matching fit ships yet, see DCSolverScheduler's docstring for fitting one" if name == DEFAULT_FLOW_CPR_FIT else "")
        )
    return json.loads(path.read_text())


def shipped_cpr_coefficients(name: str) -> list[float]:
    """The 36 CPR coefficients of a shipped fit (``"sd2.1"``, the paper's authors; ``"testbed"``) or a fit file."""
    return list(_load_fit(name)["coefficients"])


def cpr_fit_box(fit: str = DEFAULT_CPR_FIT) -> dict | None:
    """Where a named fit or fit file holds (its ``fitted_on``): guidance scales, NFEs, ratios seen,
    scheduler config values and, for flow fits, the shift.  Outside it DC-Solver runs as UniPC."""
    return _load_fit(fit).get("fitted_on")


def flow_shift_of(config, mu: float | None = None) -> float | None:
    """The shift ``s`` of a flow-matching schedule (``sigma -> s sigma / (1 + (s - 1) sigma)``), or None (VP).

    Dynamic shifting (Flux) is the same map with ``s = exp(mu)`` (diffusers' "exponential" time shift).
    """
    if not config.get("use_flow_sigmas"):
        return None
    if config.get("use_dynamic_shifting"):
        return None if mu is None else math.exp(mu)
    return float(config.get("flow_shift", 1.0))


def cpr_outside_fit(
    fit: str | Sequence[float], guidance_scale: float, num_inference_steps: int, config, mu: float | None = None
) -> str | None:
    """Why CPR would extrapolate here (guidance, NFE, scheduler config or flow shift outside what the fit saw), or None.

    A cubic-in-step, quadratic-in-(guidance, NFE) polynomial fitted on a small grid explodes outside
    it (the testbed fit predicts rho = 21.7 at NFE 20, -31 at NFE 25).  Shipped fits and fit files
    record their box (``fitted_on``); 36 numbers of your own are trusted everywhere.  On flow-matching
    schedules the box also bounds the shift (``flow_shift``, or ``exp(mu)`` with dynamic shifting).
    """
    if not isinstance(fit, str):
        return None
    box = cpr_fit_box(fit)
    if not box:
        return None
    (g_lo, g_hi), (n_lo, n_hi) = box["guidance_scale"], box["num_inference_steps"]
    if not g_lo <= guidance_scale <= g_hi:
        return f"guidance scale {guidance_scale:g} outside the fitted {g_lo:g}-{g_hi:g}"
    if not n_lo <= num_inference_steps <= n_hi:
        return f"{num_inference_steps} steps outside the fitted {n_lo}-{n_hi}"
    for key, allowed in box.get("config", {}).items():
        if config.get(key) not in allowed:
            return f"{key}={config.get(key)!r}, fitted for {' or '.join(map(repr, allowed))}"
    shift = flow_shift_of(config, mu)
    if shift is not None and "shift" in box:
        lo, hi = box["shift"]
        if not lo * (1 - 1e-6) <= shift <= hi * (1 + 1e-6):
            where = f"mu={mu:.4g} (shift exp(mu) = {shift:.4g})" if config.get("use_dynamic_shifting") else f"flow_shift={shift:g}"
            return f"{where} outside the fitted shift {lo:.4g}-{hi:.4g} (mu {math.log(lo):.4g}-{math.log(hi):.4g})"
    return None


def sd21_cpr_coefficients() -> list[float]:
    """The 36 CPR coefficients the paper's authors fitted for Stable Diffusion 2.1 (see the JSON file)."""
    return shipped_cpr_coefficients("sd2.1")


def cpr_features(guidance_scale: float, num_inference_steps: int, step: int) -> np.ndarray:
    """The 36 monomials ``x^k c^(2-j) n^(2-m)`` (row-major in k, j, m) that CPR weights; ``step`` is 1-based."""
    c, n, x = guidance_scale / 12.0, num_inference_steps / 50.0, step / num_inference_steps
    xk = x ** np.arange(4)
    cj = c ** (2 - np.arange(3))
    nm = n ** (2 - np.arange(3))
    return (xk[:, None, None] * cj[None, :, None] * nm[None, None, :]).reshape(-1)


def cpr_ratios(
    guidance_scale: float,
    num_inference_steps: int,
    coefficients: Sequence[float] | str | None = None,
    dc_order: int = 2,
    clamp: bool = False,
) -> list[float]:
    """Compensation ratios for steps 1..NFE predicted by CPR (the raw polynomial; see ``cpr_outside_fit``).

    ``coefficients``: 36 numbers, the name of a shipped fit (``CPR_FITS``) or a ``.json`` fit file; default ``"sd2.1"``.
    Steps that cannot be compensated (``step <= dc_order``, too few buffered outputs) get ratio 1.
    ``clamp``: keep each ratio inside the range of the searched ratios a named fit was fitted on.
    """
    name = (coefficients or "sd2.1") if coefficients is None or isinstance(coefficients, str) else None
    P = np.asarray(shipped_cpr_coefficients(name) if name else coefficients, dtype=np.float64)
    if P.shape != (36,):
        raise ValueError(f"cpr_coefficients must be 36 numbers (4 x 3 x 3), got shape {P.shape}")
    box = _load_fit(name).get("fitted_on") if clamp and name else None
    lo, hi = box["ratios"] if box else (-math.inf, math.inf)
    return [
        1.0 if s <= dc_order else float(np.clip(cpr_features(guidance_scale, num_inference_steps, s) @ P, lo, hi))
        for s in range(1, num_inference_steps + 1)
    ]


def fit_cpr(searched: Iterable[tuple[float, int, Sequence[float]]], dc_order: int = 2) -> list[float]:
    """Least-squares CPR fit from searched ratios: ``searched`` yields ``(guidance_scale, NFE, ratios)``.

    The model is linear in its 36 coefficients, so ``numpy.linalg.lstsq`` solves it exactly (minimum
    norm where the grid does not determine every coefficient).
    """
    rows, targets = [], []
    for guidance_scale, nfe, ratios in searched:
        if len(ratios) != nfe:
            raise ValueError(f"searched ratios for NFE={nfe} must have {nfe} entries, got {len(ratios)}")
        for s in range(dc_order + 1, nfe + 1):
            rows.append(cpr_features(guidance_scale, nfe, s))
            targets.append(float(ratios[s - 1]))
    if not rows:
        raise ValueError("fit_cpr needs at least one searched ratio list with NFE > dc_order")
    P, *_ = np.linalg.lstsq(np.stack(rows), np.asarray(targets), rcond=None)
    return [float(p) for p in P]


def cpr_fit_record(searched: Iterable[tuple[float, int, Sequence[float], float | None]], config, dc_order: int = 2,
                   **about) -> dict:
    """The content of a CPR fit file: coefficients and the box the scheduler trusts them in.

    ``searched`` yields ``(guidance_scale, NFE, ratios, mu)`` per searched configuration (``mu``:
    dynamic shifting's, else None); ``config`` is the searched scheduler's.  The box (``fitted_on``)
    spans the guidance scales, NFEs and ratios seen, pins the solver keys ``CPR_BOX_KEYS`` (and a VP
    schedule's ``timestep_spacing``) to the searched values and, on flow schedules, spans the shifts
    seen (``flow_shift``, or ``exp(mu)``).  ``about``: description, source, ... stored as given.
    """
    rows = list(searched)
    coefficients = fit_cpr(((g, n, r) for g, n, r, _ in rows), dc_order)
    seen = [float(r) for _, _, ratios, _ in rows for r in ratios]
    keys = CPR_BOX_KEYS if config.get("use_flow_sigmas") else (*CPR_BOX_KEYS, "timestep_spacing")
    box = {
        "guidance_scale": [min(g for g, *_ in rows), max(g for g, *_ in rows)],
        "num_inference_steps": [min(n for _, n, *_ in rows), max(n for _, n, *_ in rows)],
        "ratios": [min(seen), max(seen)],
        "config": {key: [config.get(key)] for key in keys},
    }
    if config.get("use_flow_sigmas"):
        shifts = [flow_shift_of(config, mu) for *_, mu in rows]
        if None in shifts:
            raise ValueError("cpr_fit_record: a dynamic-shifting schedule needs the mu each configuration was searched at")
        box["shift"] = [min(shifts), max(shifts)]
    model = "rho(c, n, x) = sum_k a_k x^k, a_k = sum_j b_kj c^(2-j), b_kj = sum_m P[k][j][m] n^(2-m); c = CFG / 12, n = NFE / 50, x = step / NFE"
    return {**about, "model": model, "fitted_on": box, "coefficients": coefficients}


# --------------------------------------------------------------------------------------------------
# The schedulers: the fast (precomputed-rows) solvers of ``unipc.py`` plus dynamic compensation


def _dc_config(
    *, dc_ratios: list[float] | str | None = "cpr", dc_order: int = 2,
    cpr_coefficients: list[float] | str | None = None, cpr_guidance_scale: float | None = None,
):  # fmt: skip
    """Signature holder for the config keys DC adds to its base scheduler."""


def _validate_dc_config(dc_ratios, dc_order, cpr_coefficients, cpr_guidance_scale) -> None:
    if not isinstance(dc_order, int) or not 1 <= dc_order <= 3:
        raise ValueError(f"dc_order must be 1, 2 or 3 (Lagrange through dc_order + 1 outputs), got {dc_order!r}")
    if isinstance(dc_ratios, str):
        if dc_ratios != "cpr":
            raise ValueError(f"dc_ratios must be a list of floats, null or 'cpr', got {dc_ratios!r}")
    elif dc_ratios is not None:
        if not isinstance(dc_ratios, (list, tuple)) or not all(_is_number(r) for r in dc_ratios):
            raise ValueError(f"dc_ratios must be a list of finite floats (one per step), null or 'cpr', got {dc_ratios!r}")
    if isinstance(cpr_coefficients, str):
        if _is_fit_file(cpr_coefficients):
            _load_fit(cpr_coefficients)  # a clear error now, naming the file, rather than at set_timesteps
        elif cpr_coefficients not in CPR_FITS:
            raise ValueError(
                f"cpr_coefficients={cpr_coefficients!r}: name one of {', '.join(CPR_FITS)}, a .json fit file, or pass 36 numbers"
            )
    elif cpr_coefficients is not None and (
        not isinstance(cpr_coefficients, (list, tuple)) or len(cpr_coefficients) != 36
        or not all(_is_number(c) for c in cpr_coefficients)
    ):  # fmt: skip
        raise ValueError("cpr_coefficients must hold 36 finite numbers or name a shipped fit (e.g. 'testbed')")
    _check_guidance_scale(cpr_guidance_scale, "cpr_guidance_scale")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_guidance_scale(scale, name: str) -> None:
    if scale is not None and not (_is_number(scale) and scale > 0):
        raise ValueError(f"{name} must be a positive number (the CFG scale you sample with), got {scale!r}")


class _DynamicCompensation:
    """DC on a ``PrecomputedSteps`` solver: ratio resolution, the compensation hook, the search hooks."""

    def _dc_init(self, dc_ratios, dc_order, cpr_coefficients, cpr_guidance_scale) -> None:
        _validate_dc_config(dc_ratios, dc_order, cpr_coefficients, cpr_guidance_scale)
        self._dc_guidance_scale = None
        self._reset()

    @property
    def _buffer_size(self) -> int:
        return max(self.config.solver_order, self.config.dc_order + 1)

    def _reset(self) -> None:
        super()._reset()
        self._dc_ratios: list[float] = []

    def set_guidance_scale(self, guidance_scale: float | None) -> None:
        """Tell the scheduler the CFG scale it samples with (``from_pipe`` does, for each call).

        Used by ``dc_ratios="cpr"`` from the next ``set_timesteps`` on, in place of
        ``cpr_guidance_scale``; ``None`` forgets it.
        """
        _check_guidance_scale(guidance_scale, "guidance_scale")
        self._dc_guidance_scale = None if guidance_scale is None else float(guidance_scale)

    @contextlib.contextmanager
    def told_guidance_scale(self, guidance_scale):
        """``set_guidance_scale`` for the block only (``from_pipe`` wraps its ``set_timesteps`` in it);
        anything but a positive number (e.g. a guidance without one) leaves the scheduler as it is."""
        previous = self._dc_guidance_scale
        if _is_number(guidance_scale) and guidance_scale > 0:
            self._dc_guidance_scale = float(guidance_scale)
        try:
            yield self
        finally:
            self._dc_guidance_scale = previous

    @property
    def cpr_guidance(self) -> float | None:
        """The guidance scale CPR predicts ratios for: told (``set_guidance_scale``) > ``cpr_guidance_scale``."""
        told = self._dc_guidance_scale
        return told if told is not None else self.config.cpr_guidance_scale

    def _after_set_timesteps(self, device, custom: bool = False) -> None:
        """Resolve the ratios for the new schedule and reset the buffers."""
        super()._after_set_timesteps(device)
        n = len(self._times)
        ratios = self.config.dc_ratios
        if ratios is None:
            self._dc_ratios = [1.0] * n
        elif isinstance(ratios, str):  # "cpr"
            self._dc_ratios = self._cpr_schedule(n, custom)
        else:
            if len(ratios) != n:
                raise ValueError(
                    f"dc_ratios has {len(ratios)} entries but this schedule has {n} steps: search ratios for "
                    f"num_inference_steps={n} (diffplug.samplers.dc_solver.search_ratios) or use dc_ratios='cpr'"
                )
            self._dc_ratios = [float(r) for r in ratios]

    def _cpr_schedule(self, n: int, custom: bool) -> list[float]:
        """CPR ratios, or ``rho = 1`` with a warning where the fit would extrapolate."""
        cfg, scale = self.config, self.cpr_guidance
        flow = bool(cfg.get("use_flow_sigmas"))
        fit = cfg.cpr_coefficients or (DEFAULT_FLOW_CPR_FIT if flow else DEFAULT_CPR_FIT)
        if flow and fit == DEFAULT_FLOW_CPR_FIT and not Path(__file__).with_name(CPR_FITS[fit]).is_file():
            why = (
                "no CPR fit for flow-matching schedules ships yet; fit one for your model with `diffplug bench "
                "dc-search --model M --guidance-scale G1 G2 --steps N1 N2 --out DIR` and pass "
                "cpr_coefficients='DIR/cpr_fit.json'"
            )
        elif scale is None:
            why = "guidance scale unknown: run the pipeline through diffplug's from_pipe, or set cpr_guidance_scale"
        else:
            why = "custom timesteps/sigmas" if custom else cpr_outside_fit(fit, scale, n, cfg, self._schedule_mu)
        if why is None:
            return cpr_ratios(scale, n, fit, cfg.dc_order, clamp=True)
        name = repr(fit) if isinstance(fit, str) else "given"
        warnings.warn(
            f"DC-Solver: the {name} CPR fit cannot predict ratios here ({why}); "
            "sampling without compensation (rho = 1, plain UniPC). Search ratios for it "
            "(`diffplug bench dc-search`) or pass dc_ratios=[...]",
            stacklevel=4,
        )
        return [1.0] * n

    @property
    def compensation_ratios(self) -> list[float]:
        """The ratio used at each step of the current schedule (1.0 = no compensation)."""
        return list(self._dc_ratios)

    def _dc_weights(self, i: int, start: int, ratio=None):
        """Lagrange weights (newest first) for step ``i``, or None where no compensation applies."""
        ratio = self._dc_ratios[i] if ratio is None else ratio
        K = self.config.dc_order
        if i - start < K or (not torch.is_tensor(ratio) and ratio == 1.0):
            return None  # fewer than K + 1 buffered outputs, or rho = 1
        return compensation_weights([self._times[i - k] for k in range(K + 1)], ratio)

    def _compensate(self, i: int, start: int) -> None:
        """Dynamic compensation, written back into the buffer (Sec. 3.2)."""
        w = self._dc_weights(i, start)
        if w is not None:
            self.model_outputs[-1] = lincomb(w, self.model_outputs[::-1][: len(w)])

    def _dc_predict(self, i: int, start: int, x, buffer, ratio) -> tuple[torch.Tensor, list]:
        """Compensate ``buffer`` with ``ratio`` (a tensor: differentiable) and run the predictor of step i."""
        w = self._dc_weights(i, start, ratio)
        if w is not None:
            newest_first = buffer[::-1][: len(w)]
            buffer = [*buffer[:-1], sum(wk * mk for wk, mk in zip(w, newest_first))]
        return self._predict(i, start, x, buffer), buffer


class DCSolverScheduler(_DynamicCompensation, FastUniPCScheduler):
    """UniPC with dynamic compensation: DC-Solver (Zhao et al., ECCV 2024) = ``FastUniPCScheduler`` + DC.

    All of ``UniPCMultistepScheduler``'s config, plus:

    * ``dc_ratios``: ``"cpr"`` (default) predicts one ratio per step with the cascade polynomial
      regression from ``cpr_coefficients`` (a shipped fit by name, ``"testbed"`` (default; flow
      schedules: ``"testbed-flow"``) or ``"sd2.1"`` (the authors'), a ``.json`` fit file written by
      ``diffplug bench dc-search``, or 36 numbers) at the guidance scale the pipeline tells it
      (``set_guidance_scale``; ``from_pipe`` does), else ``cpr_guidance_scale``.  Predicted ratios
      are clamped to the range the fit saw; where the scale is unknown (a stock ``pipe(...)`` call
      without ``cpr_guidance_scale``) or outside the fitted (guidance, NFE, config, flow shift) box
      (``cpr_fit_box``) the scheduler warns and uses rho = 1 (plain UniPC).
      A list: searched ratios (``search_ratios``), one per step.  ``null``: plain UniPC.
    * ``dc_order``: Lagrange order K of the compensation (K + 1 buffered outputs; paper: 2).

    Swap in with ``DCSolverScheduler.from_config(pipe.scheduler.config)``; FlowMatch configs become
    ``use_flow_sigmas=True, prediction_type="flow_prediction"``.
    """

    def _init(self, *args, dc_ratios="cpr", dc_order=2, cpr_coefficients=None, cpr_guidance_scale=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._dc_init(dc_ratios, dc_order, cpr_coefficients, cpr_guidance_scale)

    _init.__signature__ = merged_signature(UniPCMultistepScheduler.__init__, _dc_config, flow_shift_config)
    __init__ = register_to_config(_init)
    del _init


class DCDPMSolverScheduler(_DynamicCompensation, PrecomputedSteps, DPMSolverMultistepScheduler):
    """DPM-Solver(++) multistep with dynamic compensation: DC as a plug-in for a predictor-only solver.

    Same DC config keys as ``DCSolverScheduler``, but ``dc_ratios`` defaults to ``null`` (no CPR fit
    ships for it: search ratios with ``diffplug bench dc-search --solver dpm++``).  ODE variants only
    (``algorithm_type`` ``dpmsolver++`` or ``dpmsolver``).  Without a corrector the buffered outputs
    are already aligned with the samples; compensation here acts as a searched correction of the
    multistep extrapolation (the paper's plug-and-play claim).
    """

    def _init(self, *args, dc_ratios=None, dc_order=2, cpr_coefficients=None, cpr_guidance_scale=None, **kwargs):
        check_prediction_type(kwargs.get("prediction_type", "epsilon"))
        super().__init__(*args, **pop_flow_shift(kwargs))
        if self.config.algorithm_type not in ("dpmsolver++", "dpmsolver"):
            raise ValueError(
                f"DCDPMSolverScheduler supports algorithm_type 'dpmsolver++' or 'dpmsolver' (ODE), got "
                f"{self.config.algorithm_type!r}"
            )
        if self.config.variance_type is not None:
            raise ValueError("DCDPMSolverScheduler needs variance_type=None (models that predict only the mean)")
        self._dc_init(dc_ratios, dc_order, cpr_coefficients, cpr_guidance_scale)

    _init.__signature__ = merged_signature(DPMSolverMultistepScheduler.__init__, _dc_config, flow_shift_config, dc_ratios=None)
    __init__ = register_to_config(_init)
    del _init

    _data_prediction = property(lambda self: self.config.algorithm_type == "dpmsolver++")

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ):
        """DPM-Solver's ``set_timesteps`` (``sigmas`` is not supported by it)."""
        if sigmas is not None:
            raise ValueError("DCDPMSolverScheduler.set_timesteps does not take `sigmas`; pass num_inference_steps or timesteps")
        self._schedule_mu = mu
        self._check_set_timesteps(num_inference_steps, timesteps, sigmas)
        super().set_timesteps(num_inference_steps, device=None, mu=mu, timesteps=timesteps)
        self._after_set_timesteps(device, custom=timesteps is not None)

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        """One DPM-Solver multistep step with dynamic compensation (``generator`` unused: ODE only)."""
        prev = self._fast_step(model_output, timestep, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _orders(self, start: int):
        """DPM-Solver's order per step (warm-up, lower-order final steps); it has no corrector."""
        n, p, cfg = len(self._times), self.config.solver_order, self.config
        orders, correct = {}, {}
        for j in range(start, n):
            lower_final = j == n - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
            )
            lower_second = j == n - 2 and cfg.lower_order_final and n < 15
            done = min(j - start, p)  # lower_order_nums
            if p == 1 or done < 1 or lower_final:
                orders[j] = 1
            elif p == 2 or done < 2 or lower_second:
                orders[j] = 2
            else:
                orders[j] = 3
            correct[j] = False
        return orders, correct

    def _probe(self, j: int, order: int, corrector: bool) -> tuple[float, ...]:
        B = self._buffer_size
        updates = {
            1: lambda e: DPMSolverMultistepScheduler.dpm_solver_first_order_update(self, e[B], sample=e[0]),
            2: lambda e: DPMSolverMultistepScheduler.multistep_dpm_solver_second_order_update(self, e[1 : B + 1], sample=e[0]),
            3: lambda e: DPMSolverMultistepScheduler.multistep_dpm_solver_third_order_update(self, e[1 : B + 1], sample=e[0]),
        }
        return self._probe_with(j, updates[order], B + 1)


# --------------------------------------------------------------------------------------------------
# Ratio search (Sec. 3.3)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def reference_trajectory(model_fn: ModelFn, scheduler, noise: torch.Tensor, steps: int = 200) -> list[torch.Tensor]:
    """Ground truth at *exactly* the solver's points: a fine DDIM (eta = 0) run from ``noise``.

    On a flow-matching schedule (``x = (1 - s) x0 + s eps``) the DDIM step *is* the Euler step of the
    flow ODE, ``x' = x + (s' - s) v``: the reference is then a fine Euler trajectory.

    ``scheduler`` is a DC scheduler after ``set_timesteps``; returns ``[x_{t_0}, ..., x_{t_N}]`` (float32),
    ``x_{t_N}`` at the schedule's final noise level.  About ``steps`` model calls in total, split over the
    solver's intervals in proportion to their length in time, with the solver's own noise levels at its
    points and ``predictions.noise_levels`` in between.  ``model_fn(x, t)`` returns the model's output
    (the scheduler's prediction type) for the model input ``x`` at timestep ``t``.
    """
    ptype = _PREDICTION[scheduler.config.prediction_type]
    times = [float(t) for t in scheduler._times]
    N = len(times)
    a_knot, s_knot = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas.float())
    knots = [(scheduler.timesteps[j], float(a_knot[j]), float(s_knot[j])) for j in range(N)]
    knots.append((None, float(a_knot[N]), float(s_knot[N])))
    lengths = [times[j] - (times[j + 1] if j + 1 < N else 0.0) for j in range(N)]
    total = sum(lengths)
    subdiv = [max(1, round(steps * length / total)) for length in lengths]

    x = (noise * scheduler.init_noise_sigma).float()
    out = [x]
    for j in range(N):
        t_a, t_b = times[j], times[j + 1] if j + 1 < N else 0.0
        cur = knots[j]
        for k in range(1, subdiv[j] + 1):
            if k < subdiv[j]:
                u = torch.tensor(t_a + (t_b - t_a) * k / subdiv[j], device=x.device)
                a_u, s_u = noise_levels(scheduler, u.reshape(1))
                nxt = (u, float(a_u), float(s_u))
            else:
                nxt = knots[j + 1]
            x0, eps = split(model_fn(x, cur[0]).float(), x, cur[1], cur[2], ptype)
            x = nxt[1] * x0 + nxt[2] * eps  # DDIM, eta = 0
            cur = nxt
        out.append(x)
    return out


@dataclass
class SearchResult:
    ratios: list[float]  # one per step, ready for the ``dc_ratios`` config key
    losses_initial: list[float] = field(default_factory=list)  # per-step MSE to the reference at rho = 1
    losses_searched: list[float] = field(default_factory=list)  # per-step MSE at the chosen rho
    final_mse: float = float("nan")  # MSE of the sampler's result (searched ratios) to the reference
    searched_with: object = None  # the DC scheduler the ratios were searched for
    mu: float | None = None  # dynamic shifting's mu of the searched schedule (flow pipelines such as Flux)

    def scheduler(self):
        """The searched DC scheduler with these ratios in its config (``save_pretrained`` keeps them)."""
        return type(self.searched_with).from_config(self.searched_with.config, dc_ratios=list(self.ratios))


def search_ratios(
    model_fn: ModelFn,
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int | None = None,
    *,
    timesteps: list[int] | None = None,
    sigmas: list[float] | None = None,
    mu: float | None = None,
    reference: list[torch.Tensor] | None = None,
    reference_steps: int = 200,
    iters: int = 20,
    lr: float = 0.1,
) -> SearchResult:
    """Search the compensation ratios of a DC scheduler for one (model, guidance, NFE) setting.

    ``model_fn(x, t)`` is the guided denoiser (e.g. CFG already applied) returning the scheduler's
    prediction type; it is called without gradients.  ``noise`` is the batch of initial latents
    (the paper: 10 prompts x 10 noises).  At each step ``i >= dc_order`` the scalar ``rho_i`` (init 1)
    is optimised with AdamW(lr) for ``iters`` iterations on the MSE between the solver's next point —
    compensated predictor, then the next step's corrector, which costs one model call per iteration —
    and the reference trajectory at exactly that point (``reference_trajectory``, DDIM with
    ``reference_steps`` steps, unless ``reference`` is given).  Only the solver algebra is
    differentiated.  The best ``rho`` seen (``rho = 1`` included) is frozen and the real step taken.
    """
    if not isinstance(scheduler, _DynamicCompensation):
        raise TypeError("search_ratios needs a DCSolverScheduler or DCDPMSolverScheduler (from_config your scheduler)")
    sched = type(scheduler).from_config(scheduler.config, dc_ratios=None)
    sched.set_timesteps(num_inference_steps, device=noise.device, timesteps=timesteps, sigmas=sigmas, mu=mu)
    N = len(sched.timesteps)
    ref = reference_trajectory(model_fn, sched, noise, reference_steps) if reference is None else reference
    if len(ref) != N + 1:
        raise ValueError(f"reference must hold N + 1 = {N + 1} latents (one per solver point), got {len(ref)}")

    result = SearchResult(ratios=[1.0] * N, searched_with=type(sched).from_config(sched.config), mu=mu)
    x = (noise * sched.init_noise_sigma).float()
    with torch.no_grad():
        for i in range(N):
            t = sched.timesteps[i]
            out = model_fn(sched.scale_model_input(x, t), t).float()
            if sched.step_index is not None and i - sched._start >= sched.config.dc_order:
                rho, l0, l1 = _search_step(sched, i, out, x, ref[i + 1], model_fn, iters, lr)
                sched._dc_ratios[i] = result.ratios[i] = rho
                result.losses_initial.append(l0)
                result.losses_searched.append(l1)
            x = sched.step(out, t, x).prev_sample
    result.final_mse = float(torch.mean((x - ref[-1]) ** 2))
    return result


def _search_step(sched, i, model_output, sample, target, model_fn, iters, lr):
    """Optimise rho_i; returns ``(rho, loss at rho=1, loss at rho)``."""
    x_c, buffer, start = sched._trial(i, model_output, sample)
    next_corrector = sched._has_corrector(i + 1, start)
    t_next = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else None

    def loss_at(rho):
        x_next, buf = sched._dc_predict(i, start, x_c, buffer, rho)
        if next_corrector:  # the next UniC, with the network output at the predicted point held fixed
            x_in = x_next.detach()
            out_next = model_fn(sched.scale_model_input(x_in, t_next), t_next).float()
            x_next = sched._correct(i + 1, start, x_c, buf, out_next, x_in)
        return torch.mean((x_next - target) ** 2)

    rho = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64, device=sample.device))
    opt = torch.optim.AdamW([rho], lr=lr)
    tried = []
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad()
            loss = loss_at(rho)
            tried.append((float(loss.detach()), float(rho.detach())))  # host reads: the search is offline
            loss.backward()
            opt.step()
        with torch.no_grad():
            tried.append((float(loss_at(rho.detach())), float(rho)))
    best_loss, best_rho = min(tried)
    return best_rho, tried[0][0], best_loss


@torch.no_grad()
def search_ratios_for_pipe(
    pipe,
    prompts: Sequence[str],
    guidance_scale: float = 7.5,
    num_inference_steps: int = 5,
    *,
    guidance=None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    reference_steps: int = 200,
    iters: int = 20,
    lr: float = 0.1,
    mu: float | None = None,
    **family_kwargs,
) -> SearchResult:
    """``search_ratios`` on a diffusers pipeline: one noise per prompt, CFG at ``guidance_scale``.

    Flow-matching pipelines (Flux, SD3, ...) are searched on their own flow schedule (``sigmas``,
    dynamic shifting's ``mu``) against a fine Euler trajectory of the flow ODE (DDIM with eta = 0 on
    the flow path *is* the Euler step, ``reference_trajectory``).  ``mu`` replaces the pipeline's
    own dynamic-shift ``mu`` (to search other resolutions' schedules at this one).

    ``pipe.scheduler`` is the scheduler searched for: a DC scheduler, or any scheduler a
    ``DCSolverScheduler`` is made from (``from_config``); it is left in place.  The pipeline's prompt
    encoding, latents, schedule arguments and denoiser call come from ``diffplug.pipelines``' family
    adapter (``guided_denoiser``, ``pipeline_schedule``).  ``result.scheduler()`` gives the
    scheduler to sample with.
    """
    sched = pipe.scheduler
    if not isinstance(sched, _DynamicCompensation):
        sched = DCSolverScheduler.from_config(sched.config)
    model_fn, x_T = guided_denoiser(
        pipe, prompts, guidance_scale, guidance=guidance, latents=latents, generator=generator,
        height=height, width=width, scheduler=sched, **family_kwargs,
    )  # fmt: skip
    schedule = pipeline_schedule(pipe, sched, num_inference_steps, x_T, **family_kwargs)
    if mu is not None:
        if not sched.config.get("use_dynamic_shifting"):
            raise ValueError("mu: this pipeline's scheduler does not use dynamic shifting (use_dynamic_shifting=False)")
        schedule["mu"] = float(mu)
    return search_ratios(model_fn, sched, x_T, reference_steps=reference_steps, iters=iters, lr=lr, **schedule)


def guided_denoiser(
    pipe,
    prompts: Sequence[str],
    guidance_scale: float = 7.5,
    *,
    guidance=None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler=None,
    **family_kwargs,
):
    """``(model_fn, x_T)`` for a pipeline: the guided prediction ``model_fn(x, t)`` and one noise per prompt.

    Prompts, latents and the denoiser call go through ``diffplug.pipelines``' family adapter, the
    passes are combined by ``guidance`` (default ``CFG(guidance_scale)``), as in ``from_pipe``.
    ``scheduler`` (default ``pipe.scheduler``) gives the noise levels a guidance may ask for.
    """
    from ..guidance.base import CFG, Guidance
    from ..pipelines import evaluate, family_of
    from ..predictions import StepContext, prediction_type_of

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("at least one prompt is needed (the paper searches on 10)")
    scheduler = pipe.scheduler if scheduler is None else scheduler
    family = family_of(pipe)
    default_h, default_w = family.default_size()
    height, width = height or default_h, width or default_w
    conditions = family.encode(
        prompt=prompts, negative_prompt=None, num_images_per_prompt=1, prompt_embeds=None,
        negative_prompt_embeds=None, height=height, width=width, **family_kwargs,
    )  # fmt: skip
    x_T = family.prepare_latents(len(prompts), height, width, generator, latents)
    guidance = CFG(guidance_scale) if guidance is None else guidance
    fields = list(conditions)
    ptype = prediction_type_of(scheduler)

    @torch.no_grad()
    def model_fn(x, t):
        guidance.set_state(step=0, num_inference_steps=1, timestep=t)
        if isinstance(guidance, Guidance):
            alpha, sigma = noise_levels(scheduler, torch.as_tensor(t, device=x.device).reshape(1))
            guidance.set_context(StepContext(x, alpha[0], sigma[0], ptype))
        batches = guidance.prepare_inputs(conditions)
        for batch, pred in zip(batches, evaluate(family.model, x, t, batches, fields)):
            batch.noise_pred = pred
        return guidance(batches).pred.float()

    return model_fn, x_T


def pipeline_schedule(pipe, scheduler, num_inference_steps: int, latents: torch.Tensor, **family_kwargs) -> dict:
    """The ``set_timesteps`` arguments the pipeline would pass ``scheduler`` (``sigmas`` for flow models,
    ``mu`` for dynamic shifting, ...), found by letting its family adapter set a throw-away copy."""
    import functools

    from ..pipelines import family_of

    reset = {"dc_ratios": None} if isinstance(scheduler, _DynamicCompensation) else {}
    probe = type(scheduler).from_config(scheduler.config, **reset)
    calls = []

    @functools.wraps(probe.set_timesteps)
    def record(*args, **kwargs):
        calls.append(inspect.signature(probe.set_timesteps).bind(*args, **kwargs).arguments)
        return type(probe).set_timesteps(probe, *args, **kwargs)

    probe.set_timesteps = record
    original = pipe.scheduler
    try:
        pipe.scheduler = probe
        family_of(pipe).timesteps(num_inference_steps, latents=latents, **family_kwargs)
    finally:
        pipe.scheduler = original
    return {k: v for k, v in calls[-1].items() if k != "device"}
