"""The guidance contract diffplug builds on: diffusers' ``BaseGuidance``, plus two optional extras.

A guidance object follows diffusers' guider protocol, so it also runs in modular pipelines:

    guidance.set_state(step, num_inference_steps, timestep)
    batches = guidance.prepare_inputs({"encoder_hidden_states": (cond, uncond), ...})
    for batch in batches: batch.noise_pred = model(..., **fields of batch)
    pred = guidance(batches).pred

diffplug's loop (``diffplug.pipelines``) adds:

* ``set_context(StepContext)`` before ``prepare_inputs``: the model input ``x_t`` and its noise
  level, so methods that work on denoised (x0) predictions can convert (APG). Modular pipelines
  never call it; such methods then fall back to the raw model output (they say so).
* a batch may carry ``rows`` (a LongTensor of sample indices): the loop then evaluates the model
  only on those samples for that condition, and the prediction handed back has only those rows.
  This is how a per-sample policy really skips network evaluations (Adaptive Guidance).

Every pass a guidance asks for is evaluated in one batched model call.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput
from diffusers.utils import logging

from ..arguments import MAX_GUIDANCE_SCALE, check_guidance_scale  # noqa: F401  (no torch import)
from ..predictions import StepContext

_guider_logger = logging.get_logger("diffusers.guiders.guider_utils")


class Guidance(BaseGuidance):
    """Base class of diffplug's guidance methods.

    ``guidance_scale`` is ``w`` in ``uncond + w * (cond - uncond)`` for every subclass (w = 1: no
    guidance), as in diffusers pipelines. ``start``/``stop`` are the fractions of the steps between
    which guidance is active; outside that window only the conditional pass runs.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self, guidance_scale: float = 7.5, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        level = _guider_logger.level
        _guider_logger.setLevel(logging.ERROR)  # diffusers warns "experimental" on every construction
        try:
            super().__init__(start, stop, enabled)
        finally:
            _guider_logger.setLevel(level)
        self.guidance_scale = check_guidance_scale(guidance_scale)
        self._context: StepContext | None = None
        self._fix_default_markers()

    def _fix_default_markers(self) -> None:
        # diffusers' register_to_config lists *positional* arguments under `_use_default_values`,
        # and from_config/new() then silently drop them (CFG(5.0).new() had w = 7.5). Keep the marker
        # only for values that really equal the signature's default.
        config = getattr(self, "_internal_dict", None)
        if not config or "_use_default_values" not in config:
            return
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        kept = [k for k in config["_use_default_values"] if config.get(k) == defaults.get(k)]
        self._internal_dict = FrozenDict({**config, "_use_default_values": kept})

    # -- diffplug extras -------------------------------------------------------------------------
    def set_context(self, context: StepContext | None) -> None:
        """Called by diffplug's loop each step, after ``set_state``."""
        self._context = context

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._context = None  # a stale context must never leak into the next step
        if step == 0:
            self.reset()

    def reset(self) -> None:
        """A new generation starts (step 0): clear per-generation state (momentum, switches)."""

    # -- the BaseGuidance protocol ---------------------------------------------------------------
    def prepare_inputs(self, data: dict) -> list:
        names = self._input_predictions[: self.num_conditions]
        return [self._prepare_batch(data, i, name) for i, name in enumerate(names)]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        names = self._input_predictions[: self.num_conditions]
        return [self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in enumerate(names)]

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self.is_active() else 1

    def is_active(self) -> bool:
        """Guidance runs at this step: enabled, inside [start, stop), and w != 1."""
        if not self._enabled or math.isclose(self.guidance_scale, 1.0):
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def output(self, pred, pred_cond, pred_uncond=None) -> GuiderOutput:
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class CFG(Guidance):
    """Classifier-free guidance (Ho & Salimans, 2022): ``pred = uncond + w * (cond - uncond)``.

    ``stop < 1`` gives the fixed cut-off baseline ("guide only the first fraction of the steps"):
    the remaining steps run the conditional pass alone, one network evaluation each.
    ``guidance_rescale`` is Lin et al.'s (2023) std rescale, as in diffusers pipelines.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        stop: float = 1.0,
        start: float = 0.0,
        guidance_rescale: float = 0.0,
        enabled: bool = True,
    ):
        super().__init__(guidance_scale, start, stop, enabled)
        self.guidance_rescale = guidance_rescale

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if pred_uncond is None:
            return self.output(pred_cond, pred_cond)
        pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        if self.guidance_rescale > 0:
            dims = list(range(1, pred.ndim))
            rescaled = pred * (pred_cond.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
            pred = self.guidance_rescale * rescaled + (1 - self.guidance_rescale) * pred
        return self.output(pred, pred_cond, pred_uncond)

