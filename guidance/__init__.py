"""Replacements for classifier-free guidance, usable in stock pipelines via ``diffplug.pipelines``
and in diffusers' modular pipelines (they are ``BaseGuidance`` subclasses)."""

from .base import CFG, Guidance

__all__ = ["CFG", "Guidance"]
