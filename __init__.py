"""diffplug: sampling, guidance and fine-tuning plugins for Hugging Face diffusers.

The subpackages are the product: ``diffplug.samplers``, ``diffplug.guidance``,
``diffplug.pipelines``, ``diffplug.finetune``, ``diffplug.evals`` and ``diffplug.testbed``.
"""

__version__ = "0.1.0"
