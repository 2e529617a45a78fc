"""Time APG's per-step maths: diffplug.guidance.APG vs diffusers' AdaptiveProjectedGuidance.

Only the guidance combine is timed, no network: ``set_state`` + ``guider(batches)`` as a loop
calls them, on random predictions of the given shape, with momentum, rescaling and projection on.
Also counts the ATen operators one step dispatches, with a ``TorchDispatchMode`` (every kernel-level
op, views and 0-d scalar ops included: a proxy for GPU kernel launches, which bound the time at this
size on a GPU). The timestep tensor is made once, outside the step, so only the guider is counted.

    python benchmarks/guidance_apg_timing.py --device cpu --shape 2 4 64 64 --iters 2000
    python benchmarks/guidance_apg_timing.py --device cuda --compile  # on a GPU machine
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from diffusers import AdaptiveProjectedGuidance
from diffusers.modular_pipelines.modular_pipeline import BlockState
from torch.utils._python_dispatch import TorchDispatchMode

from diffplug.guidance import APG, CFG
from diffplug.predictions import StepContext


def make_guiders(w: float, r: float, beta: float, compiled: bool = False):
    guiders = {
        "CFG (diffplug, reference floor)": (CFG(w), None),
        "APG diffplug, x0 space (paper)": (APG(w, eta=0.0, norm_threshold=r, momentum=beta), "context"),
        "APG diffplug, model-output space": (APG(w, eta=0.0, norm_threshold=r, momentum=beta, space="model_output"), None),
        "APG diffusers 0.42 (same settings)": (
            AdaptiveProjectedGuidance(guidance_scale=w - 1, adaptive_projected_guidance_momentum=beta,
                                      adaptive_projected_guidance_rescale=r, eta=0.0, use_original_formulation=True),
            None,
        ),
    }
    if compiled:
        guiders["APG diffplug, x0 space, compile=True"] = (
            APG(w, eta=0.0, norm_threshold=r, momentum=beta, compile=True), "context")
    return guiders


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


TIMESTEP = torch.tensor(500)


def step(guider, context, cond, uncond, i, n):
    guider.set_state(step=i, num_inference_steps=n, timestep=TIMESTEP)
    if context is not None:
        guider.set_context(context)
    batches = [BlockState(noise_pred=cond, prediction="pred_cond"), BlockState(noise_pred=uncond, prediction="pred_uncond")]
    for b, name in zip(batches, ("pred_cond", "pred_uncond")):
        setattr(b, guider._identifier_key, name)
    return guider(batches).pred


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", type=int, nargs="+", default=[2, 4, 64, 64])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds; the best round counts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="add a row for APG(compile=True) (torch.compile)")
    p.add_argument("--out", default=None, help="append a markdown table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    cond, uncond, sample = (torch.randn(args.shape, generator=g).to(dev) for _ in range(3))
    context = StepContext(sample, torch.tensor(0.6, device=dev), torch.tensor(0.8, device=dev), "epsilon")
    rows = []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    guiders = {name: (g, context if c == "context" else None) for name, (g, c) in make_guiders(7.5, 15.0, -0.5, args.compile).items()}
    per_round = max(1, args.iters // args.rounds)
    best = {name: float("inf") for name in guiders}
    count = 0
    for name, (guider, ctx) in guiders.items():  # warm-up (and the momentum buffer's first step)
        for i in range(20):
            step(guider, ctx, cond, uncond, i, 10**9)
    # interleave the guiders round by round and keep each one's best round: the machine is shared
    for _ in range(args.rounds):
        for name, (guider, ctx) in guiders.items():
            sync()
            t0 = time.perf_counter()
            for i in range(per_round):
                step(guider, ctx, cond, uncond, 20 + count + i, 10**9)
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / per_round * 1e3)
        count += per_round
    for name, (guider, ctx) in guiders.items():
        with OpCounter() as counter:
            step(guider, ctx, cond, uncond, 25, 10**9)
        rows.append((name, best[name], len(counter.ops)))
    header = (f"APG maths per step, shape {tuple(args.shape)}, device {args.device} "
              f"({platform.processor() or platform.machine()}, {args.threads} thread(s)), best of {args.rounds} interleaved "
              f"rounds of {per_round} steps, "
              f"torch {torch.__version__}")
    cfg_ms = rows[0][1]
    lines = [header, "", "| guider | ms / step | × CFG | ATen ops / step |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {ms:.3f} | {ms / cfg_ms:.1f} | {ops} |" for name, ms, ops in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
