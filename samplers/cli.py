"""``diffplug bench dc-search``: search DC-Solver's compensation ratios (and fit CPR) on a pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="offline searches and measurements for samplers")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    p = sub.add_parser(
        "dc-search",
        help="search DC-Solver compensation ratios against a 200-step DDIM ground truth",
        description=(
            "Search DC-Solver's per-step compensation ratios (Zhao et al., ECCV 2024) for each "
            "(guidance scale, NFE) given; with two or more configurations also fit the cascade "
            "polynomial regression (CPR). Writes OUT/dc_search.json and, for a single configuration, "
            "OUT/scheduler_config.json (load with DCSolverScheduler.from_pretrained(OUT))."
        ),
    )
    p.add_argument("--model", default=None, help="testbed (default), tiny-sd, tiny-flow, a local folder or a hub id")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--solver", default="unipc", choices=["unipc", "dpm++"], help="DC on UniPC (DC-Solver) or DPM-Solver++")
    p.add_argument("--guidance-scale", type=float, nargs="+", default=[7.5])
    p.add_argument("--steps", type=int, nargs="+", default=[5], help="NFE (number of inference steps)")
    p.add_argument("--prompt", action="append", help="a search prompt (repeatable); default: the testbed's class prompts")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noises (one per prompt)")
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite files in OUT")
    p.set_defaults(func=run_dc_search)


def _prompts(args) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    from ..testbed.data import FASHION_CLASSES, prompt_for_class

    return [prompt_for_class(FASHION_CLASSES[i % len(FASHION_CLASSES)]) for i in range(args.num_prompts)]


def run_dc_search(args) -> int:
    import torch

    from ..pipelines.registry import load_pipeline
    from .dc_solver import DCDPMSolverScheduler, DCSolverScheduler, fit_cpr, search_ratios_for_pipe

    out = Path(args.out)
    targets = [out / "dc_search.json"]
    single = len(args.guidance_scale) * len(args.steps) == 1
    if single:
        targets.append(out / "scheduler_config.json")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} exist; pass --force to overwrite or choose another --out")
    if any(n < 1 for n in args.steps) or args.num_prompts < 1:
        raise ValueError("--steps and --num-prompts must be positive")

    pipe = load_pipeline(args.model, args.device, args.dtype)
    cls = DCSolverScheduler if args.solver == "unipc" else DCDPMSolverScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config, dc_ratios=None)
    prompts = _prompts(args)
    device = pipe._execution_device
    records = []
    for scale in args.guidance_scale:
        for nfe in args.steps:
            start = time.perf_counter()
            result = search_ratios_for_pipe(
                pipe, prompts, scale, nfe,
                generator=torch.Generator(device="cpu").manual_seed(args.seed),
                height=args.height, width=args.width,
                reference_steps=args.reference_steps, iters=args.iters, lr=args.lr,
            )  # fmt: skip
            records.append(
                {
                    "guidance_scale": scale,
                    "num_inference_steps": nfe,
                    "ratios": result.ratios,
                    "step_mse_initial": result.losses_initial,
                    "step_mse_searched": result.losses_searched,
                    "final_mse": result.final_mse,
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
            print(f"CFG {scale} NFE {nfe}: ratios {[round(r, 4) for r in result.ratios]}, final MSE {result.final_mse:.5g}")
    summary = {
        "model": args.model or "testbed",
        "solver": args.solver,
        "device": str(device),
        "prompts": prompts,
        "seed": args.seed,
        "reference_steps": args.reference_steps,
        "iters": args.iters,
        "lr": args.lr,
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "results": records,
    }
    if len(records) >= 2:
        summary["cpr_coefficients"] = fit_cpr(
            (r["guidance_scale"], r["num_inference_steps"], r["ratios"]) for r in records
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "dc_search.json").write_text(json.dumps(summary, indent=2) + "\n")
    if single:
        cls.from_config(pipe.scheduler.config, dc_ratios=records[0]["ratios"]).save_pretrained(out)
        print(f"wrote {out / 'scheduler_config.json'}: DCSolverScheduler.from_pretrained({str(out)!r})")
    if "cpr_coefficients" in summary:
        print(f"CPR fitted on {len(records)} configurations: dc_ratios='cpr' with cpr_coefficients from {out / 'dc_search.json'}")
    print(f"wrote {out / 'dc_search.json'}")
    return 0
