"""Names the command line (and generation specs) use for models, schedulers, guidance and samplers.

Shared by ``diffplug sample``, ``diffplug eval`` and the benchmarks so a name means the same thing
everywhere. Schedulers: a table mapping a short name to ``"module:attribute"``; guidance and
sampler names live with them (``diffplug.guidance.GUIDANCE``, ``diffplug.samplers.SAMPLERS``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

SCHEDULERS = {
    "ddim": "diffusers:DDIMScheduler",
    "ddpm": "diffusers:DDPMScheduler",
    "pndm": "diffusers:PNDMScheduler",
    "euler": "diffusers:EulerDiscreteScheduler",
    "euler-a": "diffusers:EulerAncestralDiscreteScheduler",
    "dpm++": "diffusers:DPMSolverMultistepScheduler",
    "unipc": "diffusers:UniPCMultistepScheduler",
    "flow-euler": "diffusers:FlowMatchEulerDiscreteScheduler",
    "unipc-fast": "diffplug.samplers:FastUniPCScheduler",
    "dc-solver": "diffplug.samplers:DCSolverScheduler",
}
# Models that need no download: the project's testbed and the tiny random test pipelines
# (diffplug.testing.tiny_pipeline; tiny-flow is tiny-sd3's first name).
BUILTIN_MODELS = (
    "testbed", "testbed-lcm", "testbed-dit", "testbed-flux",
    "tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flow", "tiny-pixart", "tiny-flux", "tiny-flux-schnell", "tiny-chroma",
    "tiny-zimage",
)
# testbed-NAME loads testbed.load(NAME), except these
_TESTBED_NAMES = {"testbed": "sd", "testbed-lcm": "sd-lcm"}


def canonical_model(name: str | None) -> str | None:
    """A built-in model's canonical name, whichever spelling it comes in: ``tiny:sd`` and ``tiny-sd`` ->
    ``"tiny-sd"``, ``testbed:dit`` and ``testbed-dit`` -> ``"testbed-dit"``, ``testbed:sd`` -> ``"testbed"``.
    ``None`` for anything else (a local folder or a hub id). A ``tiny``/``testbed`` name that is no
    built-in model (and no existing folder) is a ``ValueError`` listing them.

    ``diffplug sample``, ``eval`` and ``finetune`` all resolve ``--model`` through this."""
    if name is None:
        return None
    for prefix in ("tiny", "testbed"):
        if name != prefix and not name.startswith((prefix + ":", prefix + "-")):
            continue
        canon = name if name == prefix else f"{prefix}-{name[len(prefix) + 1:]}"
        canon = {"testbed-sd": "testbed", "testbed-sd-lcm": "testbed-lcm"}.get(canon, canon)
        if canon in BUILTIN_MODELS:
            return canon
        if Path(name).expanduser().exists():
            return None  # a folder that happens to be called so
        raise ValueError(f"--model {name}: no built-in model of that name; built in: {', '.join(BUILTIN_MODELS)} "
                         "(each also spelled with ':' after tiny/testbed), or a local folder or hub id")
    return None


def builtin_model(name: str | None) -> tuple[str, str] | None:
    """``("tiny", FAMILY)`` (for ``testing.tiny_pipeline``) or ``("testbed", NAME)`` (for ``testbed.load``)
    for a built-in model in either spelling (:func:`canonical_model`); None for a folder or hub id."""
    canon = canonical_model(name)
    if canon is None:
        return None
    kind = "testbed" if canon.startswith("testbed") else "tiny"
    return kind, _TESTBED_NAMES.get(canon) or canon.removeprefix(kind + "-")


def _resolve(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(table)}")
    module, attr = table[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{kind} {name!r} ({table[name]}) is not available in this install: {err}") from err


def parse_options(pairs: list[str] | None) -> dict:
    """``["eta=0", "space=x0"]`` -> ``{"eta": 0, "space": "x0"}`` (JSON values, else strings)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r} must look like key=value")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


def make_scheduler(name: str | None, pipe, **options):
    """``pipe.scheduler`` swapped the diffusers way: ``X.from_config(pipe.scheduler.config)``.

    ``name=None``: the pipeline's own scheduler class, with ``options`` applied. Every option must be
    one of the class's parameters, of its type (``--scheduler-opt`` never drops a key)."""
    from .validate import check_options

    cls = type(pipe.scheduler) if name is None else _resolve(SCHEDULERS, "scheduler", name)
    return cls.from_config(pipe.scheduler.config, **check_options(cls, options, "scheduler option"))


def make_guidance(name: str, **options):
    """Guidance by CLI name; ``diffplug.guidance.get_guidance`` holds the names and option parsing."""
    from diffplug.guidance import get_guidance

    return get_guidance(name, **options)


def make_sampler(name: str, **options):
    """Sampler by CLI name; ``diffplug.samplers.get_sampler`` holds the names."""
    from diffplug.samplers import get_sampler

    return get_sampler(name, **options)


def load_pipeline(model: str | None = None, device: str | None = None, dtype: str | None = None):
    """A ready diffusers pipeline: the testbed (default), a tiny test pipeline, a local folder or a hub id."""
    import torch

    from .validate import check_device

    model = model or "testbed"
    builtin = builtin_model(model)
    check_device(device)
    torch_dtype = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, "bad")
    if torch_dtype == "bad":
        raise ValueError(f"--dtype must be one of fp32, fp16, bf16 (got {dtype!r})")
    if builtin and builtin[0] == "testbed":
        from diffplug import testbed

        pipe = testbed.load(builtin[1])
    elif builtin:
        from diffplug.testing import tiny_pipeline

        pipe = tiny_pipeline(builtin[1])
    else:
        from diffplug.checked import check_finite_weights

        pipe = _from_pretrained(model, torch_dtype)
        check_finite_weights(pipe, path=model, what="--model: a diffusers pipeline with finite weights")  # once per load
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipe.to(device)
    if torch_dtype is not None:
        pipe = pipe.to(dtype=torch_dtype)
    return pipe


def _from_pretrained(model: str, torch_dtype):
    from diffusers import DiffusionPipeline

    from .validate import check_model_path

    # safetensors only: a pickled .bin in a folder or repo is never unpickled
    load = dict(torch_dtype=torch_dtype, use_safetensors=True)
    check_model_path(model)
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ValueError(f"--model {model}: folder has no model_index.json (save one with pipe.save_pretrained)")
        from diffplug import testbed  # noqa: F401  (an exported testbed folder: its expected warnings filtered)

        try:
            return DiffusionPipeline.from_pretrained(local, local_files_only=True, **load)
        except OSError as err:
            raise ValueError(f"--model {model}: {err} (diffplug loads .safetensors weights only, never pickle)") from None
    try:  # a hub id: the local cache first, so an offline machine with the weights still works
        return DiffusionPipeline.from_pretrained(model, local_files_only=True, **load)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE"):
        raise ValueError(f"--model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        return DiffusionPipeline.from_pretrained(model, **load)
    except Exception as err:  # connection errors come in many types
        raise ValueError(
            f"--model {model}: no local folder of that name, and loading it from the Hugging Face Hub failed "
            f"({type(err).__name__}). "
            "If this machine is offline, point --model at a local folder holding a diffusers pipeline "
            "(saved with pipe.save_pretrained), or omit --model to use the built-in testbed."
        ) from err
