"""diffplug: sampling, guidance and fine-tuning plugins for Hugging Face diffusers.

The subpackages are the product: ``diffplug.samplers``, ``diffplug.guidance``,
``diffplug.pipelines``, ``diffplug.finetune``, ``diffplug.evals`` and ``diffplug.testbed``.
After ``import diffplug`` each is reachable as an attribute (``diffplug.testbed.load("sd")``),
imported on first use so that ``import diffplug`` itself stays instant.
"""

import importlib as _importlib

__version__ = "0.1.0"

SUBPACKAGES = ("samplers", "guidance", "pipelines", "finetune", "evals", "testbed")
_LAZY = (*SUBPACKAGES, "predictions", "testing")
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
