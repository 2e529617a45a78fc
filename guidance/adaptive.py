"""Adaptive Guidance (AG) and LinearAG.

A. Castillo, J. Kohler, J. C. Pérez, J. P. Pérez, A. Pumarola, B. Ghanem, P. Arbeláez, A. Thabet,
*Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models*, AAAI 2025,
arXiv:2312.12487. No official code is published; this follows the paper's text.

**AG.** While in "CFG mode" a step evaluates ``ε_c = ε(x_t, c)`` and ``ε_u = ε(x_t, ∅)`` and returns
``ε̃ = ε_u + w (ε_c − ε_u)``. After the step it measures the per-sample cosine similarity

    γ_t = ⟨ε_c, ε_u⟩ / (‖ε_c‖ ‖ε_u‖)            (over all non-batch dimensions)

and once ``γ_t > γ̄`` (``threshold``) the sample switches *permanently* to conditional-only steps
``ε̃ = ε_c`` (one network evaluation each; γ cannot be measured any more). With N steps and a switch
at 0-based step k a sample costs ``2(k + 1) + (N − k − 1) = N + k + 1`` evaluations instead of 2N.

Choices made here:

* **Where γ is measured.** The paper measures γ on the ε predictions; ``space="model_output"`` does
  that (the raw outputs: ε, v or flow velocity). On ε-models it is not usable as a default: at high
  noise both predictions are ≈ the noise in ``x_t``, so on the testbed γ is 0.994-0.999 from step 0
  and any γ̄ <= 0.995 switches at step 0, i.e. samples *unguided* (benchmarks/guidance_results.md).
  The default ``space="x0"`` measures γ on the denoised predictions (as the third-party ComfyUI port
  does; needs diffplug's loop, else it falls back to the raw outputs with a warning), where γ starts
  at ~0.5 and rises as the image settles, and it is the same quantity for ε-, v- and flow-models.
* ``threshold`` default 0.999 (with ``space="x0"``): calibrated on the testbed at w = 7.5, 20 DDIM
  steps, where it keeps CFG's prompt alignment and FID while saving 18-21 % of the network calls
  (sd, dit; ``benchmarks/guidance_results.md``). The paper sweeps γ̄ close to 1 for ~25 %; its value
  is not transferable, so calibrate yours (:func:`calibrate`). Configs saved with the earlier defaults
  (0.99, ``"model_output"``) and marked as defaults load with these ones (diffusers' convention);
  pass both explicitly to keep the old behaviour.
* Batches. γ is per sample; a converged sample always takes conditional-only steps, so the images
  do not depend on which other prompts share the batch. What differs is what is evaluated:
  ``policy="all"`` keeps evaluating the unconditional pass for the whole batch until every sample
  has converged (no saving before that; any pipeline can run it), ``policy="per_sample"`` gives the
  unconditional batch ``rows`` = the not-yet-converged samples, so diffplug's loop evaluates only
  those (modular pipelines ignore ``rows`` and evaluate everything; the result is the same).
* Host decisions. Whether (and for which samples) to run the unconditional pass is control flow, so
  while a generation is in CFG mode each step reads the previous step's ``γ > γ̄`` flags back to the
  host once (in ``set_state``): one small device→host sync per step, none after the switch.
* ``stop`` < 1 caps CFG mode (the "max CFG fraction" fallback when γ never reaches γ̄).

**LinearAG** is this project's own reconstruction, not a verified copy of the paper's method. The
paper's abstract says that "entire neural function evaluations can be replaced by simple affine
transformations of past score estimates"; its LinearAG section (features, intercept, which steps are
replaced, how the coefficients are obtained) could not be checked here. What we chose: at a replaced
step ``i`` the unconditional prediction is the affine estimate

    ε̂_u(t_i) = a_i ε_c(t_i) + b_i ε_c(t_{i−1}) + c_i ε_u(t_{i−1}) + d_i

(scalars per step; ``ε_u(t_{i−1})`` is whatever the previous step used, real or estimated), then
``ε̃ = ε̂_u + w (ε_c − ε̂_u)``. Coefficients are fitted once per (model, scheduler, N, w) by ordinary
least squares over full-CFG trajectories, pixels and prompts pooled (``LinearAG.fit``); by default
every other step of the first half is replaced (our choice, after the abstract's "first half"), and
AG's cosine switch can run on top (``threshold``). There is no default set of coefficients: a
``LinearAG`` without them is an error. They live in the config, so ``save_pretrained`` /
``from_pretrained`` round-trip them.

**AdaptiveAPG** (``--guidance apg-ag``) composes the two papers: AG decides which passes run and when
each image switches to conditional-only steps; while both passes run, APG (``guidance/apg.py``)
combines them. Identity settings (APG ``eta=1, norm_threshold=0, momentum=0``; γ̄ >= 1) give CFG
exactly (tests/test_flow_combined.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from diffusers.configuration_utils import register_to_config

from .apg import APG, _dot
from .base import CFG, Guidance

POLICIES = ("all", "per_sample")
SPACES = ("model_output", "x0")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity over all non-batch dims (sums in float64), clamped to [-1, 1]: γ_t."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    num = _dot(a, b).squeeze(1)
    den = (_dot(a, a) * _dot(b, b)).sqrt().squeeze(1)
    return (num / den.clamp_min(1e-300)).clamp(-1.0, 1.0)


def _batch_size(data) -> int:
    values = data.values() if isinstance(data, dict) else vars(data).values()
    for value in values:
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            return value[0].shape[0]
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ValueError("AdaptiveGuidance.prepare_inputs: no tensor inputs to read the batch size from")


class AdaptiveGuidance(Guidance):
    """Adaptive Guidance (Castillo et al., AAAI 2025): CFG until the conditional and unconditional
    predictions align (cosine > ``threshold``), then conditional-only steps.

    Args:
        guidance_scale: ``w`` in ``uncond + w (cond − uncond)``.
        threshold: γ̄; a sample switches once γ_t > γ̄. ``>= 1`` never switches (plain CFG).
        policy: ``"all"`` (skip the unconditional pass once every sample converged) or
            ``"per_sample"`` (skip it per sample via ``rows``; needs diffplug's loop to save work).
        start, stop: CFG mode runs inside ``[start, stop)`` only.
        space: where γ is measured: ``"x0"`` (default: the denoised predictions, via diffplug's loop)
            or ``"model_output"`` (the paper's ε for ε-models; see the module notes before using it).

    After a generation ``switch_steps`` holds each sample's switch step k (None: never) and
    ``gammas()`` the measured γ trajectory.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        threshold: float = 0.999,
        policy: str = "all",
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        space: str = "x0",
    ):
        super().__init__(guidance_scale, start, stop, enabled)
        self._setup(threshold, policy, space)

    def _setup(self, threshold: float, policy: str, space: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.space = space
        self._warned = False
        if not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number (a cosine in [-1, 1]; >= 1 never switches), got {threshold!r}")
        self.threshold = float(threshold)
        self.policy = policy
        self.reset()

    # -- per-generation state ----------------------------------------------------------------------
    def reset(self) -> None:
        self._converged: list[bool] | None = None  # host flags, one per sample
        self._switch_steps: list[int | None] = []
        self._pending = None  # (step, rows, γ) of the last CFG step, read at the next set_state
        self._history: list[tuple[int, list[int] | None, torch.Tensor]] = []
        self._rows: list[int] | None = None

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._absorb()

    def _absorb(self) -> None:
        """Read the last measured γ back (one host sync) and record new switches."""
        if self._pending is None:
            return
        step, rows, gamma = self._pending
        self._pending = None
        if self.threshold >= 1:  # never switches: no host read (a sync on a GPU) needed
            return
        flags = (gamma > self.threshold).tolist()
        for r, hit in zip(rows if rows is not None else range(len(flags)), flags):
            if hit and not self._converged[r]:
                self._converged[r] = True
                self._switch_steps[r] = step

    @property
    def switch_steps(self) -> list[int | None]:
        """Per sample, the step k at which γ_k > γ̄ first held in the last generation (None: never)."""
        self._absorb()
        return list(self._switch_steps)

    def _ensure(self, batch: int) -> None:
        if self._converged is None or len(self._converged) != batch:
            self._converged = [False] * batch
            self._switch_steps = [None] * batch

    def _cfg_mode(self) -> bool:
        return self.is_active() and not (self._converged is not None and all(self._converged))

    @property
    def num_conditions(self) -> int:
        return 2 if self._cfg_mode() else 1

    # -- the guider protocol -----------------------------------------------------------------------
    def prepare_inputs(self, data) -> list:
        self._ensure(_batch_size(data))
        batches = super().prepare_inputs(data)
        self._set_rows(batches)
        return batches

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        self._ensure(_batch_size({k: getattr(data, v if isinstance(v, str) else v[0], None) for k, v in input_fields.items()}))
        batches = super().prepare_inputs_from_block_state(data, input_fields)
        self._set_rows(batches)
        return batches

    def _set_rows(self, batches: list) -> None:
        active = [i for i, done in enumerate(self._converged) if not done]
        self._rows = None if len(active) == len(self._converged) else active
        if len(batches) == 2 and self.policy == "per_sample" and self._rows is not None:
            batches[1].rows = torch.tensor(self._rows, dtype=torch.long)

    def _guide(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor) -> torch.Tensor:
        """The CFG combination of the rows being guided (subclasses change it)."""
        return pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        if pred_uncond is None:
            return self.output(pred_cond, pred_cond)
        rows = self._rows
        if rows is None:  # every sample still guided: plain CFG, no indexing
            guided = self._guide(pred_cond, pred_uncond)
            self._measure(pred_cond, pred_uncond, None)
            return self.output(guided, pred_cond, pred_uncond)
        index = torch.tensor(rows, dtype=torch.long, device=pred_cond.device)
        cond = pred_cond.index_select(0, index)
        uncond = pred_uncond if pred_uncond.shape[0] == len(rows) else pred_uncond.index_select(0, index)
        guided = pred_cond.clone()  # converged samples: ε̃ = ε_c
        guided.index_copy_(0, index, self._guide(cond, uncond))
        self._measure(cond, uncond, rows)
        return self.output(guided, pred_cond, pred_uncond)

    def _measure(self, cond: torch.Tensor, uncond: torch.Tensor, rows: list[int] | None) -> None:
        ctx = self._context
        if self.space == "x0" and ctx is None and self.threshold < 1 and not self._warned:
            warnings.warn("AdaptiveGuidance(space='x0') got no StepContext (modular pipeline?): measuring γ on the "
                          "raw model outputs instead", stacklevel=3)
            self._warned = True
        if self.space == "x0" and ctx is not None:
            sample = ctx.sample if rows is None else ctx.sample[torch.tensor(rows, device=ctx.sample.device)]
            cond, uncond = ctx.to_x0(cond.float(), sample), ctx.to_x0(uncond.float(), sample)
        gamma = cosine_similarity(cond, uncond)
        self._pending = (self._step, rows, gamma)
        self._history.append((self._step, rows, gamma))

    def gammas(self, num_steps: int | None = None) -> torch.Tensor:
        """γ_t of the last generation as a (steps, batch) float64 CPU tensor; NaN where not measured."""
        batch = len(self._converged or [])
        steps = num_steps or self._num_inference_steps or (1 + max((s for s, _, _ in self._history), default=-1))
        out = torch.full((steps, batch), float("nan"), dtype=torch.float64)
        for step, rows, gamma in self._history:
            out[step, rows if rows is not None else slice(None)] = gamma.cpu()
        return out


# -- calibration --------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """What AG with ``threshold`` does on the calibration prompts (computed from one CFG run: AG and
    CFG share the trajectory up to the switch, so the switch step is exact)."""

    threshold: float
    num_inference_steps: int
    switch_steps: list[int | None]  # per image, 0-based step k with γ_k > γ̄ first (None: never)
    nfe_cfg: int  # network evaluations per image with CFG: 2N
    nfe: list[int]  # per image with AG: N + k + 1 (2N if it never switches)
    gammas: torch.Tensor = field(repr=False, default=None)  # (N, images)

    @property
    def saving(self) -> float:
        """Fraction of CFG's network evaluations AG saves (per-sample policy)."""
        return 1.0 - sum(self.nfe) / (self.nfe_cfg * len(self.nfe))

    @property
    def saving_all(self) -> float:
        """Saving with ``policy="all"`` when all these images share one batch."""
        ks = self.switch_steps
        if any(k is None for k in ks):
            return 0.0
        return 1.0 - (self.num_inference_steps + max(ks) + 1) / self.nfe_cfg


def switch_steps(gammas: torch.Tensor, threshold: float) -> list[int | None]:
    """First step k with γ_k > threshold for each column of a (steps, samples) γ table."""
    hits = gammas > threshold
    return [int(col.nonzero()[0]) if col.any() else None for col in hits.T]


def calibrate(
    pipe,
    prompts: Sequence[str],
    thresholds: Sequence[float] = (0.98, 0.99, 0.995, 0.999),
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = 8,
    space: str = "x0",
    **call_kwargs,
) -> list[Calibration]:
    """Report, for each threshold, the switch step of every prompt and AG's saving in network evaluations.

    ``pipe``: a stock diffusers pipeline (or one from ``from_pipe``). Runs full CFG once over
    ``prompts`` (batches of ``batch_size``, generator seeded with ``seed + batch index``), records
    γ_t (in ``space``, as AdaptiveGuidance measures it) at every step and derives every threshold's
    switch steps from that single run.
    """
    from ..pipelines import from_pipe

    stock = getattr(pipe, "pipe", pipe)
    columns = []
    for b in range(0, len(prompts), batch_size):
        recorder = AdaptiveGuidance(guidance_scale, threshold=2.0, space=space)  # never switches: full CFG
        run = from_pipe(stock, guidance=recorder, sampler=getattr(pipe, "sampler", None))
        run(list(prompts[b : b + batch_size]), num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(seed + b // batch_size), output_type="latent", **call_kwargs)
        columns.append(recorder.gammas(num_inference_steps))
    gammas = torch.cat(columns, dim=1)
    n = num_inference_steps
    out = []
    for threshold in thresholds:
        ks = switch_steps(gammas, threshold)
        nfe = [2 * n if k is None else n + k + 1 for k in ks]
        out.append(Calibration(float(threshold), n, ks, 2 * n, nfe, gammas))
    return out


# -- LinearAG -----------------------------------------------------------------------------------------


class AdaptiveAPG(AdaptiveGuidance):
    """Adaptive Guidance's pass schedule with APG's combination (this project's composition of the two papers).

    Both passes run until γ_t (the cosine of the conditional and unconditional x0 predictions) exceeds
    ``threshold`` for every image of the call (AG's ``policy="all"``); meanwhile APG combines them
    (``eta``, ``norm_threshold``, ``momentum``: ``diffplug.guidance.APG``), over the whole batch so its
    momentum stays per image, and an image that has switched takes its conditional prediction alone, as
    in AG. Then one conditional pass per step.
    """

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, threshold: float = 0.999, eta: float = 0.0,
                 norm_threshold: float = 15.0, momentum: float = -0.5, space: str = "x0"):
        super().__init__(guidance_scale, threshold, policy="all", space=space)
        self.apg = APG(guidance_scale, eta=eta, norm_threshold=norm_threshold, momentum=momentum, space=space)

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self.apg.set_state(step, num_inference_steps, timestep)  # step 0: APG's momentum restarts

    def set_context(self, context) -> None:
        super().set_context(context)
        self.apg.set_context(context)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        if pred_uncond is None:  # every image switched: conditional steps
            return self.output(pred_cond, pred_cond)
        guided = self.apg.forward(pred_cond, pred_uncond).pred
        rows = self._rows  # images not yet switched; None: all of them
        if rows is None:
            self._measure(pred_cond, pred_uncond, None)
            return self.output(guided, pred_cond, pred_uncond)
        index = torch.tensor(rows, dtype=torch.long, device=pred_cond.device)
        switched = torch.ones(len(pred_cond), dtype=torch.bool, device=pred_cond.device)
        switched[index] = False
        guided = torch.where(switched.view(-1, *[1] * (pred_cond.ndim - 1)), pred_cond, guided)
        self._measure(pred_cond.index_select(0, index), pred_uncond.index_select(0, index), rows)
        return self.output(guided, pred_cond, pred_uncond)


class LinearAG(AdaptiveGuidance):
    """LinearAG: CFG whose unconditional prediction is, at selected steps, an affine estimate from the
    previous step's predictions instead of a network evaluation; AG's switch can run on top.

    Args:
        guidance_scale: ``w``.
        coefficients: one entry per step (length N); ``None`` evaluates the unconditional pass,
            ``[a, b, c, d]`` replaces it by ``a ε_c(t_i) + b ε_c(t_{i−1}) + c ε_u(t_{i−1}) + d``.
            Required (``ValueError`` without them): obtain them with :meth:`fit` / :meth:`fit_from_pipe`.
        threshold: AG's γ̄ for the conditional-only phase (``>= 1``: off); ``space`` as in AdaptiveGuidance.

    Runs with ``num_inference_steps == len(coefficients)`` only (they are per schedule).
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        coefficients: list | None = None,
        threshold: float = 1.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        space: str = "x0",
    ):
        if not coefficients or all(c is None for c in coefficients):
            raise ValueError(
                "LinearAG needs fitted coefficients (got coefficients="
                f"{coefficients!r}, which replaces no step): fit them with LinearAG.fit_from_pipe(pipe, prompts, "
                "guidance_scale=..., num_inference_steps=...) or LinearAG.fit(cond, uncond), then save_pretrained(DIR); "
                "load them with LinearAG.from_pretrained(DIR) (CLI: --guidance linear-ag --guidance-opt path=DIR)"
            )
        coefficients = [None if c is None else [float(x) for x in c] for c in coefficients]
        for i, c in enumerate(coefficients):
            if c is not None and len(c) != 4:
                raise ValueError(f"coefficients[{i}] must be None or [a, b, c, d] (4 numbers), got {c!r}")
        if coefficients[0] is not None:
            raise ValueError("coefficients[0] must be None: the first step has no past predictions to extrapolate")
        self.coefficients = coefficients
        Guidance.__init__(self, guidance_scale, start, stop, enabled)  # not AdaptiveGuidance's: one config
        self._setup(threshold, "all", space)

    def reset(self) -> None:
        super().reset()
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (ε_c, ε_u) of the last guided step
        self._estimate = False

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if num_inference_steps != len(self.coefficients):
            raise ValueError(
                f"LinearAG coefficients were fitted for num_inference_steps={len(self.coefficients)}; "
                f"run with that many steps or refit with LinearAG.fit for {num_inference_steps}"
            )
        coef = self.coefficients[step]
        self._estimate = coef is not None and self._prev is not None and super()._cfg_mode()

    def _cfg_mode(self) -> bool:  # the unconditional pass runs
        return super()._cfg_mode() and not self._estimate

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        if self._estimate:
            a, b, c, d = self.coefficients[self._step]
            prev_cond, prev_uncond = self._prev
            # ε̂_u(t_i) = a ε_c(t_i) + b ε_c(t_{i−1}) + c ε_u(t_{i−1}) + d
            pred_uncond = a * pred_cond + b * prev_cond + c * prev_uncond + d
            out = super().forward(pred_cond, pred_uncond)
            self._pending = None  # γ of an estimate says nothing about convergence
            self._history.pop()
        else:
            out = super().forward(pred_cond, pred_uncond)
        self._prev = None if pred_uncond is None else (pred_cond, pred_uncond)
        return out

    # -- fitting ---------------------------------------------------------------------------------
    @staticmethod
    def default_steps(num_inference_steps: int) -> list[int]:
        """Every other step of the first half (1, 3, 5, ... < N/2)."""
        return list(range(1, num_inference_steps // 2, 2))

    @classmethod
    def fit(
        cls,
        cond: Sequence[torch.Tensor] | torch.Tensor,
        uncond: Sequence[torch.Tensor] | torch.Tensor,
        steps: Sequence[int] | None = None,
        guidance_scale: float = 7.5,
        **kwargs,
    ) -> "LinearAG":
        """Least-squares coefficients from full-CFG trajectories.

        ``cond[i]``, ``uncond[i]``: the conditional / unconditional predictions at step i, shape
        (samples, ...), from CFG runs with the same scheduler and N. For each step i in ``steps``
        (default :meth:`default_steps`) solves ``min ‖ε_u(t_i) − [ε_c(t_i), ε_c(t_{i−1}), ε_u(t_{i−1}), 1] θ‖²``
        over every pixel of every sample (float64). The per-step relative residual
        ``‖ε_u − ε̂_u‖ / ‖ε_u‖`` is left on the returned guider as ``fit_residuals``.
        """
        n = len(cond)
        if len(uncond) != n or n < 2:
            raise ValueError(f"cond and uncond must hold the same number (>= 2) of steps, got {len(cond)} and {len(uncond)}")
        steps = cls.default_steps(n) if steps is None else sorted(set(int(s) for s in steps))
        if any(s < 1 or s >= n for s in steps):
            raise ValueError(f"steps must lie in [1, {n - 1}] (step 0 has no past), got {steps}")
        coefficients: list = [None] * n
        residuals = {}
        for i in steps:
            y = uncond[i].reshape(-1).double()
            features = [cond[i], cond[i - 1], uncond[i - 1]]
            x = torch.stack([f.reshape(-1).double() for f in features] + [torch.ones_like(y)], dim=1)
            theta = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
            coefficients[i] = [float(v) for v in theta]
            residuals[i] = float((x @ theta - y).norm() / y.norm().clamp_min(1e-30))
        guider = cls(guidance_scale=guidance_scale, coefficients=coefficients, **kwargs)
        guider.fit_residuals = residuals
        return guider

    @classmethod
    def fit_from_pipe(
        cls,
        pipe,
        prompts: Sequence[str],
        steps: Sequence[int] | None = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        seed: int = 0,
        batch_size: int = 8,
        call_kwargs: dict | None = None,
        **kwargs,
    ) -> "LinearAG":
        """Run full CFG on ``prompts`` with ``pipe`` (stock or ``from_pipe``), record every step's
        predictions and :meth:`fit` the coefficients."""
        from ..pipelines import from_pipe

        stock = getattr(pipe, "pipe", pipe)
        cond: list[list[torch.Tensor]] = [[] for _ in range(num_inference_steps)]
        uncond: list[list[torch.Tensor]] = [[] for _ in range(num_inference_steps)]
        for b in range(0, len(prompts), batch_size):
            recorder = _Recorder(guidance_scale)
            run = from_pipe(stock, guidance=recorder, sampler=getattr(pipe, "sampler", None))
            run(list(prompts[b : b + batch_size]), num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(seed + b // batch_size), output_type="latent", **(call_kwargs or {}))
            for i, (c, u) in enumerate(recorder.trajectory):
                cond[i].append(c)
                uncond[i].append(u)
        return cls.fit([torch.cat(c) for c in cond], [torch.cat(u) for u in uncond], steps, guidance_scale, **kwargs)


class _Recorder(CFG):
    """CFG that keeps every step's (ε_c, ε_u) on the CPU, for fitting LinearAG."""

    def reset(self) -> None:
        self.trajectory: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, pred_cond, pred_uncond=None):
        if pred_uncond is None:
            raise ValueError("LinearAG.fit_from_pipe needs full-CFG trajectories (guidance active at every step)")
        self.trajectory.append((pred_cond.float().cpu(), pred_uncond.float().cpu()))
        return super().forward(pred_cond, pred_uncond)
