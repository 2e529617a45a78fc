"""The combined run: APG + Adaptive Guidance + DC-Solver in ONE ``from_pipe`` call, against each part alone
and against CFG, on the flow testbed (issue 26 item 3).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/flow_combined.py --images 200 --steps 8 --scale 5

One call: the scheduler swapped the diffusers way (``DCSolverScheduler.from_config(pipe.scheduler.config,
cpr_coefficients=...)``; ``from_pipe`` tells it the guidance scale, so its CPR ratios are the fit's for
that scale and step count), and one guidance object, :class:`AdaptiveAPG`: Adaptive Guidance decides
which passes run (both until the conditional and unconditional x0 predictions align, γ_t > γ̄, for every
image of the call; then the conditional pass alone), APG combines the two passes while both run::

    run = from_pipe(pipe_with_dc_solver, guidance=AdaptiveAPG(w, threshold, eta=0, norm_threshold=r, momentum=-0.5))

Identity settings, each part in turn: ``APG(eta=1, norm_threshold=0, momentum=0)`` is CFG bit for bit,
γ̄ >= 1 never switches, DC-Solver with every ratio 1 is UniPC (``tests/test_flow_combined.py``).

Rows, all from the same prompts and noise (``--batch`` images per call; 1, the default, makes AG's
switch per image): CFG + FlowMatchEuler (the stock pipeline's sampler), CFG + DC-Solver, APG + Euler,
AG + Euler, APG + AG + DC-Solver, and CFG + Euler at ``--reference-steps`` as the quality target.
Prompts: ``guidance_quality.prompt_set`` (half Fashion-MNIST class prompts, half held-out emoji captions).
Columns: network evaluations per image (the loop's count) and the share saved against CFG at the same
steps; wall and process-CPU seconds per image (the machine is shared: CPU time is the measure);
alignment (testbed classifier top-1 for the prompt's class) and its gain over CFG + Euler, image by
image (± paired s.e., two-sample beside it); FID and precision (``--features testbed`` classifier
features, or ``inception``; small N: compare rows); emoji saturation; PSNR to CFG + Euler.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffplug.guidance import APG, CFG, AdaptiveAPG, AdaptiveGuidance

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from guidance_quality import (  # noqa: E402
    Scorer,
    align_vs,
    emit,
    fmt,
    load_model,
    prompt_set,
    render,
    x0_norms,
)


def dc_solver(pipe, cpr: str | None = None):
    """``pipe.scheduler`` as DC-Solver, the diffusers way, with CPR ratios from the fit ``cpr`` (None: its default)."""
    from diffplug.samplers import DCSolverScheduler

    return DCSolverScheduler.from_config(pipe.scheduler.config, dc_ratios="cpr", cpr_coefficients=cpr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux", choices=["flux", "sd", "dit"], help="testbed model")
    p.add_argument("--weights", default=None, help="the testbed model's weights folder (default: the shipped ones)")
    p.add_argument("--in-progress", action="store_true", help="label the numbers: the model is still training")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--reference-steps", type=int, default=20, help="CFG + Euler at this many steps too (0: skip)")
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--threshold", type=float, default=0.999, help="AG's γ̄ (x0 space)")
    p.add_argument("--cpr", default=None, help="DC-Solver's CPR fit: a shipped name or a fit .json file (default: "
                   "the scheduler's, testbed-flow on flow schedules)")
    p.add_argument("--batch", type=int, default=1, help="images per call (AG switches when all of a call's have)")
    p.add_argument("--features", default="testbed", help="FID features: testbed, inception or none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append the markdown section to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    pipe, classifier, model_name = load_model(args.model, args.weights)
    pipe.set_progress_bar_config(disable=True)
    euler = pipe.scheduler
    items = prompt_set(args.images, args.seed)
    prompts = [q for q, _, _ in items]
    score = Scorer(items, classifier, args.features)
    w, n = args.scale, args.steps
    r = x0_norms(pipe, prompts[: max(args.batch, 8)], n, w, args.seed)
    apg = dict(eta=0.0, norm_threshold=r, momentum=-0.5)
    dc = dc_solver(pipe, args.cpr)
    own = type(euler).__name__.removesuffix("Scheduler").removesuffix("DiscreteScheduler")  # FlowMatchEuler
    own = own.removesuffix("Discrete")
    configs = [  # (name, scheduler, guidance, steps)
        (f"CFG + {own}", euler, CFG(w), n),
        ("CFG + DC-Solver", dc, CFG(w), n),
        (f"APG + {own}", euler, APG(w, **apg), n),
        (f"AG γ̄={args.threshold:g} + {own}", euler, AdaptiveGuidance(w, args.threshold, policy="all"), n),
        ("APG + AG + DC-Solver (one call)", dc, AdaptiveAPG(w, args.threshold, **apg), n),
    ]
    if args.reference_steps:
        configs.append((f"CFG + {own}, {args.reference_steps} steps", euler, CFG(w), args.reference_steps))

    rows, ratios, warned = [], None, set()
    for name, scheduler, guidance, steps in configs:
        pipe.scheduler = scheduler
        wall, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images, nfe, denoiser_cpu = render(pipe, guidance, prompts, steps, args.seed, args.batch)
        warned |= {str(m.message) for m in caught if "DC-Solver" in str(m.message)}
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if scheduler is dc:
            ratios = scheduler.compensation_ratios
        ref = rows[0]["images"] if rows else None
        row = dict(score(images, ref), name=name, steps=steps, nfe=nfe, wall=wall / len(prompts),
                   cpu=cpu / len(prompts), denoiser_cpu=denoiser_cpu / len(prompts), images=images)
        rows.append(row)
        print(f"{name}: NFE/img {nfe:g}, align {fmt(row.get('align'))}, FID {fmt(row.get('fid'), 2)}, "
              f"CPU {row['cpu']:.3f} s/img", flush=True)
    pipe.scheduler = euler

    base = rows[0]
    lines = [
        f"### APG + AG + DC-Solver in one call on {model_name}",
        "",
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, CPU ({platform.machine()}), {args.threads} thread(s), "
        f"shared machine: wall times are upper bounds, CPU times the measure; torch {torch.__version__}; "
        f"{time.time() - started:.0f} s in all.",
        f"- Command: `python benchmarks/flow_combined.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- {len(prompts)} prompts ({int(score.is_emoji.sum())} emoji, {int((~score.is_emoji).sum())} Fashion-MNIST), "
        f"{args.batch} image(s) per call, w = {w:g}, {n} steps; APG η = 0, β = −0.5, r = {r:.2f} (median ‖D_c − D_u‖ "
        f"under CFG); AG γ̄ = {args.threshold:g} in x0 space; DC-Solver CPR fit `{dc.config.cpr_coefficients or 'default'}`, ratios "
        f"{[round(x, 3) for x in ratios]}." + (" DC-Solver warned: " + "; ".join(sorted(warned)) if warned else ""),
        "",
        "| method | steps | NFE/img | saved vs CFG | wall s/img | CPU s/img | denoiser CPU s/img | align | align − CFG | "
        "FID | precision | saturation | PSNR to CFG (dB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        saved = 100 * (1 - row["nfe"] / base["nfe"])
        lines.append(
            f"| {row['name']} | {row['steps']} | {row['nfe']:g} | {saved:.1f} % | {row['wall']:.3f} | {row['cpu']:.3f} | "
            f"{row['denoiser_cpu']:.3f} | {fmt(row.get('align'))} | {align_vs(row, base) if row is not base else '–'} | "
            f"{fmt(row.get('fid'), 2)} | {fmt(row.get('precision'), 2)} | {fmt(row.get('sat'))} | "
            f"{fmt(row.get('psnr', math.inf) if row is not base else math.inf, 1)} |"
        )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
