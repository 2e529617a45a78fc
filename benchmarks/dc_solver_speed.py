"""Scheduler-only cost per step (no model) of DC-Solver vs diffusers' UniPC, at SD1.5 latent shape.

    python benchmarks/dc_solver_speed.py [--device cpu|cuda] [--steps 10] [--repeats 30] [--shape 1 4 64 64]

Each repeat runs a whole ``set_timesteps`` + ``steps`` x ``step()`` trajectory with precomputed model
outputs, and the time of the steps only (not ``set_timesteps``) is divided by the number of steps; the
table reports the median over repeats.  On CUDA the clock is read after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffplug.samplers import DCDPMSolverScheduler, DCSolverScheduler, FastUniPCScheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def per_step_ms(make, steps: int, repeats: int, shape, device) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    outputs = [torch.randn(shape, generator=g).to(device) for _ in range(steps)]
    x0 = torch.randn(shape, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for r in range(repeats + 3):  # 3 warm-up runs
        sched = make()
        sched.set_timesteps(steps, device=device)
        sched.step(outputs[0], sched.timesteps[0], x0)  # the first step locates the start index (one sync)
        x = x0
        sync()
        start = time.perf_counter()
        for i in range(1, steps):
            x = sched.step(outputs[i], sched.timesteps[i], x).prev_sample
        sync()
        if r >= 3:
            times.append((time.perf_counter() - start) * 1e3 / (steps - 1))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 4, 64, 64])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ratios = [1.0, 1.0] + [0.9] * (args.steps - 2)
    cases = {
        "UniPCMultistepScheduler (diffusers)": lambda: UniPCMultistepScheduler(**SD),
        "FastUniPCScheduler": lambda: FastUniPCScheduler(**SD),
        "DCSolverScheduler, dc_ratios=null": lambda: DCSolverScheduler(**SD, dc_ratios=None),
        "DCSolverScheduler, searched ratios": lambda: DCSolverScheduler(**SD, dc_ratios=ratios),
        "DPMSolverMultistepScheduler (diffusers)": lambda: DPMSolverMultistepScheduler(**SD),
        "DCDPMSolverScheduler, searched ratios": lambda: DCDPMSolverScheduler(**SD, dc_ratios=ratios),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"shape {tuple(args.shape)}, {args.steps} steps, median of {args.repeats}")
    print("| scheduler | ms / step |\n|---|---|")
    for label, make in cases.items():
        print(f"| {label} | {per_step_ms(make, args.steps, args.repeats, tuple(args.shape), device):.3f} |")


if __name__ == "__main__":
    main()
