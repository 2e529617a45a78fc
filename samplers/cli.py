"""``diffplug bench dc-search``: search DC-Solver's compensation ratios (and fit CPR) on a pipeline."""

from __future__ import annotations

import json
import sys
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
            "OUT/scheduler_config.json (load with DCSolverScheduler.from_pretrained(OUT)); with two or more, "
            "OUT/cpr_fit.json, a CPR fit with the box it holds in (cpr_coefficients='OUT/cpr_fit.json'). Any "
            "pipeline diffplug knows works, flow-matching ones (Flux, SD3) included: they are searched on their "
            "own flow schedule against a 200-step Euler trajectory."
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
    p.add_argument("--mu", type=float, nargs="+", default=None,
                   help="flow pipelines with dynamic shifting (Flux): search at each of these mu instead of the "
                        "pipeline's own (widens the fit's shift box to other resolutions' schedules)")
    p.add_argument("--ship", default=None, metavar="NAME",
                   help="also write the CPR fit as the package's named fit (e.g. testbed-flow: "
                        "samplers/dc_solver_cpr_testbed_flow.json); for maintainers")
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
    from .dc_solver import CPR_FITS, DCDPMSolverScheduler, DCSolverScheduler, cpr_fit_record, search_ratios_for_pipe

    out = Path(args.out)
    targets = [out / "dc_search.json"]
    mus = args.mu or [None]
    single = len(args.guidance_scale) * len(args.steps) * len(mus) == 1
    targets.append(out / ("scheduler_config.json" if single else "cpr_fit.json"))
    if args.ship is not None and (single or args.ship not in CPR_FITS):
        raise ValueError(f"--ship: name one of {', '.join(CPR_FITS)}, with two or more configurations to fit on")
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
    for scale, nfe, mu in ((g, n, m) for g in args.guidance_scale for n in args.steps for m in mus):
        start = time.perf_counter()
        result = search_ratios_for_pipe(
            pipe, prompts, scale, nfe,
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
            height=args.height, width=args.width,
            reference_steps=args.reference_steps, iters=args.iters, lr=args.lr, mu=mu,
        )  # fmt: skip
        records.append(
            {
                "guidance_scale": scale,
                "num_inference_steps": nfe,
                "mu": result.mu,
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "dc_search.json").write_text(json.dumps(summary, indent=2) + "\n")
    if single:
        cls.from_config(pipe.scheduler.config, dc_ratios=records[0]["ratios"]).save_pretrained(out)
        print(f"wrote {out / 'scheduler_config.json'}: DCSolverScheduler.from_pretrained({str(out)!r})")
    else:
        fit = cpr_fit_record(
            ((r["guidance_scale"], r["num_inference_steps"], r["ratios"], r["mu"]) for r in records),
            pipe.scheduler.config, pipe.scheduler.config.dc_order,
            description=f"DC-Solver CPR fit for {args.model or 'testbed'} ({type(pipe).__name__}), {args.solver}",
            source=f"diffplug bench dc-search {' '.join(sys.argv[2:])} (every searched ratio in dc_search.json)",
        )  # fmt: skip
        (out / "cpr_fit.json").write_text(json.dumps(fit, indent=2) + "\n")
        print(f"CPR fitted on {len(records)} configurations: {cls.__name__}.from_config(pipe.scheduler.config, "
              f"cpr_coefficients={str(out / 'cpr_fit.json')!r}, cpr_guidance_scale=...)")
        if args.ship:
            shipped = Path(__file__).with_name(CPR_FITS[args.ship])
            shipped.write_text(json.dumps(fit, indent=2) + "\n")
            print(f"wrote {shipped} (cpr_coefficients={args.ship!r})")
    print(f"wrote {out / 'dc_search.json'}")
    return 0
