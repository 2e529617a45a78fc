"""``diffplug sample``: generate a grid with any model, scheduler, guidance and sampler.

Writes OUT/NNN.png (one per image), OUT/grid.png and OUT/settings.json, all together or none.
Exit status: 0 written; 2 error, nothing written: a bad argument or file (checked before torch is
imported and before the model loads; one line naming it), a run that produced non-finite latents
(no black image is written), or a file that could not be written (a full disk: named, and --out is
left as it was).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

from ..cli import light_module

# Nothing heavy at the top: `diffplug sample` parses and checks its arguments before importing torch.
_registry = light_module("diffplug.pipelines.registry")
BUILTIN_MODELS, SCHEDULERS = _registry.BUILTIN_MODELS, _registry.SCHEDULERS
# the names of diffplug.guidance.GUIDANCE and diffplug.samplers.SAMPLERS (tests/test_cli.py keeps them equal)
GUIDANCE_NAMES = ("ag", "apg", "apg-ag", "cfg", "linear-ag")
SAMPLER_NAMES = ("fkc",)
OUTPUTS = ("grid.png", "settings.json")


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate images through diffplug's loop", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"local folder or hub id; built in: {', '.join(BUILTIN_MODELS)} (default: testbed)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", type=Path, help="a text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="w in uncond + w (cond - uncond) (default 7.5); on Flux / Qwen-Image without --guidance: the "
                        "guidance embedding's scale, as the stock pipeline (no second pass)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's own")
    p.add_argument("--scheduler-opt", action="append", metavar="KEY=VALUE",
                   help="scheduler config override (of --scheduler, else of the model's own scheduler)")
    p.add_argument("--guidance", choices=GUIDANCE_NAMES, default=None,
                   help="default: cfg; on Flux / Qwen-Image: the stock pipeline's single pass (give one to add a second pass)")
    p.add_argument("--guidance-opt", action="append", metavar="KEY=VALUE", help="guidance option, e.g. eta=0")
    p.add_argument("--product-prompt", action="append", default=None,
                   help="a second prompt multiplied in (product of experts, ProductGuidance): one for all prompts or "
                        "one per --prompt; with --sampler fkc the product is sampled exactly")
    p.add_argument("--product-model", default=None,
                   help="evaluate --product-prompt with this second model (same latent space and schedule), e.g. testbed-dit")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None)
    p.add_argument("--particles", type=int, default=None, help="particles per output image (SMC samplers; --num-images n runs n x K per prompt)")
    p.add_argument("--sampler-opt", action="append", metavar="KEY=VALUE")
    p.add_argument("--early-exit", type=float, default=None, metavar="TAU",
                   help="DeeDiff early exit (transformer models, e.g. testbed-dit): rows exit at the first block whose uncertainty < TAU; 0 = full model")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="what `diffplug finetune` wrote (its final/ folder: LoRA, SaRA or full weights), applied to --model's "
                        "denoiser; refused when it was trained from another base model")
    p.add_argument("--early-exit-heads", default=None, help="heads file for --early-exit (default: the testbed DiT's shipped heads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-policy", type=Path, default=None,
                   help="a learned initial-noise policy (diffplug finetune find: D/final/noise_policy.safetensors)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    p.add_argument("--out", type=Path, required=True, help="output folder (grid.png, NNN.png, settings.json)")
    p.add_argument("--force", action="store_true", help="replace an earlier run's files in --out (others are kept)")
    p.set_defaults(func=run)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file} does not exist")
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    return prompts


def _is_run_file(path: Path) -> bool:
    """A file an earlier ``diffplug sample`` wrote: grid.png, settings.json, NNN.png."""
    return path.name in OUTPUTS or (path.suffix == ".png" and path.stem.isdigit())


def _check_args(args) -> None:
    """What can be checked before torch is imported and a model loads (the rest: ``validate.check_call``
    in ``run(...)``). ``--device`` last: checking it imports torch."""
    validate = light_module("diffplug.pipelines.validate")
    check_guidance_scale, positive_int = validate.check_guidance_scale, validate.positive_int

    positive_int(args.steps, "--steps")
    positive_int(args.num_images, "--num-images")
    if args.particles is not None:
        positive_int(args.particles, "--particles")
    if args.guidance_scale is not None:
        check_guidance_scale(args.guidance_scale, "--guidance-scale")
    for flag, value in (("--particles", args.particles), ("--sampler-opt", args.sampler_opt)):
        if value is not None and not args.sampler:
            raise ValueError(f"{flag} applies to a sampler; add --sampler ({', '.join(SAMPLER_NAMES)})")
    if args.product_model and not args.product_prompt:
        raise ValueError("--product-model evaluates --product-prompt; add --product-prompt")
    for flag in ("noise_policy", "early_exit_heads"):
        path = getattr(args, flag)
        if path and not Path(path).expanduser().is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.adapter and not (Path(args.adapter).expanduser() / "adapter.json").is_file():
        raise ValueError(f"--adapter {args.adapter}: no adapter.json there; give the final/ (or a checkpoint's) folder "
                         "that `diffplug finetune` wrote")
    if args.model and args.model not in BUILTIN_MODELS:
        validate.check_model_path(args.model)
    validate.check_out(args.out, _is_run_file, args.force)
    validate.check_device(args.device)


def _write_run(out: Path, images, sheet, settings: dict, earlier: list[Path]) -> None:
    """The images, grid.png and settings.json, all or none (``atomic.Batch``); then the earlier run's
    files that were not replaced go (--force), so none of its images is left mixed in. A file that
    cannot be written (a full disk) is named and the folder is left as it was."""
    from ..atomic import Batch

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with Batch() as batch:
            for i, image in enumerate(images):
                batch.save_image(image, out / f"{i:03d}.png")
            batch.save_image(sheet, out / "grid.png")
            batch.write_text(out / "settings.json", json.dumps(settings, indent=2, default=str))
            for path in earlier:
                batch.remove(path)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty
        raise


def grid(images, cols: int | None = None):
    """Tile PIL images row-major into one image."""
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % cols) * w, (i // cols) * h))
    return sheet


def _product_guidance(args, pipe, prompts: list[str], per_prompt: int, options: dict):
    """ProductGuidance for ``--product-prompt`` (on ``--product-model`` if given)."""
    from ..samplers import ProductGuidance, encode_condition
    from .registry import load_pipeline

    if args.guidance != "cfg":
        raise ValueError("--product-prompt combines prompts like CFG does; use it with --guidance cfg")
    second = list(args.product_prompt)
    if len(second) == 1:
        second *= len(prompts)
    if len(second) != len(prompts):
        raise ValueError(f"--product-prompt: give one, or one per --prompt ({len(prompts)}); got {len(second)}")
    other = load_pipeline(args.product_model, str(pipe.device), args.dtype) if args.product_model else None
    inputs = encode_condition(other or pipe, second, num_images_per_prompt=per_prompt)
    return ProductGuidance(inputs, second_model=other, **options)


def run(args) -> int:
    prompts = _prompts(args)
    _check_args(args)  # before importing torch and loading the model: fail fast

    import torch

    from . import from_pipe
    from .families import family_of
    from .registry import load_pipeline, make_guidance, make_sampler, make_scheduler, parse_options
    from .validate import check_out, check_size

    earlier = check_out(args.out, _is_run_file, args.force)
    if args.early_exit is not None or args.early_exit_heads:  # DeeDiff: a bad threshold fails before loading
        from ..samplers.early_exit import check_threshold

        check_threshold(args.early_exit, "--early-exit")
    policy = None
    if args.noise_policy:  # FIND: unknown prompts fail before the model loads
        from ..samplers.noise_policy import load_noise_policy

        policy = load_noise_policy(args.noise_policy)
        policy.index(prompts)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    if args.adapter:  # checked in full (record, base fingerprint, every tensor) before anything is applied
        from ..finetune.adapters import load as load_adapter

        load_adapter(pipe, Path(args.adapter).expanduser())
    early_exit = None
    if args.early_exit is not None:
        from ..samplers.early_exit import attach

        early_exit = attach(pipe, args.early_exit, args.early_exit_heads)
    if args.scheduler or args.scheduler_opt:
        pipe.scheduler = make_scheduler(args.scheduler, pipe, **parse_options(args.scheduler_opt))
    family = family_of(pipe)
    check_size(family, args.height, args.width, names=("--height", "--width"))
    # Flux-like: with no --guidance the run is the stock one (guidance_scale = the embedding, one pass)
    stock_scale = args.guidance is None and family.guidance_scale_is == "embedding"
    if stock_scale and (args.guidance_opt or args.product_prompt):
        raise ValueError(f"--guidance-opt / --product-prompt need --guidance on {type(pipe).__name__}: without it the run "
                         "is the stock single pass (--guidance-scale sets the guidance embedding)")
    args.guidance = args.guidance or "cfg"
    guidance_options = parse_options(args.guidance_opt)
    if args.guidance_scale is not None:
        guidance_options["guidance_scale"] = args.guidance_scale
    sampler, per_prompt = None, args.num_images
    if args.sampler:
        sampler_options = parse_options(args.sampler_opt)
        if args.particles is not None:
            sampler_options["num_particles"] = args.particles
        sampler = make_sampler(args.sampler, **sampler_options)
        per_prompt = args.num_images * getattr(sampler, "num_particles", 1)  # SMC: K particles per output image
    if stock_scale:
        guidance = None
    elif args.product_prompt:
        guidance = _product_guidance(args, pipe, prompts, per_prompt, guidance_options)
    else:
        guidance = make_guidance(args.guidance, **guidance_options)

    generator = torch.Generator(pipe.device).manual_seed(args.seed)
    pipe.set_progress_bar_config(desc=f"{len(prompts) * per_prompt} images, {args.steps} steps")
    latents = None
    if policy is not None:
        latents = policy.sample_initial_noise(
            prompts, per_prompt, generator, pipe=pipe, height=args.height, width=args.width, num_inference_steps=args.steps,
            guidance=args.guidance, guidance_scale=getattr(guidance, "guidance_scale", None), eta=0.0)
    start = time.perf_counter()
    result = from_pipe(pipe, guidance=guidance, sampler=sampler)(
        prompts,
        negative_prompt=[args.negative_prompt] * len(prompts) if args.negative_prompt else None,
        num_inference_steps=args.steps,
        num_images_per_prompt=per_prompt,
        height=args.height,
        width=args.width,
        generator=generator,
        latents=latents,
        **({"guidance_scale": args.guidance_scale} if stock_scale else {}),
    )
    seconds = time.perf_counter() - start

    images = result.images
    if sampler is not None and hasattr(result.sampler_output, "select"):
        images = result.sampler_output.select(images)  # one image per prompt: the sampler's choice
    settings = {
        "model": args.model or "testbed",
        "pipeline": type(pipe).__name__,
        "prompts": prompts,
        "negative_prompt": args.negative_prompt,
        "num_images_per_prompt": args.num_images,
        "steps": args.steps,
        "seed": args.seed,
        "scheduler": {"name": args.scheduler or "model default", "class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
        "guidance": {"name": args.guidance, "class": type(guidance).__name__, "config": dict(guidance.config),
                     "product_prompt": args.product_prompt, "product_model": args.product_model}
        if guidance is not None else {"name": "stock", "embedding_scale": args.guidance_scale},
        "sampler": None,
        "noise_policy": str(args.noise_policy) if args.noise_policy else None,
        "adapter": str(args.adapter) if args.adapter else None,
        "nfe_per_image": result.nfe,
        "seconds": round(seconds, 3),
        "device": str(pipe.device),
        # the samples and their prompts (prompt-major order): what `diffplug eval` scores, never grid.png
        "images": [{"file": f"{i:03d}.png", "prompt": prompts[i * len(prompts) // len(images)]}
                   for i in range(len(images))],
    }
    if early_exit is not None:  # blocks run per network evaluation (one sample, one pass), over the run
        settings["early_exit"] = {"threshold": args.early_exit, **early_exit.stats()}
    if sampler is not None:
        summary = result.sampler_output.summary() if hasattr(result.sampler_output, "summary") else {}
        settings["sampler"] = {"name": args.sampler, "class": type(sampler).__name__, **summary}
    _write_run(args.out, images, grid(images, cols=len(images) // len(prompts)
                                      if len(images) % len(prompts) == 0 and len(prompts) > 1 else None),
               settings, earlier)
    replaced = f"; replaced an earlier run's {len(earlier)} files" if earlier else ""
    print(f"wrote {len(images)} images, grid.png and settings.json to {args.out} ({seconds:.1f} s, {result.nfe} NFE/image{replaced})")
    return 0
