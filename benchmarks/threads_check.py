"""CPU seconds of the same testbed sampling call at 1 and at 2 torch threads (on a shared machine, spinning
OpenMP threads cost far more CPU than they save wall-clock).

    python benchmarks/threads_check.py 1; python benchmarks/threads_check.py 2

Samples 8 Fashion-MNIST prompts x 4 images, 20 DDIM steps, CFG 5 (one batch of ``spo-pm``'s pair generation) and
prints the process's CPU (user + sys) and wall seconds for that call.
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def main(threads: int) -> None:
    from diffplug import testbed
    from diffplug.finetune.pairs import FASHION_PROMPTS
    from diffplug.guidance.base import CFG
    from diffplug.pipelines import from_pipe

    torch.set_num_threads(threads)
    pipe = testbed.load("sd")
    pipe.set_progress_bar_config(disable=True)
    run = from_pipe(pipe, guidance=CFG(5.0))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, wall0 = usage.ru_utime + usage.ru_stime, time.time()
    gens = [torch.Generator().manual_seed(i) for i in range(32)]
    run(FASHION_PROMPTS[:8], num_images_per_prompt=4, num_inference_steps=20, generator=gens, height=32, width=32,
        output_type="pt")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{threads} threads: 32 images, CPU {usage.ru_utime + usage.ru_stime - cpu0:.1f} s, "
          f"wall {time.time() - wall0:.1f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
