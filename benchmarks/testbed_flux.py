"""Prompt alignment of the rectified-flow testbed model (``testbed.load("flux")``), written into a
marked section of benchmarks/testbed_results.md.

The stock ``FluxPipeline`` call, FlowMatchEuler, ``--steps`` steps, true CFG (``negative_prompt=""``,
``true_cfg_scale``; scale 1 is one conditional pass), ``max_sequence_length`` = the trained length;
the testbed classifier's top-1 on images of the ten Fashion-MNIST class prompts, seeds fixed.

    python benchmarks/testbed_flux.py --images 200 --steps 20 --scales 1 3 5 --write
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
from testbed_quality import accuracy, class_prompts  # noqa: E402  (benchmarks/ is the script's folder)

BEGIN, END = "<!-- testbed_flux.py: begin -->", "<!-- testbed_flux.py: end -->"


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default=None, help="weights folder (default: the shipped testbed/weights)")
    p.add_argument("--in-progress", action="store_true", help="label the numbers: training is not finished")
    p.add_argument("--write", action="store_true", help="replace the flux section of benchmarks/testbed_results.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    folder = Path(args.weights) if args.weights else testbed.WEIGHTS_DIR
    record = json.loads((folder / "flux.record.json").read_text())
    pipe = testbed.load("flux", weights=folder)
    pipe.set_progress_bar_config(disable=True)
    classifier = testbed.load_classifier()
    prompts, labels = class_prompts(args.images)
    rows = []
    for scale in args.scales:
        t = time.time()
        images = generate(pipe, prompts, scale, args.steps, args.seed, args.batch)
        acc = accuracy(classifier, images, labels)
        rows.append(dict(scale=scale, seconds=time.time() - t, **acc))
        print(json.dumps(rows[-1]), flush=True)
    minutes, steps = training_so_far(record)
    cmd = "python benchmarks/testbed_flux.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        BEGIN,
        "## Rectified-flow transformer (`load(\"flux\")`): prompt alignment",
        "",
        f"- After {minutes:.0f} minutes of training{' (in progress)' if args.in_progress else ''}: {steps:,} steps of "
        f"batch {record['batch_size']}, weights of {record['date']}.",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Device: CPU ({platform.machine()}), "
        f"{args.threads} thread(s), shared with other jobs (1-min load {os.getloadavg()[0]:.1f}): times are upper bounds.",
        f"- Command: `{cmd}` ({(time.time() - start) / 60:.1f} min).",
        f"- Stock `FluxPipeline`, FlowMatchEuler {args.steps} steps, shift {record['shift']}, "
        "`max_sequence_length=pipe.tokenizer_2.model_max_length`; true CFG (`negative_prompt=\"\"`, "
        "`true_cfg_scale`); scale 1 = one conditional pass.",
        "",
        "| CFG scale | images | top-1 (19 classes) | top-1 (10 Fashion-MNIST classes) | brightness | s / image |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['scale']:g} | {args.images} | {r['top1_all_19']:.3f} | {r['top1_fashion_10']:.3f} | "
                     f"{r['brightness']:.3f} | {r['seconds'] / args.images:.3f} |")
    lines += ["", "Real Fashion-MNIST test images: brightness 0.220 (see the UNet's rows above).", END]
    section = "\n".join(lines)
    print(section)
    if args.write:
        path = HERE / "testbed_results.md"
        text = path.read_text()
        if BEGIN in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
