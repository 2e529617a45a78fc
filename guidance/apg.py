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
* **Cheap conversion.** For a fixed ``z_t`` the map x0 → model output is affine, ``out = a z_t + k x0``
  (ε: k = −α/σ; v: k = −1/σ; flow: k = −1/σ; x0: k = 1), and k is read from the shared helper
  (``StepContext.from_x0``), not re-derived. Hence ``out_c − out_u = k Δ`` and
  ``out̃ = out_c + (w − 1) k (Δ⊥ + η Δ∥)``: only ``D_c`` needs a full conversion, nothing is converted
  back, and with η = 1, r off, β = 0 no k enters at all (exactly CFG). This is algebraically the
  same as converting D_u and D_c to x0, guiding, and converting D̃ back.
* **α_t → 0** (first step of zero-terminal-SNR schedules, ε-prediction): α is clamped to 1e-4 for the
  conversion so everything stays finite; there k ≈ 0 and the step is effectively conditional-only.
* **Momentum** is updated only at steps where APG runs (inside ``[start, stop)``), is reset at every
  new generation (step 0, via ``reset()``) and whenever the latent shape changes.
* **Precision.** The update runs in float32 (float64 if the inputs are float64); the two inner
  products of the projection are accumulated in float64. ``‖D_c‖ = 0`` is guarded.
* **Defaults** ``norm_threshold=15, momentum=−0.5, eta=0`` are the values diffusers' APG PR took
  from the paper's SDXL setting (Table 10) — r is in latent units of the space APG runs in and must
  be re-tuned per model family and resolution (see benchmarks/guidance_results.md for the testbed).

The maths is a few dozen tensor ops on the whole batch, no Python loop over samples and no host
sync (``apg_step`` below); benchmarks/guidance_apg_timing.py times it against diffusers' guider.
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


def apg_step(
    delta: torch.Tensor,
    pred_cond: torch.Tensor,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
    momentum: float = 0.0,
    running: torch.Tensor | None = None,
    slope: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One APG update of the guidance difference; returns ``(g, M_t)`` with ``g = k (Δ⊥ + η Δ∥)``.

    The guided output is ``out_c + (w − 1) g`` (APG.forward writes it as CFG plus a correction,
    ``out_u + w·delta + (w − 1)(g − delta)``, so that the neutral setting is CFG bit for bit).

    ``delta`` is the model-output difference ``out_c − out_u``; ``pred_cond`` is D_c, the vector the
    update is projected against; ``slope`` is k, with ``Δ_x0 = delta / k`` (1 in model-output space);
    ``running`` is M_{t−1} in x0 units (None at the first step). Every step is linear in Δ except the
    norm test, so the update is formed in output units (``k M_t`` and the bound ``r |k|``); only the
    momentum state is kept in x0 units, because k changes from step to step. ``M_t`` comes back
    flattened to (B, N) for the next step (None when β = 0).
    """
    shape, batch = delta.shape, delta.shape[0]
    d = delta.reshape(batch, -1)  # k Δ_t
    c = pred_cond.reshape(batch, -1)
    # reverse momentum: M_t = Δ_t + β M_{t−1}   (here k M_t = k Δ_t + β k M_{t−1})
    if running is not None and momentum != 0.0:
        d = torch.add(d, running, alpha=momentum) if isinstance(slope, float) else d + (momentum * slope) * running
    m = None if momentum == 0.0 else (d if isinstance(slope, float) else d * slope.reciprocal())
    # norm rescaling: Δ ← Δ · min(1, r / ‖Δ‖)   (‖Δ‖ = ‖k Δ‖ / |k|)
    if norm_threshold > 0:
        norm = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        limit = norm_threshold * (abs(slope) if isinstance(slope, float) else slope.abs())
        d = d * (limit / norm).clamp(max=1.0)  # ‖Δ‖ = 0 gives inf -> 1: no division guard needed
    # projection onto D_c, inner products accumulated in float64: Δ⊥ + η Δ∥ = Δ + (η − 1) (⟨Δ, D_c⟩ / ‖D_c‖²) D_c
    if eta != 1.0:
        coef = _dot(d, c) / _dot(c, c).clamp_min(1e-300)
        d = torch.addcmul(d, ((eta - 1.0) * coef).to(d.dtype), c)
    return d.reshape(shape), m


_COMPILED = {}


def _step_fn(compiled: bool):
    if not compiled:
        return apg_step
    if "apg_step" not in _COMPILED:
        _COMPILED["apg_step"] = torch.compile(apg_step, dynamic=False)
    return _COMPILED["apg_step"]


class APG(Guidance):
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025) — a drop-in replacement for CFG.

    Args:
        guidance_scale: ``w`` in ``uncond + w (cond − uncond)`` (w = 1: no guidance).
        eta: weight η of the parallel component (0: dropped, the paper's recommendation; 1: kept).
        norm_threshold: ``r``, the bound on ‖Δ_t‖ per sample; ``<= 0`` disables rescaling.
        momentum: ``β`` of the running average ``M_t = Δ_t + β M_{t−1}`` (negative: reverse momentum;
            0 disables it).
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
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        super().__init__(guidance_scale, start, stop, enabled)
        self.eta = float(eta)
        self.norm_threshold = float(norm_threshold)
        self.momentum = float(momentum)
        self.space = space
        self.compile = bool(compile)
        self._running: torch.Tensor | None = None
        self._warned = False

    def reset(self) -> None:
        self._running = None

    def _x0_frame(self, pred_cond: torch.Tensor):
        """``(D_c, k)``: the conditional denoised prediction and the slope k of x0 → model output."""
        ctx = self._context
        if self.space == "model_output" or ctx is None:
            if self.space == "x0" and not self._warned:
                warnings.warn(
                    "APG(space='x0') got no StepContext (a modular pipeline, or a loop that does not call "
                    "set_context): projecting the raw model output instead, as diffusers' APG does. Run it "
                    "through diffplug.pipelines.from_pipe for the paper's x0-space update.",
                    stacklevel=3,
                )
                self._warned = True
            return pred_cond, 1.0
        if ctx.prediction_type == "epsilon":
            ctx = type(ctx)(ctx.sample, ctx.alpha.clamp_min(_MIN_ALPHA), ctx.sigma, ctx.prediction_type)
        slope = ctx.from_x0(1.0, sample=0.0)  # k = d(model output) / d(x0), a 0-d tensor
        return ctx.to_x0(pred_cond), slope

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        if pred_uncond is None:
            return self.output(pred_cond, pred_cond)
        dtype = pred_cond.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        out_c, out_u = pred_cond.to(work), pred_uncond.to(work)
        d_cond, slope = self._x0_frame(out_c)
        delta = out_c - out_u  # = k (D_c − D_u)
        running = self._running
        if running is not None and running.shape != (delta.shape[0], math.prod(delta.shape[1:])):
            running = None  # a new latent shape: a new generation
        g, self._running = _step_fn(self.compile)(delta, d_cond, self.eta, self.norm_threshold, self.momentum, running, slope)
        # D̃ = D_c + (w − 1) g  written as  CFG + (w − 1)(g − Δ): exactly CFG when APG changes nothing
        w = self.guidance_scale
        guided = torch.add(out_u + w * delta, g - delta, alpha=w - 1.0)
        return self.output(guided.to(dtype), pred_cond, pred_uncond)
