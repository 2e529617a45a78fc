"""Checks of plain argument values, shared by ``run(...)``, the guidance constructors and the command
lines. Nothing here imports torch, so ``diffplug sample`` / ``eval`` reject a bad argument before the
seconds (a minute on a loaded machine) that importing torch and diffusers takes."""

from __future__ import annotations

import math
import numbers

__all__ = ["MAX_GUIDANCE_SCALE", "check_guidance_scale", "positive_int"]

# Beyond |w| = 1e4 nothing changes but the risk of overflow: on the testbed, images at w = 1e4 and
# 1e5 are identical (every guided pixel already saturated), and w * (cond - uncond) leaves fp16's
# range (65504) soon after. Published scales are 1-30.
MAX_GUIDANCE_SCALE = 1e4


def check_guidance_scale(value, name: str = "guidance_scale") -> float:
    """``value`` as a float, or a ValueError naming ``name``: a finite number, |w| <= 1e4."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number (e.g. 7.5), got {value!r}")
    if not math.isfinite(value) or abs(value) > MAX_GUIDANCE_SCALE:
        m = int(MAX_GUIDANCE_SCALE)
        raise ValueError(f"{name}={value!r}: must be a finite number in [-{m}, {m}] (1 = no guidance, 3-15 is usual)")
    return float(value)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
