"""Host syncs and ATen ops per denoising step, stock pipeline vs diffplug's loop, on a CPU.

``diffplug.pipelines.syncs.HostSyncs`` emulates where a GPU would block (reads of device tensors,
blocking host<->device copies) and counts every ATen op the step dispatches (model included), for
steps 2..n of one run (the first step may set up state once). Every shipped scheduler with CFG, and
every shipped guidance and sampler with DPM-Solver++, on ``diffplug.testing.tiny_pipeline("sd")``.
``--device cuda`` counts the same way on a GPU (add ``torch.cuda.set_sync_debug_mode`` to see real syncs).

    python benchmarks/loop_syncs.py [--steps 6] [--json]
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

warnings.filterwarnings("ignore")


def schedulers() -> dict:
    from diffplug import samplers

    names = {"DDIM": "ddim", "DPM-Solver++": "dpm++", "UniPC (diffusers)": "unipc", "DC-Solver": "dc-solver"}
    if hasattr(samplers, "FastUniPCScheduler"):
        names["UniPC (diffplug fast)"] = samplers.FastUniPCScheduler
    return names


def guidances(steps: int) -> dict:
    """name -> (guidance, sampler, images per prompt); a sampler owns the step for the whole batch."""
    from diffplug.guidance import APG, CFG, AdaptiveGuidance, LinearAG
    from diffplug.samplers import FKCSampler

    every_other = [None] + [[0.9, 0.1, 0.9, 0.0] if i % 2 else None for i in range(1, steps)]
    return {
        "CFG": (CFG(5.0), None, 1),
        "APG (x0)": (APG(5.0, eta=0.0, norm_threshold=15, momentum=-0.5), None, 1),
        "CFG cut-off (stop=0.5)": (CFG(5.0, stop=0.5), None, 1),
        "AdaptiveGuidance (all)": (AdaptiveGuidance(5.0, threshold=0.99), None, 1),
        "AdaptiveGuidance (per_sample, 2 images)": (AdaptiveGuidance(5.0, threshold=0.99, policy="per_sample"), None, 2),
        "LinearAG (estimate every other step)": (LinearAG(5.0, coefficients=every_other), None, 1),
        "FKC sampler (4 particles, CFG)": (CFG(5.0), FKCSampler(num_particles=4), 4),
    }


def measure(pipe, steps, guidance=None, sampler=None, images=1, stock=True) -> dict:
    from diffplug.pipelines import from_pipe
    from diffplug.pipelines.syncs import per_step

    call = dict(guidance_scale=5.0, output_type="latent", num_images_per_prompt=images,
                generator=torch.Generator(pipe.device).manual_seed(0))
    row = {}
    if stock:
        s = per_step(pipe, "a photo of a sneaker", steps, **call)
        row.update(stock_syncs=s["syncs_per_step"], stock_ops=s["ops_per_step"])
    call["generator"] = torch.Generator(pipe.device).manual_seed(0)
    d = per_step(from_pipe(pipe, guidance=guidance, sampler=sampler), "a photo of a sneaker", steps, **call)
    row.update(diffplug_syncs=d["syncs_per_step"], diffplug_ops=d["ops_per_step"], sites=d["sites"])
    return row


def main():
    from diffplug.pipelines.registry import make_scheduler
    from diffplug.testing import tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="also print the rows (with sync sites) as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd").to(args.device)
    pipe.set_progress_bar_config(disable=True)

    rows = []
    for name, sched in schedulers().items():
        if not isinstance(sched, str):
            pipe.scheduler = sched.from_config(pipe.scheduler.config)
        else:  # the stock loop cannot tell DC-Solver the guidance scale (from_pipe does): give it in the config
            pipe.scheduler = make_scheduler(sched, pipe, **({"cpr_guidance_scale": 5.0} if sched == "dc-solver" else {}))
        rows.append({"scheduler": name, "guidance": "CFG", **measure(pipe, args.steps)})
    pipe.scheduler = make_scheduler("dpm++", pipe)
    for name, (guidance, sampler, images) in guidances(args.steps).items():
        if name == "CFG":
            continue
        rows.append({"scheduler": "DPM-Solver++", "guidance": name,
                     **measure(pipe, args.steps, guidance, sampler, images, stock=False)})

    print("| scheduler | guidance / sampler | stock syncs/step | diffplug syncs/step | stock ops/step | diffplug ops/step |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        stock_s = f"{r['stock_syncs']:.1f}" if "stock_syncs" in r else "—"
        stock_o = f"{r['stock_ops']:.0f}" if "stock_ops" in r else "—"
        print(f"| {r['scheduler']} | {r['guidance']} | {stock_s} | {r['diffplug_syncs']:.1f} | {stock_o} | {r['diffplug_ops']:.0f} |")
    for r in rows:  # where the remaining syncs come from
        for site, n in r["sites"].items():
            print(f"- {r['scheduler']} + {r['guidance']}: {n / (args.steps - 1):.1f}/step {site}")
    if args.json:
        print(json.dumps({"steps": args.steps, "device": args.device, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
