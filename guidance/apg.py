"""Adaptive Projected Guidance (APG).

S. Sadat, O. Hilliges, R. M. Weber, *Eliminating Oversaturation and Artifacts of High Guidance
Scales in Diffusion Models*, ICLR 2025, arXiv:2410.02416 (Sec. 4-5 and the PyTorch listing of
Algorithm 1 in the appendix).

With ``D_c = D(z_t, t, y)`` and ``D_u = D(z_t, t, ∅)`` the conditional / unconditional *denoised*
predictions and ``w`` the CFG scale (``uncond + w (cond - uncond)``, so w = 1 is no guidance), one
step of APG is::

    Δ_t   = D_c − D_u                                   guidance difference
    M_t   = Δ_t + β M_{t−1},   M_{−1} = 0               reverse momentum (β < 0); Δ_t ← M_t
    Δ_t  ← Δ_t · min(1, r / ‖Δ_t‖)                      norm rescaling (r ≤ 0: off)
    Δ∥    = (⟨Δ_t, D_c⟩ / ‖D_c‖²) D_c,   Δ⊥ = Δ_t − Δ∥   projection onto the conditional prediction
    D̃     = D_c + (w − 1)(Δ⊥ + η Δ∥)                    guided denoised prediction

in that order (momentum, rescale, project), as in Algorithm 1. With η = 1, r off and β = 0 this is
exactly CFG. Norms and inner products run over every non-batch dimension, per sample.

Choices made here (the paper is silent or the spec asked us to decide):

* **Space.** ``space="x0"`` (default) applies the update to the denoised predictions, as the paper
  does, for ε-, v-, x0- and flow-prediction models; the loop's :class:`~diffplug.predictions.StepContext`
  supplies ``(z_t, α_t, σ_t)``. ``space="model_output"`` applies the same formulas to the raw model
  outputs, which is what diffusers' ``AdaptiveProjectedGuidance(use_original_formulation=True,
  guidance_scale=w - 1)`` computes. Modular pipelines never give a context: x0 space then falls back
  to model-output space with a one-time warning.
* **Cheap conversion.** For a fixed ``z_t`` the x0 of a model output is affine, ``D = p z_t + (1/k) out``
  (ε: ``D = (z_t − σ ε)/α``, k = −α/σ; v: k = −1/σ; flow: k = −1/σ; x0: k = 1; :func:`x0_frame`, checked
  against ``predictions.split`` in the tests). Hence ``D_c − D_u = (out_c − out_u)/k``, the projection
  only needs the direction of D_c (``u = α D_c = z_t − σ ε_c`` for ε: one op, no division) and
  ``out̃ = out_c + (w − 1) k (Δ⊥ + η Δ∥)``: nothing is converted back. This is algebraically the same
  as converting D_u and D_c to x0, guiding, and converting D̃ back; η = 1, r off, β = 0 is CFG exactly.
* **α_t → 0** (first step of zero-terminal-SNR schedules, ε-prediction): α is clamped to 1e-4 for the
  conversion so everything stays finite; there k ≈ 0 and the step is effectively conditional-only.
* **Momentum** is updated only at steps where APG runs (inside ``[start, stop)``), is reset at every
  new generation (step 0, via ``reset()``) and whenever the latent shape changes.
* **Precision.** The update runs in float32 (float64 if the inputs are float64), sums included: the
  paper's listing projects in float64, but on the testbed shape the float32 result is as close to a
  float64 reference as the earlier float64-accumulated one (both ~1e-6 of the output's scale, tests).
  ``‖D_c‖ = 0`` is guarded (nothing is projected).
* **Defaults** ``norm_threshold=15, momentum=−0.5, eta=0`` are the values diffusers' APG PR took
  from the paper's SDXL setting (Table 10) — r is in latent units of the space APG runs in and must
  be re-tuned per model family and resolution (see benchmarks/guidance_results.md for the testbed).

Cost: 14 ATen ops per step for ε in x0 space (11 in model-output space), all on the whole batch, with
no Python loop over samples, no host sync, and no allocation but the result (``apg_update`` works in
buffers kept across steps); ``tests/test_guidance_apg.py`` counts them, and
benchmarks/guidance_apg_timing.py times them against CFG and diffusers' guider.
The paper's equation numbers could not be checked offline, so comments name Algorithm 1's steps.
"""

from __future__ import annotations

import math
import warnings

import torch
from diffusers.configuration_utils import register_to_config

from .base import Guidance

SPACES = ("x0", "model_output")
_MIN_ALPHA = 1e-4


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product of two (B, N) tensors as (B, 1) float64 (products in the inputs'
    precision, the sum accumulated in float64)."""
    return torch.sum(a * b, dim=1, keepdim=True, dtype=torch.float64)


def x0_frame(kind: str, sample, alpha, sigma, out_c: torch.Tensor, u: torch.Tensor):
    """Write a multiple of ``D_c`` into ``u``; return ``(s, sign)`` with ``D_c − D_u = sign·s·(out_c − out_u)``.

    ``predictions.split`` at a fixed ``x_t`` is affine in the model output; this is its slope and
    direction in one or two ops (tests check it against ``split``). ``kind`` "model_output": ``u = out_c``.
    """
    if kind == "epsilon":  # D = (x − σ ε)/α: u = α D; α clamped (zero-terminal-SNR first step)
        torch.addcmul(sample, out_c, sigma, value=-1.0, out=u)
        return sigma / alpha.clamp_min(_MIN_ALPHA), -1.0
    if kind == "flow":  # D = x − σ u
        torch.addcmul(sample, out_c, sigma, value=-1.0, out=u)
        return sigma, -1.0
    if kind == "v_prediction":  # D = α x − σ v
        torch.mul(sample, alpha, out=u).addcmul_(out_c, sigma, value=-1.0)
        return sigma, -1.0
    u.copy_(out_c)  # "sample" (D = out) and model-output space
    return 1.0, 1.0


class _Workspace:
    """Buffers kept across steps, so a step allocates nothing but its result. ``M`` and ``u`` sit side
    by side in ``pair``, so one product and one sum give ``⟨M,u⟩`` and ``‖u‖²``; ``stats`` holds those
    and ``‖M‖`` together, so one clamp applies both floors."""

    def __init__(self, like: torch.Tensor, norm_threshold: float):
        small = (like.shape[0],) + (1,) * (like.ndim - 1)
        self.key = (like.shape, like.dtype, like.device, norm_threshold)
        self.pair = like.new_empty((2, *like.shape))
        self.m, self.u = self.pair.unbind(0)  # M_t in x0 units; u ∝ D_c
        self.prod = torch.empty_like(self.pair)
        self.tmp = torch.empty_like(like)  # delta, then V
        self.dims = tuple(range(1, like.ndim))  # per-sample reductions of M; of pair: shifted by one
        self.pair_dims = tuple(d + 1 for d in self.dims)
        self.stats = like.new_empty((3, *small))  # ⟨M,u⟩, ‖u‖², ‖M‖
        self.dots, self.norm = self.stats[:2], self.stats[2]
        self.mu, self.uu = self.stats[0], self.stats[1]
        # floors: ‖u‖² > 0 (D_c = 0 projects nothing); ‖M‖ >= r, so r/‖M‖ becomes min(1, r/‖M‖)
        floor = [-math.inf, torch.finfo(like.dtype).tiny, max(norm_threshold, 0.0)]
        self.floor = torch.tensor(floor, dtype=like.dtype, device=like.device).view(3, *(1,) * len(small))
        self.coef, self.scale = like.new_empty(small), like.new_empty(small)
        self.fresh = True  # M_{t−1} = 0


def apg_update(ws: _Workspace, out_c, out_u, frame, w: float, eta: float, norm_threshold: float, momentum: float):
    """One step of Algorithm 1 on the model outputs; returns the guided output.

    ``frame = (s, sign)`` from :func:`x0_frame` (``ws.u`` already holds ``u ∝ D_c``). With
    ``Δ_t = s·delta`` (x0 units) and ``k = sign/s`` the slope x0 → output::

        M_t = Δ_t + β M_{t−1}                      (in place in ws.m)
        V   = M_t + (η − 1) (⟨M_t, u⟩/‖u‖²) u       (= Δ⊥ + η Δ∥ before rescaling; u ∥ D_c)
        out = out_c + (w − 1) k min(1, r/‖M_t‖) V   (rescale folded into one per-sample divisor)
    """
    s, sign = frame
    tensor_s = isinstance(s, torch.Tensor)
    m, delta = ws.m, ws.tmp
    if sign < 0:  # Δ_t = s·delta with s > 0
        torch.sub(out_u, out_c, out=delta)
    else:
        torch.sub(out_c, out_u, out=delta)
    if ws.fresh or momentum == 0.0:
        torch.mul(delta, s, out=m)
    elif tensor_s:
        m.mul_(momentum).addcmul_(delta, s)
    else:
        m.mul_(momentum).add_(delta, alpha=s)
    ws.fresh = False
    rescale, project = norm_threshold > 0, eta != 1.0
    if project:
        torch.sum(torch.mul(ws.pair, ws.u, out=ws.prod), ws.pair_dims, keepdim=True, out=ws.dots)
    if rescale:
        torch.linalg.vector_norm(m, dim=ws.dims, keepdim=True, out=ws.norm)
    if project or rescale:
        ws.stats.clamp_(min=ws.floor)
    v = torch.addcmul(m, ws.u, torch.div(ws.mu, ws.uu, out=ws.coef), value=eta - 1.0, out=ws.tmp) if project else m
    if not rescale:  # k V
        return torch.addcdiv(out_c, v, s, value=(w - 1.0) * sign) if tensor_s else torch.add(out_c, v, alpha=(w - 1.0) * sign / s)
    # k·min(1, r/‖M‖) = sign·r / (s·max(‖M‖, r))
    scale = torch.mul(ws.norm, s, out=ws.scale) if tensor_s else ws.norm
    return torch.addcdiv(out_c, v, scale, value=(w - 1.0) * sign * norm_threshold / (1.0 if tensor_s else s))


_COMPILED = {}


def _update_fn(compiled: bool):
    if not compiled:
        return apg_update
    if "apg_update" not in _COMPILED:
        _COMPILED["apg_update"] = torch.compile(apg_update, dynamic=False)
    return _COMPILED["apg_update"]


class APG(Guidance):
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025) — a drop-in replacement for CFG.

    Args:
        guidance_scale: ``w`` in ``uncond + w (cond − uncond)`` (w = 1: no guidance).
        eta: weight η of the parallel component (0: dropped, the paper's recommendation; 1: kept).
        norm_threshold: ``r``, the bound on ‖Δ_t‖ per sample; ``<= 0`` disables rescaling.
        momentum: ``β`` of the running average ``M_t = Δ_t + β M_{t−1}``, in (-1, 1) (negative: the
            paper's reverse momentum, e.g. -0.5; 0 disables it).
        space: ``"x0"`` (paper; needs diffplug's loop) or ``"model_output"`` (diffusers' behaviour).
        start, stop: fractions of the steps between which APG runs; outside, conditional-only steps.
        compile: run the update through ``torch.compile`` (fuses its ops into a few kernels; on a GPU
            the eager update is launch-bound). Opt-in: the first steps pay the compilation.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        norm_threshold: float = 15.0,
        momentum: float = -0.5,
        space: str = "x0",
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        compile: bool = False,
    ):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        for name, value in (("guidance_scale", guidance_scale), ("eta", eta), ("norm_threshold", norm_threshold), ("momentum", momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not -1.0 < momentum < 1.0:  # M_t = Δ_t + β M_{t−1} sums β^k Δ_{t−k}: bounded only for |β| < 1
            raise ValueError(f"momentum={momentum!r}: must be in (-1, 1) (the running average grows without bound "
                             "otherwise); the paper uses negative values, e.g. -0.5 (SDXL), 0 disables it")
        super().__init__(guidance_scale, start, stop, enabled)
        self.eta = float(eta)
        self.norm_threshold = float(norm_threshold)
        self.momentum = float(momentum)
        self.space = space
        self.compile = bool(compile)
        self._ws: _Workspace | None = None
        self._warned = False

    def reset(self) -> None:
        if self._ws is not None:
            self._ws.fresh = True

    def _kind(self) -> str:
        """The space the update runs in: the context's prediction type, or "model_output"."""
        if self.space == "model_output":
            return "model_output"
        if self._context is None:
            if not self._warned:
                warnings.warn(
                    "APG(space='x0') got no StepContext (a modular pipeline, or a loop that does not call "
                    "set_context): projecting the raw model output instead, as diffusers' APG does. Run it "
                    "through diffplug.pipelines.from_pipe for the paper's x0-space update.",
                    stacklevel=3,
                )
                self._warned = True
            return "model_output"
        return self._context.prediction_type

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        if pred_uncond is None:
            return self.output(pred_cond, pred_cond)
        dtype = pred_cond.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        out_c, out_u = pred_cond.to(work), pred_uncond.to(work)
        w = self.guidance_scale
        if self.eta == 1.0 and self.norm_threshold <= 0 and self.momentum == 0.0:
            guided = out_u + w * (out_c - out_u)  # the neutral setting is CFG, bit for bit
            return self.output(guided.to(dtype), pred_cond, pred_uncond)
        ws = self._ws
        if ws is None or ws.key != (out_c.shape, work, out_c.device, self.norm_threshold):
            ws = self._ws = _Workspace(out_c, self.norm_threshold)  # a new latent shape: a new generation
        ctx, kind = self._context, self._kind()
        x, alpha, sigma = (ctx.sample, ctx.alpha, ctx.sigma) if kind != "model_output" else (None, None, None)
        frame = x0_frame(kind, x, alpha, sigma, out_c, ws.u)
        guided = _update_fn(self.compile)(ws, out_c, out_u, frame, w, self.eta, self.norm_threshold, self.momentum)
        return self.output(guided.to(dtype), pred_cond, pred_uncond)
