"""Feynman-Kac correctors (FKC): SMC sampling of CFG, products of experts and annealed targets.

M. Skreta, T. Akhound-Sadegh, V. Ohanesian, R. Bondesan, A. Aspuru-Guzik, A. Doucet, R. Brekelmans,
A. Tong, K. Neklyudov, *Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
Experts*, ICML 2025, arXiv:2503.02819. Official code: github.com/martaskrt/fkc-diffusion (MIT).

The target path is the geometric mixture of the models' noisy marginals (annealed by ``beta``)::

    p_t(x)  ∝  ( Π_i q^i_t(x)^{β_i} )^beta                                  (target path)

Particles follow the "target-score" SDE, whose drift uses ``s̄ = beta Σ_i β_i ∇log q^i_t`` and whose
diffusion is the model's own ``g_t``, and carry log-weights ``dlog w = G_t(x) dτ`` with::

    G_t = (Σβ − 1) ∇·f_t + (g_t²/2) (‖s̄‖² − Σ_i β'_i ‖s_i‖²),   β' = beta·β   (Props. 3.2, 3.3, CFG §3.3)

so that the self-normalised weighted particle measure tracks ``p_t`` (Feynman-Kac formula); SMC
resampling keeps the weights usable. Special cases (exponents on the model's ε predictions):

* CFG, ``p_c^w p_u^{1−w}``: drift = the usual CFG prediction, ``G = (g²/2) w(w−1) ‖s_c − s_u‖²``;
* product of experts ``q¹ q²``: drift uses ``s₁ + s₂``, ``G = g² ⟨s₁, s₂⟩`` (+ the ∇·f constant);
  the experts are two prompts of one model or two models that share the forward process and latent
  space (``ProductGuidance(second_model=...)``: Prop. 3.3 only asks for the same ``f``, ``g``);
* annealing ``q^β``: drift ``β g² s``, ``G = β(β−1)/2 · g² ‖s‖²`` (target-score variant).

**Discretisation used here.** In VE coordinates ``y = x/α`` (``∇·f = 0``, so the constant term
vanishes) with ``ŝ = σ/α`` and scores ``s_i = −ε_i/ŝ``, and ``∫ g² dτ = ŝ_t² − ŝ_{t'}²`` over a step,
a left-point rule gives, per particle and step, with ``ρ = ŝ_{t'}²/ŝ_t² = SNR_t/SNR_{t'}``::

    Δlog w = ((1 − ρ)/2) · ( ‖Σ_i β'_i ε_i‖² − Σ_i β'_i ‖ε_i‖² )                      (*)

which is finite for every schedule (flow matching starts at ŝ = ∞: ρ = 0). The move integrates
the target-score SDE over the step with the x0 residual ``D = Σβ'_i D_i`` (``D_i = y − ŝ ε_i``, the
models' x0 predictions) held fixed: with ``c = Σβ'`` the drift ``−g² s̄ = (c y − D) dŝ²/ŝ²`` is
linear in y, and solving it exactly (in ŝ² from ŝ_t² to ŝ_{t'}²) gives::

    x_{t'} = (α_{t'} ρ^c/α_t) x_t + α_{t'} ((1 − ρ^c)/c) D + σ_{t'} √((1 − ρ^{2c−1})/(2c − 1)) z   (**)

(z ~ N(0, I); at 2c = 1 the root is √(−log ρ)). At c = 1 (CFG) this is the ancestral (DDPM
posterior, DDIM η = 1) step towards ``D``. It stays finite at flow's σ = 1 (α = 0, ρ = 0) for
c > 1/2, where a left-point step towards the target's x0 ``D̄ = D − (c − 1) y`` would not: there
``y = x/α`` is infinite, because the target's marginal ``N(0, σ²/c)`` is not the noise the model
was trained from, so it has no x0 (the scores −ε/σ themselves are finite). For c ≤ 1/2 the
target at σ = 1 is at least √2 times wider than the noise and no move from there has finite
variance: such targets are refused on schedules that start at σ = 1.

The scheduler only supplies the timesteps and noise levels (``predictions.noise_levels``), so any
single-noise-level schedule works (DDIM/DDPM, Euler, Euler-ancestral, flow matching); schedules that
revisit a noise level (Heun, KDPM2) are refused, and so are multistep solvers (UniPC, DPM-Solver,
DEIS, DC-Solver, ...): FKC would ignore their update (the multistep extrapolation, DC-Solver's
compensation) and give what DDIM's noise levels give, so it says so instead of running.

**Accuracy.** The left-point weights and the move (**) are first order in the step (the move is
exact for the part of the drift linear in y).
On the 1-D Gaussian-mixture toy (``tests/test_fkc.py``) 200 DDIM steps put the weighted moments
within a few percent of the target; the error shrinks with the number of steps (checked up to
1000 on an annealed Gaussian). An Euler-Maruyama move (noise ``ŝ_t² − ŝ_{t'}²`` instead of the
posterior's ``ρ(ŝ_t² − ŝ_{t'}²)``) errs the other way by a similar amount; the ancestral move is
kept because at Σβ' = 1 it is the scheduler's own DDIM η = 1 / Euler-ancestral step (tested).
Product and annealed targets are checked on flow toys starting at σ = 1 (``tests/test_fkc.py``).
A guidance window (CFG ``start``/``stop``) changes the target mid-run and makes it inexact.

**Initial particles.** At the start ``q^i_T ≈ N(0, σ_T²)`` for every model, so ``p_T`` is
``N(0, σ_T²/(beta Σβ))``: ``begin`` scales the initial latents by ``(beta Σβ)^{-1/2}`` (a no-op for
CFG, where Σβ = 1; 1/√2 for a two-expert product, as in the official product notebook).

**What was verified, and against what** (read only, nothing copied):

* CFG weight: official EDM2 code ``applications/images/edm2/generate_images.py`` (EDM, σ = t,
  g² = 2t): ``Δa = −w(w−1)‖s_u − s_c‖² (t_next − t_hat) t_hat`` — the left-point rule of (*) in EDM
  units; drift = CFG-combined denoiser. Its SMC: centre ``Δa``, clamp to [−2, 2] (Heun) / [−1, 1]
  (Euler-Maruyama), systematic resampling every step (weights clipped at 1e-6), no update at the
  last step, first particle of each group returned. Here clamping is off by default (it biases the
  target), resampling is ESS-triggered by default and the last step *is* weighted.
* Product (Prop. 3.3): official notebook ``notebooks/diffusion_product.ipynb`` (read in the fork
  hlu2413/fkc-diffusion, which carries the notebooks): drift ``−f + g²(s₁+s₂)``, noise ``g``,
  ``dw = dt (2 ∂_t log α + g² ⟨s₁, s₂⟩)`` in 2-D (``∇·f = d ∂_t log α`` with d = 2 and Σβ−1 = 1),
  initial particles ``N(0, I)/√2``, systematic resampling every step — matches the formula above.
* Annealing (Prop. 3.2, target-score form): ``notebooks/diffusion_annealed.ipynb``: drift
  ``−f + β g² s``, noise ``g``, ``dw = (β−1)∇·f + ½ g² β(β−1)‖s‖²``, initial ``N(0, I)/√β`` —
  matches. (The tempered-noise variant needs ∇·s and is not implemented.)
* The general formula G was re-derived from the Fokker-Planck equations (VE, ``∂_t q = ½g²Δq``):
  it reduces to all three. The toy ground-truth tests (``tests/test_fkc.py``) check it numerically.
* Not verified: the paper's image-experiment numbers (EDM2-XS, CLIP / ImageReward tables).

Layout: the batch is ``[groups × K]`` (``K = num_particles``, e.g. ``num_images_per_prompt = K``):
particles of one group (one prompt) are resampled only among themselves. Per-particle noise comes
from the pipeline's generator(s) (a list gives one stream per row). Nothing is read back to the host
during sampling: the resampling decision is a per-group ``where``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.utils.torch_utils import randn_tensor

from ..guidance.base import CFG, Guidance
from ..predictions import noise_levels

__all__ = [
    "RESAMPLERS",
    "FKCOutput",
    "check_scheduler",
    "FKCSampler",
    "ProductGuidance",
    "effective_sample_size",
    "encode_condition",
    "fkc_log_weight_increment",
    "resample_indices",
]

RESAMPLERS = ("systematic", "stratified", "multinomial")
OUTPUTS = ("resampled", "best")


# -- SMC pieces ------------------------------------------------------------------------------------
def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / Σ w̄_k² of the normalised weights, per row of ``log_weights`` ([..., K])."""
    w = torch.softmax(log_weights.double(), dim=-1)
    return (1.0 / (w * w).sum(-1)).to(log_weights.dtype)


def resample_indices(log_weights: torch.Tensor, scheme: str = "systematic", generator=None) -> torch.Tensor:
    """Ancestor indices ``[G, K]`` (within each row) drawn ∝ ``softmax(log_weights)`` per row.

    systematic: one uniform per row, ``u_k = (U + k)/K``; stratified: ``u_k = (U_k + k)/K``;
    multinomial: K independent draws. All three are unbiased: E[#copies of k] = K w̄_k.
    """
    if scheme not in RESAMPLERS:
        raise ValueError(f"resample must be one of {RESAMPLERS}, got {scheme!r}")
    G, K = log_weights.shape
    device = log_weights.device
    gen_device = generator.device if generator is not None else device
    w = torch.softmax(log_weights.double(), dim=-1)
    if scheme == "multinomial":
        idx = torch.multinomial(w.to(gen_device), K, replacement=True, generator=generator)
        return idx.to(device)
    U = torch.rand((G, 1) if scheme == "systematic" else (G, K), generator=generator, device=gen_device, dtype=torch.float64)
    u = (U.to(device) + torch.arange(K, device=device, dtype=torch.float64)) / K
    cdf = torch.cumsum(w, dim=-1)
    cdf[:, -1] = 1.0  # guard against round-off leaving the last bin short of 1
    return torch.searchsorted(cdf, u, right=True).clamp_(max=K - 1)


def fkc_log_weight_increment(eps: list[torch.Tensor], exponents: list[float], rho) -> torch.Tensor:
    """Δlog w per particle, eq. (*): ``((1 − ρ)/2) (‖Σ β_i ε_i‖² − Σ β_i ‖ε_i‖²)``.

    ``eps``: each model's ε prediction (any shape ``[B, ...]``); ``exponents``: β'_i; ``rho``:
    ``SNR_t / SNR_{t'}`` of the step. Zero when one exponent is 1 and the others 0 (plain sampling).
    """
    eps = [e.double() for e in eps]  # the difference below cancels; float32 would lose it in high dims
    mixed = sum(b * e for b, e in zip(exponents, eps))
    dims = list(range(1, mixed.ndim))
    energy = mixed.square().sum(dims) - sum(b * e.square().sum(dims) for b, e in zip(exponents, eps))
    return (0.5 * (1.0 - rho) * energy).float()


def _move_coefficients(a: float, s: float, a1: float, s1: float, c: float) -> tuple[float, float, float]:
    """``(c_x, c_D, c_z)`` of the move (**) from ``(α, σ)`` to ``(α', σ')`` for exponents summing to ``c``."""
    if s1 == 0.0:  # the last step, to clean data: the limit σ' → 0 of the lines below
        return 0.0, a1 / c, 0.0
    rho = (s1 * a) ** 2 / (a1 * s) ** 2  # SNR_t / SNR_t' in [0, 1); 0 at flow's σ = 1
    if rho == 0.0 and c <= 0.5:
        raise ValueError(_WIDE_AT_NOISE.format(c=c))
    c_x = 0.0 if a == 0.0 else a1 * rho**c / a
    if math.isclose(2 * c, 1.0):
        var = -math.log(rho) if rho > 0 else math.inf
    else:
        var = (1.0 - rho ** (2 * c - 1)) / (2 * c - 1)
    return c_x, a1 * (1.0 - rho**c) / c, s1 * math.sqrt(var)


_WIDE_AT_NOISE = (
    "FKCSampler: this target's exponents sum to {c:g} <= 1/2 and the schedule starts at sigma = 1 (flow "
    "matching, alpha = 0): the target's marginal there, N(0, 1/{c:g}), is wider than the noise the model starts "
    "from, and no move from it has finite variance. Use exponents summing to more than 1/2 (e.g. beta > 0.5 "
    "for plain annealing) or a schedule that starts below sigma = 1"
)


def check_scheduler(scheduler) -> None:
    """Refuse a scheduler whose update FKC would ignore: a multistep ODE solver.

    FKC moves the particles itself (the stochastic step (**)) and reads only the schedule's noise
    levels; a multistep solver's update (UniPC, DPM-Solver, DEIS, SA-Solver, DC-Solver's dynamic
    compensation) would be silently dropped, and FKC with it would equal FKC with any scheduler of
    the same timesteps.
    """
    from ..samplers.unipc import PrecomputedSteps

    name = type(scheduler).__name__
    if isinstance(scheduler, PrecomputedSteps) or "solver_order" in getattr(scheduler, "config", {}):
        what = "dynamic compensation and multistep UniPC update" if "dc_order" in scheduler.config else "multistep update"
        raise ValueError(
            f"FKCSampler cannot use {name}: FKC moves the particles with its own stochastic step and takes only "
            f"noise levels from the scheduler, so {name}'s {what} would be ignored (FKC with it equals FKC with "
            "DDIM at the same timesteps). Use a single-step scheduler: DDIMScheduler, DDPMScheduler, "
            "EulerAncestralDiscreteScheduler, EulerDiscreteScheduler or FlowMatchEulerDiscreteScheduler"
        )


# -- guidance exponents ----------------------------------------------------------------------------
SUPPORTED_GUIDANCE = (
    "CFG (diffplug.guidance.CFG or diffusers' ClassifierFreeGuidance), ProductGuidance, "
    "or a guidance that defines fkc_exponents()"
)


def _exponents(guidance, names: list[str]) -> dict[str, float]:
    """The geometric-mixture exponents β_i the guidance applies at this step, keyed by batch name.

    Only guidance whose combination *is* a geometric mixture can be weighted: CFG (exponents w and
    1 − w), ProductGuidance, or one that states its exponents (``fkc_exponents``). APG (projection,
    rescaling, momentum), Adaptive Guidance and LinearAG (passes dropped or estimated) are refused:
    weighting them as CFG would sample a target they do not define.
    """
    if hasattr(guidance, "fkc_exponents"):
        exps = dict(guidance.fkc_exponents())
    elif isinstance(guidance, (CFG, ClassifierFreeGuidance)):
        if getattr(guidance, "guidance_rescale", 0.0):
            raise ValueError(
                "FKCSampler: CFG with guidance_rescale > 0 is not a geometric mixture; set guidance_rescale=0"
            )
        w = float(guidance.guidance_scale)
        if getattr(guidance, "use_original_formulation", False):  # cond + w (cond - uncond)
            w = w + 1.0
        exps = {"pred_cond": w, "pred_uncond": 1.0 - w}
    else:
        raise ValueError(
            f"FKCSampler cannot weight {type(guidance).__name__}: its combination of the model's passes is not a "
            f"geometric mixture of their densities. Supported guidance: {SUPPORTED_GUIDANCE}"
        )
    if set(names) == {"pred_cond"} and "pred_cond" in exps and len(names) < len(exps):
        return {"pred_cond": 1.0}  # guidance switched off at this step: the conditional model alone
    missing = [n for n in names if n not in exps]
    if missing:
        raise ValueError(f"FKCSampler: no exponent for the guidance's pass(es) {missing}")
    return {n: exps[n] for n in names}


# -- output ----------------------------------------------------------------------------------------
@dataclass
class FKCOutput:
    """What one FKC run produced.

    ``particles``: final latents ``[G·K, ...]`` (as returned to the pipeline); ``log_weights``: their
    final log-weights ``[G, K]``; ``ess``: per step, the ESS ``[G]`` *before* the resampling
    decision; ``resampled``: per step, which groups were resampled; ``unique_ancestors``: per step,
    distinct parents kept ``[G]``; ``chosen``: one batch index per group (the output image).
    """

    particles: torch.Tensor
    log_weights: torch.Tensor
    ess: torch.Tensor  # [steps, G]
    resampled: torch.Tensor  # [steps, G] bool
    unique_ancestors: torch.Tensor  # [steps, G]
    clamped: torch.Tensor  # [steps] number of clamped increments
    chosen: list[int]
    num_particles: int
    exponents: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    network_evaluations: int = 0  # sample-passes over the whole run (all particles, all conditions)

    @property
    def normalized_weights(self) -> torch.Tensor:
        return torch.softmax(self.log_weights.double(), -1)

    def select(self, images):
        """The chosen image of each group from the pipeline's full list/tensor of images."""
        if isinstance(images, torch.Tensor):
            return images[torch.as_tensor(self.chosen, device=images.device)]
        return [images[i] for i in self.chosen]

    def summary(self) -> dict:
        """JSON-ready: settings, the ESS trace (fraction of K, mean over groups, per step), counts."""
        K = self.num_particles
        ess = self.ess.double().cpu() / K
        return {
            **self.settings,
            "num_particles": K,
            "groups": int(self.log_weights.shape[0]),
            "exponents": {k: round(v, 6) for k, v in self.exponents.items()},
            "ess_trace": [round(v, 4) for v in ess.mean(1).tolist()],
            "ess_trace_min": [round(v, 4) for v in ess.min(1).values.tolist()],
            "resampling_steps": int(self.resampled.any(1).sum()),
            "resamplings": int(self.resampled.sum()),
            "unique_ancestors_trace": [round(v, 2) for v in self.unique_ancestors.double().mean(1).tolist()],
            "clamped_increments": int(self.clamped.sum()),
            "final_ess": [round(v, 4) for v in (effective_sample_size(self.log_weights).double().cpu() / K).tolist()],
            "chosen": list(self.chosen),
            "network_evaluations": self.network_evaluations,
            "network_evaluations_per_output": self.network_evaluations // max(1, len(self.chosen)),
        }


# -- the sampler -----------------------------------------------------------------------------------
class FKCSampler:
    """Feynman-Kac corrector SMC over ``num_particles`` particles per prompt (see module docstring).

    Args:
        num_particles: K, particles per group; the batch must be ``groups × K``: run the pipeline with
            ``num_images_per_prompt = n·K`` for n output images per prompt (``diffplug sample
            --num-images n --particles K`` does). Each group returns one image (``output.select``).
        beta: inverse temperature of the annealed target ``(Π q_i^{β_i})^beta`` (1: no annealing).
        resample: ``"systematic"`` (default), ``"stratified"`` or ``"multinomial"``.
        ess_threshold: resample a group when ESS ≤ threshold·K; 1.0 = every step, 0.0 = never.
        clamp: ``None`` (default, unbiased) or c > 0: centre each step's increments within the group
            and clamp them to [−c, c] (the official image code's stabiliser, which biases the target).
        output: which particle each group returns in ``output.chosen``: ``"resampled"`` (one drawn
            ∝ final weights) or ``"best"`` (largest final weight).
        correct: ``False`` runs the same moves without weights or resampling (the uncorrected SDE).
        generator: RNG for resampling (default: the pipeline's generator, else torch's global RNG).

    After a run ``sampler.output`` is an :class:`FKCOutput` (``summary()`` for settings.json). The
    pipeline's ``.nfe`` counts network evaluations per *output* image: every particle of its group,
    every step, every pass (``K × steps × passes``; ``rows_per_output``).
    """

    def __init__(
        self,
        num_particles: int = 8,
        beta: float = 1.0,
        resample: str = "systematic",
        ess_threshold: float = 0.5,
        clamp: float | None = None,
        output: str = "resampled",
        correct: bool = True,
        generator: torch.Generator | None = None,
    ):
        if int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if not beta > 0:
            raise ValueError(f"beta (inverse temperature) must be > 0, got {beta!r}")
        if resample not in RESAMPLERS:
            raise ValueError(f"resample must be one of {RESAMPLERS}, got {resample!r}")
        if not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1] (1 = every step, 0 = never), got {ess_threshold!r}")
        if clamp is not None and not clamp > 0:
            raise ValueError(f"clamp must be None (off) or > 0, got {clamp!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.num_particles = int(num_particles)
        self.beta = float(beta)
        self.resample = resample
        self.ess_threshold = float(ess_threshold)
        self.clamp = clamp
        self.choose = output
        self.correct = correct
        self.generator = generator
        self.output: FKCOutput | None = None

    def check_scheduler(self, scheduler) -> None:
        """Refuse a scheduler whose update FKC would ignore (``from_pipe`` and ``begin`` call it)."""
        check_scheduler(scheduler)

    @property
    def rows_per_output(self) -> int:
        """Batch rows (particles) behind one output image: the pipeline divides its count by the outputs."""
        return self.num_particles

    def settings(self) -> dict:
        return {
            "sampler": "fkc",
            "beta": self.beta,
            "resample": self.resample,
            "ess_threshold": self.ess_threshold,
            "clamp": self.clamp,
            "output": self.choose,
            "correct": self.correct,
        }

    # -- loop hooks ----------------------------------------------------------------------------------
    def begin(self, latents: torch.Tensor, timesteps, scheduler, guidance) -> torch.Tensor:
        B, K = latents.shape[0], self.num_particles
        if B % K:
            raise ValueError(
                f"FKCSampler: batch of {B} latents is not a multiple of num_particles={K}; "
                f"run the pipeline with num_images_per_prompt={K} (or a multiple of it)"
            )
        self.check_scheduler(scheduler)
        self._guidance = guidance
        alphas, sigmas = noise_levels(scheduler, timesteps)
        # After the last step the sample is clean: alpha = 1, sigma = 0.
        # Kept on the host: the per-step coefficients are Python floats (no device sync).
        self._alphas = torch.cat([alphas, alphas.new_ones(1)]).double().cpu()
        self._sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).double().cpu()
        log_snr = 2 * (self._alphas.log() - self._sigmas.log())  # +inf at the end, -inf at flow's sigma=1
        if not bool((log_snr[1:] > log_snr[:-1]).all()):
            raise ValueError(
                f"FKCSampler needs strictly decreasing noise levels; {type(scheduler).__name__}'s timesteps "
                "revisit a level (second-order schedulers such as Heun/KDPM2 are not supported): use DDIM, "
                "DDPM, Euler, Euler-ancestral or flow-matching Euler"
            )
        self._n = len(timesteps)
        self._G = B // K
        self._log_w = latents.new_zeros(self._G, K)
        self._trace = {"ess": [], "resampled": [], "unique": [], "clamped": []}
        self._nfe = 0
        self._exps: dict[str, float] = {}
        self._ve_latents = None
        self._resampling_rng = self.generator
        self.output = None
        # p_T ∝ Π (q^i_T)^{beta β_i} with q^i_T ≈ N(0, σ_T²): variance σ_T² / (beta Σβ).
        total = self.beta * sum(_exponents(guidance, self._all_names(guidance)).values())
        if total <= 0:
            raise ValueError(f"FKCSampler: the target's exponents sum to {total:g} <= 0; it is not normalisable")
        if float(self._alphas[0]) == 0.0 and total <= 0.5:
            raise ValueError(_WIDE_AT_NOISE.format(c=total))
        return latents if math.isclose(total, 1.0) else latents / math.sqrt(total)

    @staticmethod
    def _all_names(guidance) -> list[str]:
        if hasattr(guidance, "fkc_exponents"):
            return list(guidance.fkc_exponents())
        names = getattr(guidance, "_input_predictions", ["pred_cond", "pred_uncond"])
        active = guidance.is_active() if hasattr(guidance, "is_active") else True
        return list(names) if active else ["pred_cond"]

    def step(self, i, t, latents, guided, batches, context, scheduler, extra_step_kwargs) -> torch.Tensor:
        if any(getattr(b, "rows", None) is not None for b in batches):
            raise ValueError("FKCSampler needs every condition's prediction for every particle (no per-row skipping)")
        names = [getattr(b, Guidance._identifier_key) for b in batches]
        exps = _exponents(self._guidance, names)
        beta_i = [self.beta * exps[n] for n in names]
        self._exps = {n: b for n, b in zip(names, beta_i)}
        self._nfe += latents.shape[0] * len(batches)

        # Latent convention: VP (the latents are the model input) or VE (Euler: latents = x / alpha).
        x = context.sample
        if self._ve_latents is None:
            self._ve_latents = x is not latents
            if self._ve_latents and not torch.allclose(latents * context.alpha, x, rtol=1e-4, atol=1e-5):
                raise ValueError(
                    f"FKCSampler: cannot tell how {type(scheduler).__name__} scales its model input "
                    "(expected the identity or 1/sqrt(1 + sigma^2))"
                )

        a, s = float(self._alphas[i]), float(self._sigmas[i])
        a1, s1 = float(self._alphas[i + 1]), float(self._sigmas[i + 1])
        rho = (s1 * a) ** 2 / (a1 * s) ** 2  # SNR_t / SNR_t' in [0, 1)

        # ε and x0 of each pass by predictions.split (flow: ε = x + (1 − σ)v, x0 = x − σv; finite at σ = 1)
        eps = [context.to_eps(b.noise_pred.float()) for b in batches]
        x0 = [context.to_x0(b.noise_pred.float()) for b in batches]
        c = sum(beta_i)
        noise_gen = self.generator if self.generator is not None else extra_step_kwargs.get("generator")
        # Resampling draws from the sampler's generator, else the pipeline's (the first of a list).
        self._resampling_rng = noise_gen[0] if isinstance(noise_gen, (list, tuple)) else noise_gen
        z = randn_tensor(x.shape, generator=noise_gen, device=x.device, dtype=torch.float32)
        c_x, c_d, c_z = _move_coefficients(a, s, a1, s1, c)  # eq. (**)
        x_next = c_x * x + c_d * sum(b * d for b, d in zip(beta_i, x0)) + c_z * z

        if self.correct:
            x_next = self._reweight_and_resample(i, x_next, eps, beta_i, rho)
        if self._ve_latents:  # back to the scheduler's convention
            x_next = x_next / a1
        if getattr(scheduler, "_step_index", None) is not None:
            scheduler._step_index += 1  # keep Euler-type schedulers' scale_model_input in step
        if i == self._n - 1:
            self._finish(x_next)
        return x_next

    def _reweight_and_resample(self, i, x_next, eps, beta_i, rho) -> torch.Tensor:
        K, G = self.num_particles, self._G
        delta = fkc_log_weight_increment(eps, beta_i, rho).view(G, K)  # eq. (*)
        clamped = delta.new_zeros(())
        if self.clamp is not None:
            delta = delta - delta.mean(1, keepdim=True)
            clamped = (delta.abs() > self.clamp).sum()
            delta = delta.clamp(-self.clamp, self.clamp)
        self._log_w = self._log_w + delta
        ess = effective_sample_size(self._log_w)
        self._trace["ess"].append(ess)
        self._trace["clamped"].append(clamped)
        arange = torch.arange(K, device=x_next.device).expand(G, K)
        if i == self._n - 1 or self.ess_threshold == 0.0:  # no resampling after the last move
            self._trace["resampled"].append(torch.zeros(G, dtype=torch.bool, device=x_next.device))
            self._trace["unique"].append(torch.full((G,), K, device=x_next.device))
            return x_next
        need = torch.ones_like(ess, dtype=torch.bool) if self.ess_threshold >= 1.0 else ess <= self.ess_threshold * K
        idx = torch.where(need[:, None], resample_indices(self._log_w, self.resample, self._resampling_rng), arange)
        self._log_w = torch.where(need[:, None], torch.zeros_like(self._log_w), self._log_w)
        srt = idx.sort(1).values
        self._trace["resampled"].append(need)
        self._trace["unique"].append((srt[:, 1:] != srt[:, :-1]).sum(1) + 1)
        flat = (idx + torch.arange(G, device=idx.device)[:, None] * K).reshape(-1)
        return x_next[flat]

    def _finish(self, x_final: torch.Tensor) -> None:
        K, G = self.num_particles, self._G
        if self.choose == "best":
            within = self._log_w.argmax(1)
        else:
            w = torch.softmax(self._log_w.double(), 1)
            gen = self._resampling_rng
            within = torch.multinomial(w.to(gen.device) if gen is not None else w, 1, generator=gen).view(G)
        chosen = (within.cpu() + torch.arange(G) * K).tolist()
        steps = len(self._trace["ess"])
        dev = x_final.device
        stack = lambda key, empty: torch.stack(self._trace[key]) if steps else empty  # noqa: E731
        self.output = FKCOutput(
            particles=x_final,
            log_weights=self._log_w,
            ess=stack("ess", torch.full((0, G), float(K), device=dev)),
            resampled=stack("resampled", torch.zeros(0, G, dtype=torch.bool, device=dev)),
            unique_ancestors=stack("unique", torch.zeros(0, G, device=dev)),
            clamped=stack("clamped", torch.zeros(0, device=dev)),
            chosen=chosen,
            num_particles=K,
            exponents=dict(self._exps),
            settings=self.settings(),
            network_evaluations=self._nfe,
        )


# -- product of two prompts ------------------------------------------------------------------------
def encode_condition(pipe, prompt: str | list[str], num_images_per_prompt: int = 1, **family_kwargs) -> dict:
    """The conditional model inputs for ``prompt`` as the pipeline's own family adapter encodes them:
    ``{model keyword: tensor}`` (for :class:`ProductGuidance`'s second prompt)."""
    from ..pipelines import family_of

    family = family_of(pipe)
    height, width = family.default_size()
    conditions = family.encode(
        prompt=prompt, negative_prompt=None, num_images_per_prompt=num_images_per_prompt, prompt_embeds=None,
        negative_prompt_embeds=None, height=height, width=width, **family_kwargs,
    )
    return {k: v[0] for k, v in conditions.items()}


class ProductGuidance(Guidance):
    """Two prompts at once: ``ε = ε_u + w₁(ε₁ − ε_u) + w₂(ε₂ − ε_u)`` ("summed guidance", the
    composable-diffusion combination), i.e. the score of ``q_u^{1−w₁−w₂} q₁^{w₁} q₂^{w₂}``.

    Alone it is the summed-guidance baseline; with :class:`FKCSampler` it samples that geometric
    mixture. ``uncond=False`` drops the unconditional pass: ``ε = w₁ε₁ + w₂ε₂``, the product of
    experts ``q₁^{w₁} q₂^{w₂}`` (w = (1, 1): the plain product, Prop. 3.3).

    ``second``: the second prompt's conditional inputs, ``encode_condition(pipe, prompt_2, K)``;
    rows must equal the batch (or be 1, then repeated). The pipeline's own prompt is the first.

    ``second_model``: a second network for ``ε₂`` (two models sharing a latent space: the same VAE,
    noise schedule and prediction type), given as its diffusers pipeline or as a callable
    ``model(x, t, **inputs)``; then ``second = encode_condition(second_pipe, prompt_2, K)`` holds
    *its* inputs. ``ε_u`` (with ``uncond=True``) is the first model's.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_2"]

    def __init__(self, second: dict, guidance_scale: float = 7.5, guidance_scale_2: float | None = None,
                 uncond: bool = True, second_model=None):
        super().__init__(guidance_scale)
        if not isinstance(second, dict) or not second:
            raise ValueError("second must be the second prompt's inputs, e.g. encode_condition(pipe, prompt_2, K)")
        from diffusers import DiffusionPipeline

        if isinstance(second_model, DiffusionPipeline):
            from ..pipelines import family_of

            second_model = family_of(second_model).model  # its denoiser, called as the loop calls ours
        elif second_model is not None and not callable(second_model):
            raise TypeError(f"second_model must be a diffusers pipeline or a callable model(x, t, **inputs), got {type(second_model)}")
        self.second, self.second_model = second, second_model
        self.guidance_scale_2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        self.uncond = uncond
        self.register_to_config(guidance_scale=guidance_scale, guidance_scale_2=self.guidance_scale_2, uncond=uncond)

    def new(self, guidance_scale: float | None = None, **kwargs):
        """A copy at scale ``guidance_scale`` for both prompts (pipelines call this with the user's scale)."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        w2 = kwargs.get("guidance_scale_2", w if guidance_scale is not None else self.guidance_scale_2)
        return ProductGuidance(self.second, w, w2, kwargs.get("uncond", self.uncond), self.second_model)

    @property
    def num_conditions(self) -> int:
        return 3 if self.uncond else 2

    def is_active(self) -> bool:
        return True

    def _names(self) -> list[str]:
        return ["pred_cond", "pred_uncond", "pred_cond_2"] if self.uncond else ["pred_cond", "pred_cond_2"]

    def fkc_exponents(self) -> dict[str, float]:
        w1, w2 = float(self.guidance_scale), float(self.guidance_scale_2)
        if self.uncond:
            return {"pred_cond": w1, "pred_uncond": 1.0 - w1 - w2, "pred_cond_2": w2}
        return {"pred_cond": w1, "pred_cond_2": w2}

    def _second_inputs(self, rows: int, like: torch.Tensor) -> dict:
        out = {}
        for key, other in self.second.items():
            other = other.to(like.device)
            if other.shape[0] == 1 and rows > 1:
                other = other.expand(rows, *other.shape[1:])
            if other.shape[0] != rows:
                raise ValueError(
                    f"ProductGuidance: the second prompt has {other.shape[0]} rows, the batch {rows}; "
                    "encode it with num_images_per_prompt equal to the pipeline's"
                )
            out[key] = other
        return out

    def prepare_inputs(self, data: dict) -> list:
        first = next(iter(data.values()))[0]
        rows = first.shape[0]
        if self.second_model is not None:  # ε₂ from the second network, with its own inputs
            from diffusers.modular_pipelines.modular_pipeline import BlockState

            index = {"pred_cond": 0, "pred_uncond": 1}
            batches = [self._prepare_batch(data, index[n], n) for n in self._names() if n != "pred_cond_2"]
            second = self._second_inputs(rows, first)
            batches.append(BlockState(**second, model=self.second_model, fields=list(second),
                                      **{self._identifier_key: "pred_cond_2"}))
            return batches
        missing = [key for key in data if key not in self.second]
        if missing:
            raise ValueError(f"ProductGuidance: the second prompt has no {missing}; encode it with encode_condition(pipe, ...)")
        second = self._second_inputs(rows, first)
        extended = {key: (value[0], value[1], second[key].to(value[0].dtype)) for key, value in data.items()}
        index = {"pred_cond": 0, "pred_uncond": 1, "pred_cond_2": 2}
        return [self._prepare_batch(extended, index[n], n) for n in self._names()]

    def forward(self, pred_cond, pred_uncond=None, pred_cond_2=None):
        w1, w2 = self.guidance_scale, self.guidance_scale_2
        if pred_uncond is None:
            pred = w1 * pred_cond + w2 * pred_cond_2
        else:
            pred = pred_uncond + w1 * (pred_cond - pred_uncond) + w2 * (pred_cond_2 - pred_uncond)
        return self.output(pred, pred_cond, pred_uncond)
