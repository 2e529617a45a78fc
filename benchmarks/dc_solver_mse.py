"""DC-Solver vs DDIM / DPM-Solver++ / UniPC: latent MSE to a 200-step DDIM ground truth at low NFE.

    python benchmarks/dc_solver_mse.py --model toy                       # analytic guided Gaussian, seconds
    python benchmarks/dc_solver_mse.py --model testbed --num-prompts 4   # the project's testbed SD model
    python benchmarks/dc_solver_mse.py --model tiny-flux --nfe 5 8 --guidance-scale 3 5  # any pipeline, flow too
    python benchmarks/dc_solver_mse.py --model testbed-flux --nfe 4 5 6 8 10 --guidance-scale 1 1.5 3 5 7.5 \
        --ship-cpr testbed-flow   # the flow testbed; --weights DIR for other weights (--in-progress: unfinished)

On flow pipelines every solver runs the pipeline's flow schedule (shift, Flux's dynamic-shift mu) and
the ground truth is a 200-step Euler trajectory (DDIM on the flow path is Euler). There the DDIM row
is that Euler step on the solvers' grid (UniPC's flow sigmas, from 1 - 1/1000), and a
``FlowMatchEuler`` row adds the stock ``FlowMatchEulerDiscreteScheduler`` on the schedule the
pipeline gives it (FluxPipeline: sigmas 1, ..., 1/n), as users run it. Guidance 1 is the conditional
pass alone (no CFG). Flux prompts are encoded at ``max_sequence_length=pipe.tokenizer_2.model_max_length``.

For every guidance scale g and NFE n: the ground truth is a 200-step DDIM (eta = 0) from t = T to sigma = 0
from the same noise.  Solvers, all with diffusers' defaults on the model's own schedule config, with
"linspace" timestep spacing (all start at t = T - 1) and the same final sigma (0):

* DDIM: ``DPMSolverMultistepScheduler(solver_order=1)`` (first-order data prediction = DDIM),
* DPM-Solver++: ``DPMSolverMultistepScheduler`` (2M),
* UniPC: ``UniPCMultistepScheduler`` (bh2, order 2),
* DC (searched): ``DCSolverScheduler`` with ratios searched by ``search_ratios`` on a *separate*
  search set (other prompts and noises: ``--search-prompts``, seed + 1),
* DC-DPM++ (searched): ``DCDPMSolverScheduler``, DC on DPM-Solver++ (predictor only), searched likewise,
* DC (CPR): ratios predicted by a CPR fitted (least squares) on the searched ratios of every *other*
  (g, n) of the grid (leave-one-out), so each prediction is for an unseen configuration.

Prints a markdown table and writes every number to ``--out`` (JSON), with ``cpr_fit_all``: the CPR
coefficients fitted on every searched cell (what ships as a named fit).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from diffplug.predictions import noise_levels
from diffplug.samplers.dc_solver import (
    DCDPMSolverScheduler,
    DCSolverScheduler,
    cpr_ratios,
    fit_cpr,
    reference_trajectory,
    search_ratios,
)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def toy_problem(guidance_scale: float, batch: int, seed: int):
    """An analytic guided Gaussian at SD's schedule: (model_fn, noise, scheduler config)."""
    g = torch.Generator().manual_seed(1234)  # the "model" is the same for every seed
    shape = (4, 16, 16)
    mu_c, mu_u = torch.randn(shape, generator=g), 0.3 * torch.randn(shape, generator=g)
    s_c = 0.2 + 0.5 * torch.rand(shape, generator=g)
    config = DCSolverScheduler(**SD).config

    def eps(x, a, s, mu, std):
        return s * (x - a * mu) / (a**2 * std**2 + s**2)

    sched = DCSolverScheduler(**SD)

    def model_fn(x, t):
        a, s = noise_levels(sched, torch.as_tensor(t).reshape(1))
        a, s = a.view(1, 1, 1, 1), s.view(1, 1, 1, 1)
        uncond = eps(x, a, s, mu_u, 1.0)
        return uncond + guidance_scale * (eps(x, a, s, mu_c, s_c) - uncond)  # CFG on epsilon

    noise = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))
    return model_fn, noise, config, None


def pipe_problem(pipe, prompts, guidance_scale: float, seed: int, height=None, width=None):
    """(model_fn, noise, scheduler config, mu) for any pipeline diffplug knows; ``mu``: a flow pipeline's
    dynamic-shift mu (Flux), else None."""
    from diffplug.samplers.dc_solver import guided_denoiser, pipeline_schedule

    model_fn, noise = guided_denoiser(
        pipe, prompts, guidance_scale, generator=torch.Generator().manual_seed(seed), height=height, width=width,
        **text_kwargs(pipe),
    )
    # "linspace" spacing: every solver and the ground truth start at t = T - 1 (with SD's "leading"
    # spacing each NFE would start from noise at a different, lower t and solve a different problem)
    config = {**DCSolverScheduler.from_config(pipe.scheduler.config).config, "timestep_spacing": "linspace", "steps_offset": 0,
              "dc_ratios": None}  # rho = 1 unless a row passes its ratios (no CPR guess for the reference)
    mu = pipeline_schedule(pipe, DCSolverScheduler.from_config(config), 2, noise).get("mu")
    return model_fn, noise, config, mu


def text_kwargs(pipe) -> dict:
    """The text-length argument every diffplug call on a Flux pipeline passes: the length its second
    encoder was trained at (``max_sequence_length=pipe.tokenizer_2.model_max_length``); {} elsewhere."""
    from diffplug.pipelines import family_of

    if family_of(pipe).name != "flux":
        return {}
    return {"max_sequence_length": pipe.tokenizer_2.model_max_length}


def load_model(model: str, device: str = "cpu", weights: str | None = None):
    """``load_pipeline(model)``; ``weights``: a testbed model's weights folder (default: the shipped ones)."""
    from diffplug.pipelines.registry import builtin_model, load_pipeline

    if weights is None:
        return load_pipeline(model, device)
    builtin = builtin_model(model)
    if builtin is None or builtin[0] != "testbed":
        raise ValueError(f"--weights {weights}: only a testbed model (--model testbed-flux, ...) takes a weights folder, "
                         f"not --model {model}")
    if not Path(weights).is_dir():
        raise ValueError(f"--weights {weights}: no such folder (a testbed weights folder, e.g. testbed/weights or /tmp/flux_run)")
    from diffplug import testbed

    return testbed.load(builtin[1], weights=weights).to(device)


@torch.no_grad()
def sample(scheduler, model_fn, noise, nfe, mu=None, schedule=None):
    """Solve from ``noise`` in ``nfe`` steps; ``schedule``: ``set_timesteps`` arguments (default ``mu`` only)."""
    scheduler.set_timesteps(nfe, device=noise.device, **(schedule or ({} if mu is None else {"mu": mu})))
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatchEuler has none (1)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model_fn(x_in, t), t, x).prev_sample
    return x.float()


def per_sample_mse(x: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """MSE to the ground truth per sample (the table's mean is their mean: every sample has the same size)."""
    return ((x - truth) ** 2).flatten(1).mean(1).tolist()


def paired(row: dict, a: str, b: str) -> str:
    """``a``'s MSE minus ``b``'s, sample by sample from the same noise: ± paired s.e. (two-sample beside it)."""
    from diffplug.evals.stats import gain

    per = row.get("per_sample", {})
    if a not in per or b not in per or len(per[a]) < 2:
        return "-"
    g = gain(per[b], per[a], f"{a} - {b}")
    return f"{g.gain:+.3g} ± {g.paired_se:.2g} (two-sample ± {g.two_sample_se:.2g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="toy, testbed, tiny-sd, a local folder or a hub id")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10])
    parser.add_argument("--guidance-scale", type=float, nargs="+", default=[1.5, 3.0, 7.5])
    parser.add_argument("--num-prompts", type=int, default=8, help="evaluation samples (prompts x 1 noise)")
    parser.add_argument("--search-prompts", type=int, default=8, help="search samples (other prompts/noises)")
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/dc_solver_mse.json")
    parser.add_argument("--ship-cpr", default=None, metavar="NAME",
                        help="write the CPR fit on every searched cell into samplers/dc_solver_cpr_NAME.json "
                             "(cpr_coefficients=NAME; testbed-flow: the flow default), keeping that file's "
                             "description; or to a FILE.json of your own (cpr_coefficients='FILE.json')")
    parser.add_argument("--weights", default=None, help="a testbed model's weights folder (default: the shipped ones)")
    parser.add_argument("--in-progress", action="store_true",
                        help="label the output: the model's training is not finished (numbers are provisional)")
    args = parser.parse_args()
    if args.weights and args.model == "toy":
        parser.error("--weights: the toy problem has no weights; pass --model testbed-flux (or another testbed model)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()

    if args.model == "toy":
        make = lambda g, n, seed: toy_problem(g, n, seed)  # noqa: E731
    else:
        from diffplug.samplers.dc_solver import pipeline_schedule
        from diffplug.testbed.data import FASHION_CLASSES, prompt_for_class

        pipe = load_model(args.model, args.device, args.weights)
        names = [prompt_for_class(c) for c in FASHION_CLASSES]
        eval_prompts = [names[i % len(names)] for i in range(args.num_prompts)]
        search_prompts = [names[(i + 5) % len(names)] for i in range(args.search_prompts)]

        def make(g, n, seed):
            return pipe_problem(pipe, eval_prompts if seed == args.seed else search_prompts, g, seed)

    rows, searched, problems = [], {}, {}
    for g in args.guidance_scale:
        model_fn, noise, config, mu = make(g, args.num_prompts, args.seed)
        search_fn, search_noise, *_ = make(g, args.search_prompts, args.seed + 1)
        at = {} if mu is None else {"mu": mu}  # flow pipelines with dynamic shifting (Flux)
        gt_sched = DCSolverScheduler.from_config(config)
        gt_sched.set_timesteps(1, device=noise.device, **at)  # one interval T -> 0: a plain 200-step DDIM (flow: Euler)
        truth = reference_trajectory(model_fn, gt_sched, noise, args.reference_steps)[-1]
        problems[g] = (model_fn, noise, config, mu, truth)
        for n in args.nfe:
            dc = DCSolverScheduler.from_config(config)
            dc.set_timesteps(n, device=search_noise.device, **at)
            ref = reference_trajectory(search_fn, dc, search_noise, args.reference_steps)  # search ground truth
            result = search_ratios(search_fn, dc, search_noise, n, reference=ref, iters=args.iters, **at)
            searched[(g, n)] = result.ratios
            dpm = DCDPMSolverScheduler.from_config(config)
            dpm.set_timesteps(n, **at)
            same = torch.equal(dpm.timesteps.cpu(), dc.timesteps.cpu()) and torch.equal(dpm.sigmas, dc.sigmas)
            dpm_ratios = search_ratios(
                search_fn, dpm, search_noise, n, reference=ref if same else None,
                reference_steps=args.reference_steps, iters=args.iters, **at,
            ).ratios  # fmt: skip
            plain = {k: v for k, v in config.items() if not k.startswith(("dc_", "cpr_"))}
            solvers = {
                "DDIM": DPMSolverMultistepScheduler.from_config(plain, solver_order=1),
                "DPM-Solver++": DPMSolverMultistepScheduler.from_config(plain),
                "UniPC": UniPCMultistepScheduler.from_config(plain),
                "DC (searched)": DCSolverScheduler.from_config(config, dc_ratios=result.ratios),
                "DC-DPM++ (searched)": DCDPMSolverScheduler.from_config(config, dc_ratios=dpm_ratios),
            }
            schedules = {}
            if config.get("use_flow_sigmas") and args.model != "toy":  # the stock flow scheduler, as the pipeline runs it
                euler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config) if isinstance(
                    pipe.scheduler, FlowMatchEulerDiscreteScheduler) else None
                if euler is not None:
                    solvers["FlowMatchEuler"] = euler
                    schedules["FlowMatchEuler"] = pipeline_schedule(pipe, euler, n, noise, **text_kwargs(pipe))
            row = {"guidance_scale": g, "nfe": n, "ratios_searched": result.ratios}
            for name, sched in solvers.items():
                x = sample(sched, model_fn, noise, n, mu, schedules.get(name))
                row[name] = float(torch.mean((x - truth) ** 2))
                row["per_sample"] = {**row.get("per_sample", {}), name: per_sample_mse(x, truth)}
            rows.append(row)
            print(f"g={g} n={n}: " + ", ".join(f"{k} {row[k]:.4g}" for k in solvers), flush=True)
    # DC (CPR): leave-one-out fits over the searched grid
    for row in rows:
        g, n = row["guidance_scale"], row["nfe"]
        others = [(gg, nn, r) for (gg, nn), r in searched.items() if (gg, nn) != (g, n)]
        if len(others) < 2:
            continue
        ratios = cpr_ratios(g, n, fit_cpr(others))
        model_fn, noise, config, mu, truth = problems[g]
        sched = DCSolverScheduler.from_config(config, dc_ratios=ratios)
        x = sample(sched, model_fn, noise, n, mu)
        row["DC (CPR)"] = float(torch.mean((x - truth) ** 2))
        row["per_sample"]["DC (CPR)"] = per_sample_mse(x, truth)
        row["ratios_cpr"] = ratios

    names = ["DDIM", "DPM-Solver++", "UniPC", "DC (searched)", "DC (CPR)", "DC-DPM++ (searched)"]
    if any("FlowMatchEuler" in row for row in rows):
        names.insert(1, "FlowMatchEuler")
    label = " (TRAINING IN PROGRESS: provisional weights)" if args.in_progress else ""
    print(f"\nmodel {args.model}{label}{f', weights {args.weights}' if args.weights else ''}, device {args.device} ({platform.machine()}), torch {torch.__version__}, "
          f"{args.num_prompts} eval / {args.search_prompts} search samples, {time.time() - started:.0f} s\n")
    pairs = [("DC (CPR)", "UniPC"), ("DC (searched)", "UniPC")]  # paired over the same noises
    print("| guidance | NFE | " + " | ".join(names) + " | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |")
    print("|---|---|" + "---|" * (len(names) + len(pairs)))
    for row in rows:
        cells = [f"{row[k]:.4g}" if k in row else "-" for k in names]
        best = min((row[k], k) for k in names if k in row and k not in ("DC-DPM++ (searched)", "FlowMatchEuler"))[1]
        cells = [f"**{c}**" if k == best else c for c, k in zip(cells, names)]
        diffs = [paired(row, a, b) for a, b in pairs]
        print(f"| {row['guidance_scale']} | {row['nfe']} | " + " | ".join(cells + diffs) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fit = fit_cpr((g, n, r) for (g, n), r in searched.items()) if len(searched) >= 2 else None
    out.write_text(json.dumps({"args": vars(args), "in_progress": args.in_progress, "rows": rows,
                               "cpr_fit_all": fit}, indent=1) + "\n")
    print(f"\nwrote {out}")
    if args.ship_cpr and fit is not None:
        import sys
        from datetime import datetime, timezone

        import diffplug.samplers as samplers

        from diffplug.samplers.dc_solver import CPR_FITS, cpr_fit_record

        if args.ship_cpr.endswith(".json"):  # a fit file of the user's: cpr_coefficients="FILE.json"
            target = Path(args.ship_cpr)
            target.parent.mkdir(parents=True, exist_ok=True)
        else:
            target = Path(samplers.__file__).parent / CPR_FITS.get(args.ship_cpr, f"dc_solver_cpr_{args.ship_cpr}.json")
        _, _, config, mu, _ = next(iter(problems.values()))
        # a new fit file starts from the box cpr_fit_record derives (config keys, flow shift); an existing one keeps its own
        about = dict(  # a new file's description; an existing file keeps its own
            description=f"DC-Solver CPR coefficients P[k][j][m] (4 x 3 x 3, row-major) fitted by diffplug for --model "
            f"{args.model}{f' (weights {args.weights})' if args.weights else ''} with DCSolverScheduler on the model's "
            f"own schedule config ({'flow sigmas' if config.get('use_flow_sigmas') else 'timestep_spacing linspace'}, "
            "solver_order 2, bh2, diffusers' UniPC defaults).", licence="Apache-2.0 (diffplug)")
        shipped = json.loads(target.read_text()) if target.is_file() else cpr_fit_record(
            ((g, n, r, mu) for (g, n), r in searched.items()), config, **about)
        shipped["source"] = (
            f"python benchmarks/dc_solver_mse.py {' '.join(sys.argv[1:])} "
            f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {args.device}): least-squares fit (fit_cpr) on the ratios "
            f"searched with search_ratios ({args.search_prompts} search samples, {args.iters} iterations, "
            f"{args.reference_steps}-step {'Euler' if config.get('use_flow_sigmas') else 'DDIM'} reference) for guidance scales {args.guidance_scale} x NFE {args.nfe}; "
            f"every number in {args.out}"
            + (f"; weights {args.weights}" if args.weights else "")
            + ("; TRAINING IN PROGRESS: provisional weights" if args.in_progress else "")
        )
        box = shipped.get("fitted_on", {})  # the box the scheduler trusts the fit in (its config list is kept)
        seen = [r for ratios in searched.values() for r in ratios]
        box.update(guidance_scale=[min(args.guidance_scale), max(args.guidance_scale)],
                   num_inference_steps=[min(args.nfe), max(args.nfe)], ratios=[min(seen), max(seen)])  # fmt: skip
        shipped["fitted_on"] = box
        shipped["coefficients"] = fit
        target.write_text(json.dumps(shipped, indent=2) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
