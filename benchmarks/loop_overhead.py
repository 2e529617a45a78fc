"""Per-step overhead of diffplug's loop versus the stock pipeline's own loop.

The denoiser is replaced by a free stand-in (returns a cheap function of its input) so that only
loop machinery is timed: guidance bookkeeping, batching, scheduler maths, callbacks. Both loops run
the same pipeline, scheduler and prompts; the minimum over repeats is reported. On a shared CPU
the process's own CPU time (one thread) is timed, which other load barely disturbs; on CUDA, wall
time after a synchronize.

    python benchmarks/loop_overhead.py [--steps 50] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch

from diffplug.pipelines import from_pipe
from diffplug.testing import tiny_pipeline

warnings.filterwarnings("ignore")


class FreeUNet(torch.nn.Module):
    """Stands in for the UNet: same call signature, negligible cost."""

    def __init__(self, unet):
        super().__init__()
        self.config, self.dtype, self.device = unet.config, unet.dtype, unet.device
        self.add_embedding = getattr(unet, "add_embedding", None)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False, **kw):
        return (sample * 0.5,)


def timed(fn, repeats, cuda=False):
    clock = time.perf_counter if cuda else time.process_time
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)

    rows = []
    for scheduler in ("ddim", "dpm++", "unipc"):
        pipe = tiny_pipeline("sd").to(args.device)
        from diffplug.pipelines.registry import make_scheduler

        pipe.scheduler = make_scheduler(scheduler, pipe)
        pipe.set_progress_bar_config(disable=True)
        pipe.unet = FreeUNet(pipe.unet)
        prompts = ["a photo of a sneaker"] * args.batch
        kw = dict(num_inference_steps=args.steps, guidance_scale=5.0, output_type="latent")
        stock = timed(lambda: pipe(prompts, **kw), args.repeats, cuda)
        ours = timed(lambda: from_pipe(pipe)(prompts, **kw), args.repeats, cuda)
        rows.append(
            {
                "scheduler": scheduler,
                "stock_ms_per_step": 1000 * stock / args.steps,
                "diffplug_ms_per_step": 1000 * ours / args.steps,
            }
        )
    print(json.dumps({"device": args.device, "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch, "rows": rows}, indent=2))
    print("\n| scheduler | stock loop ms/step | diffplug loop ms/step |\n|---|---|---|")
    for r in rows:
        print(f"| {r['scheduler']} | {r['stock_ms_per_step']:.2f} | {r['diffplug_ms_per_step']:.2f} |")


if __name__ == "__main__":
    main()
