"""One place that checks what users pass to ``run(...)`` and ``diffplug sample``.

Its top level imports nothing heavy (torch is imported inside the checks that need it), so
``diffplug sample`` checks its arguments before importing torch.

Each bad value raises a ``ValueError`` naming the argument and the fix; nothing is silently
changed (no rounding of sizes, no dropped keywords). README's "What bad input gets" lists them.
"""

from __future__ import annotations

import inspect
import numbers
import tempfile
import typing
from pathlib import Path

from ..arguments import check_guidance_scale, positive_int

__all__ = [
    "NonFiniteLatentsError", "check_call", "check_device", "check_final_latents", "check_guidance", "check_guidance_scale",
    "check_latents", "check_negative", "check_out", "check_options", "check_prompt", "check_scheduler", "check_size",
    "positive_int",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Stock-pipeline arguments diffplug handles elsewhere: say where.
_HINTS = {
    "guidance_rescale": "pass it to the guidance: from_pipe(pipe, guidance=CFG(w, guidance_rescale=...))",
    "use_resolution_binning": "diffplug does no resolution binning; pass a valid height/width (False is accepted)",
}


def check_size(family, height, width, names=("height", "width")) -> tuple[int, int]:
    """``height``/``width`` (None: the model's default) as multiples of the model's size factor."""
    default = family.default_size()
    factor = family.size_factor()
    out = []
    for value, name, fallback in zip((height, width), names, default):
        if value is None:
            out.append(fallback)
            continue
        positive_int(value, name)
        if value % factor:
            low, high = value - value % factor, value - value % factor + factor
            nearest = f"{low} or {high}" if low else f"{high}"
            raise ValueError(f"{name}={value} is not a multiple of {factor} (this model's VAE/patch factor); use {nearest}")
        out.append(int(value))
    return out[0], out[1]


def check_prompt(prompt) -> None:
    """``prompt``: a string or a non-empty list of strings (None: ``prompt_embeds`` are given)."""
    if prompt is None or isinstance(prompt, str):
        return
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__} {prompt!r}")
    if not prompt:
        raise ValueError("prompt is an empty list: pass a string or a non-empty list of strings")
    bad = [p for p in prompt if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompt must be a list of strings; it holds {type(bad[0]).__name__} {bad[0]!r}")


def check_latents(family, latents, batch: int, height: int, width: int) -> None:
    """Initial ``latents``: a float tensor of the call's shape, every value finite (one check per call)."""
    if latents is None:
        return
    import torch

    if not isinstance(latents, torch.Tensor):
        kind = f"{type(latents).__module__}.{type(latents).__name__}"
        raise ValueError(f"latents must be a torch.Tensor, got {kind}"
                         + ("; convert it with torch.from_numpy(latents)" if kind.startswith("numpy.") else ""))
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point (initial noise), got {latents.dtype}")
    want = family.latent_shape(batch, height, width)
    if tuple(latents.shape) != want:
        raise ValueError(
            f"latents has shape {tuple(latents.shape)} but this call needs {want} "
            f"({batch} images of {height}x{width}); pass matching height/width/prompts or omit latents"
        )
    bad = int((~torch.isfinite(latents)).sum())  # the inputs' one host read; nothing is checked per step
    if bad:
        raise ValueError(f"latents hold {bad} non-finite values (NaN/inf) of {latents.numel()}; pass finite initial noise")


class NonFiniteLatentsError(ValueError):
    """The denoised latents hold NaN/inf: no image is decoded from them."""


def check_final_latents(latents, num_steps: int) -> None:
    """After the loop, once (one host read per call, none per step): non-finite final latents are an
    error, never a black image. The inputs were checked, so the cause is the model or a plugin."""
    import torch

    bad = int((~torch.isfinite(latents)).sum())
    if bad:
        raise NonFiniteLatentsError(
            f"the denoised latents hold {bad} non-finite values (NaN/inf) of {latents.numel()} after {num_steps} steps; "
            "no image was decoded. The inputs were finite: check the model's weights (a NaN weight gives this), "
            "a custom guidance or scheduler, and the dtype (fp16 can overflow; try --dtype fp32)")


def check_guidance(family, guidance):
    """``from_pipe(pipe, guidance=...)``: None (CFG), or a guidance object the loop can drive (a
    ``diffusers`` ``BaseGuidance``: ``set_state``, ``prepare_inputs``, called on the batches). A
    guidance-distilled UNet (LCM: the scale is a UNet input, one conditional pass) takes plain CFG
    without options it would ignore."""
    if guidance is None:
        return None
    missing = [m for m in ("set_state", "prepare_inputs", "__call__") if not callable(getattr(guidance, m, None))]
    if missing:
        raise ValueError(f"guidance={type(guidance).__name__}: not a guidance object (no {', '.join(missing)}); pass "
                         "one of diffplug.guidance (CFG(7.5), APG(...), AdaptiveGuidance(...)), a diffusers BaseGuidance, "
                         "or None for CFG at guidance_scale")
    if _distilled(family):
        config = dict(getattr(guidance, "config", None) or {})
        ignored = [f"{k}={config[k]!r}" for k, v in _CFG_NEUTRAL.items() if k in config and config[k] != v]
        if ignored:
            raise ValueError(f"this UNet is guidance-distilled (LCM: the guidance scale is a UNet input and each step is "
                             f"one conditional pass); it would ignore {', '.join(ignored)}: drop them (--guidance-opt) "
                             "and pass only the guidance scale")
    return guidance


# CFG options a guidance-distilled UNet cannot apply, with the values that change nothing
_CFG_NEUTRAL = {"start": 0.0, "stop": 1.0, "guidance_rescale": 0.0}


def _distilled(family) -> bool:
    denoiser = getattr(family, "denoiser", None)
    return getattr(getattr(denoiser, "config", None), "time_cond_proj_dim", None) is not None


def check_negative(family, negative_prompt, negative_prompt_embeds) -> None:
    """A guidance-distilled UNet runs no unconditional pass: a negative prompt would change nothing."""
    if (negative_prompt is not None or negative_prompt_embeds is not None) and _distilled(family):
        raise ValueError("negative_prompt: this UNet is guidance-distilled (LCM: one conditional pass per step, the "
                         "guidance scale is a UNet input), so a negative prompt changes nothing; drop it (--negative-prompt)")


def check_scheduler(family) -> None:
    """A flow-matching scheduler needs a flow-matching model (SD3, Flux, ...), which diffusers' pipeline
    class declares as its scheduler type; on an epsilon/v model it fails deep inside (no init_noise_sigma)."""
    from ..predictions import is_flow_scheduler

    pipe = family.pipe
    declared = inspect.signature(type(pipe).__init__).parameters.get("scheduler")
    declared = str(getattr(declared, "annotation", ""))
    if is_flow_scheduler(pipe.scheduler) and "FlowMatch" not in declared:
        kind = getattr(pipe.scheduler.config, "prediction_type", None) or "epsilon"
        raise ValueError(f"scheduler {type(pipe.scheduler).__name__} is a flow-matching scheduler, but "
                         f"{type(pipe).__name__} is a diffusion model ({kind} prediction); use a diffusion scheduler "
                         "(--scheduler ddim, euler, dpm++, unipc, unipc-fast or dc-solver)")


def _batch(prompt, prompt_embeds, num_images_per_prompt: int) -> int:
    if prompt_embeds is not None:
        return prompt_embeds.shape[0] * num_images_per_prompt
    return (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt


def check_call(family, *, prompt, prompt_embeds, height, width, num_inference_steps, num_images_per_prompt,
               guidance_scale, latents, output_type, family_kwargs: dict, negative_prompt=None,
               negative_prompt_embeds=None) -> tuple[int, int]:
    """Everything ``run(...)`` takes, checked before any work; returns (height, width)."""
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass `prompt` (a string or a list of strings) or `prompt_embeds`")
    check_prompt(prompt)
    positive_int(num_inference_steps, "num_inference_steps")
    positive_int(num_images_per_prompt, "num_images_per_prompt")
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
    _check_keywords(family, family_kwargs)
    check_scheduler(family)
    check_negative(family, negative_prompt, negative_prompt_embeds)
    height, width = check_size(family, height, width)
    check_latents(family, latents, _batch(prompt, prompt_embeds, num_images_per_prompt), height, width)
    return height, width


def _check_keywords(family, kwargs: dict) -> None:
    accepted = family.call_arguments()
    neutral = family.neutral_arguments
    unknown = [k for k in kwargs if k not in accepted and not (k in neutral and kwargs[k] == neutral[k])]
    if not unknown:
        return
    stock = set(inspect.signature(type(family.pipe).__call__).parameters)
    lines = []
    for k in unknown:
        why = _HINTS.get(k) or ("an argument of the stock pipeline that diffplug's loop does not support"
                                if k in stock else "not an argument of this pipeline")
        lines.append(f"{k}: {why}")
    from . import DiffplugPipeline

    extra = sorted(accepted - set(inspect.signature(DiffplugPipeline.__call__).parameters)) or ["none"]
    raise ValueError(
        f"run() got unsupported keyword argument(s): {'; '.join(lines)}. "
        f"Besides the stock arguments, {type(family.pipe).__name__} takes: {', '.join(extra)}"
    )


def check_options(cls, options: dict, flag: str) -> dict:
    """``options`` for ``cls(**options)``: each key a parameter of ``cls``, each value of its type."""
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
              if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for key, value in options.items():
        if key not in params:
            raise ValueError(f"{flag} {key}: {cls.__name__} has no such option; valid: {', '.join(sorted(params))}")
        default, annotation = params[key].default, params[key].annotation
        if typing.get_origin(annotation) is typing.Literal and value not in typing.get_args(annotation):
            raise ValueError(f"{flag} {key}={value!r}: use one of {', '.join(map(repr, typing.get_args(annotation)))}")
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, numbers.Real):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ValueError(f"{flag} {key}={value!r}: expects a {type(default).__name__} like {default!r}")
    return options


def check_device(device: str | None) -> str | None:
    """``device`` usable on this machine (None: the caller's default)."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA GPU torch can use; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: diffplug runs on cpu, cuda or mps")
    return device


def check_out(out: Path, taken_names, force: bool) -> list[Path]:
    """Prove the output folder writable now, before any model loads (nothing is created yet).

    Returns the earlier run's files found there (``taken_names(path) -> bool``); unless ``force``,
    any such file is an error: a run is never overwritten silently."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    base = next(p for p in (out, *out.absolute().parents) if p.exists())
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, f"{base} is a file")
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write there ({err.strerror or err}); choose a writable folder") from None
    taken = sorted(p for p in out.iterdir() if taken_names(p)) if out.is_dir() else []
    if taken and not force:
        names = ", ".join(p.name for p in taken[:3]) + ("..." if len(taken) > 3 else "")
        raise ValueError(f"--out {out} already holds a run ({names}); use another folder, or --force to replace it")
    return taken


def check_model_path(model: str) -> None:
    """A ``--model`` that reads as a path (not a hub id ``org/name``) must exist."""
    looks_local = model.startswith((".", "/", "~")) or model.endswith("/") or model.count("/") > 1 or "\\" in model
    if looks_local and not Path(model).expanduser().exists():
        raise ValueError(f"--model {model}: no such folder (it is a path, not a Hugging Face hub id)")
