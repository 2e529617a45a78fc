"""Replacements for classifier-free guidance, usable in stock pipelines via ``diffplug.pipelines``
and in diffusers' modular pipelines (they are ``BaseGuidance`` subclasses).

``get_guidance(name, **options)`` builds one from a CLI name (``diffplug sample --guidance apg``).
"""

from __future__ import annotations

import inspect
import json
import os

from .adaptive import AdaptiveAPG, AdaptiveGuidance, Calibration, LinearAG, calibrate
from .apg import APG
from .base import CFG, Guidance

GUIDANCE = {"cfg": CFG, "apg": APG, "ag": AdaptiveGuidance, "linear-ag": LinearAG, "apg-ag": AdaptiveAPG}
_ALIASES = {"adaptive": "ag", "adaptive-guidance": "ag", "linear_ag": "linear-ag", "linearag": "linear-ag"}


def _parse(value, default, name: str):
    """A CLI string -> the type of the parameter's default (numbers, booleans, JSON lists, None)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"option {name!r} expects true/false, got {value!r}")
    if isinstance(default, (int, float)):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"option {name!r} expects a number, got {value!r}") from None
    if isinstance(default, str):
        return text
    try:  # lists (LinearAG coefficients) and other JSON values
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def get_guidance(name: str, **options) -> Guidance:
    """A guidance object from its CLI name: ``cfg``, ``apg``, ``ag``, ``linear-ag``, ``apg-ag`` (AG's pass schedule, APG's combination).

    ``options`` are constructor arguments, as Python values or CLI strings (``"7.5"``, ``"true"``,
    ``"none"``, JSON for lists). ``path=DIR_OR_JSON`` loads a saved config (``save_pretrained``
    directory or its ``guider_config.json``) — the way to pass fitted LinearAG coefficients —
    and the other options override it.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GUIDANCE:
        raise ValueError(f"unknown guidance {name!r}; choose one of {sorted(GUIDANCE)}")
    cls = GUIDANCE[key]
    params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    path = options.pop("path", None)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {unknown}; valid options: {sorted(params)} and 'path'")
    kwargs = {k: _parse(v, params[k], k) for k, v in options.items()}
    if path is not None:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ValueError(f"{key}: path={path!r} does not exist; pass a save_pretrained directory or its JSON file")
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            return cls.from_config(config, **kwargs)
        return cls.from_pretrained(path, **kwargs)
    return cls(**kwargs)  # LinearAG without coefficients raises, naming path=


__all__ = [
    "APG",
    "CFG",
    "GUIDANCE",
    "AdaptiveAPG",
    "AdaptiveGuidance",
    "Calibration",
    "Guidance",
    "LinearAG",
    "calibrate",
    "get_guidance",
]
