"""FIND on the testbed against RL fine-tuning (SPO) and offline model tuning (DPO), on the same prompts and
reward, with the cost of each in wall-clock, CPU seconds and FLOPs (backward passes included).

    python benchmarks/find_bench.py --out /tmp/find_bench --results benchmarks/find_results.md

Every method runs through the command a user runs (``diffplug finetune find`` / ``spo-pm`` then ``spo``
(``finetune_bench.train``) / ``dpo``) on the hard Fashion-MNIST classes, reward ``classifier_logprob``.

Three disjoint seed sets (the images' generators):

* training: each trainer's own per-sample noise, ``(seed * 1,000,003 + position) * 31 + salt`` (< 10^6 here);
* tuning: ``TUNE_SEED + i`` -- the sampler setting (CFG, eta of the DDIM sampler) is *selected* on these:
  FIND is trained at each ``--select_grid`` setting (``--select_rollouts`` rollouts per prompt) and the
  setting of the largest paired gain over the base on ``--tune_images`` tuning images per prompt wins;
* evaluation: ``EVAL_SEED + i`` -- every reported gain (final models and training curves).

Image i of a prompt uses the same generator for the base model, the FIND policy (eps of
``z = mu + sigma * eps``, then the sampler's noise) and the tuned models: gains are paired
(``diffplug.evals.stats.gain``), beside them the independent judge (``testbed.load_judge``, never a training
reward) and the sharpness of the images (``evals.image_stats.sharpness``). SPO and DPO train at the
selected CFG (SPO's rollouts stay DDIM eta 1, which its transition density needs); all models are
evaluated with the selected sampler.

Cost (``PassCounter``): each training command runs with every outermost ``nn.Module`` call counted by
class (UNet, VAE decoder/encoder, text encoder, preference model, classifier, value network, policy):
samples through the forward, samples through a backward (a gradient reached the call's output). The
first call of each class and input shape is re-run once under ``torch.utils.flop_counter.FlopCounterMode``
(forward; and, where that call needed gradients, forward + ``autograd.grad`` to what the call trains or
needs, so the backward is *measured*, not taken as 2x), giving FLOPs per sample; totals = samples x
FLOPs per sample. FlopCounterMode counts matmuls, convolutions and attention, not element-wise ops.
The re-runs' own time is subtracted from the wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from diffplug.evals.stats import gain, mean_se

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # finetune_bench (SPO's commands), run from anywhere

TUNE_SEED = 2_000_000  # sampler settings are chosen on images TUNE_SEED + i
EVAL_SEED = 3_000_000  # every reported gain uses images EVAL_SEED + i


# -- cost: network passes by kind and FLOPs per pass -----------------------------------------------------


def _tensors(obj):
    """The tensors of a (nested) call argument or output, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "to_tuple"):  # diffusers' BaseOutput
        return _tensors(obj.to_tuple())
    return []


def _batch(args, kwargs) -> int:
    """Samples in a call: the first tensor argument's leading size (else the first list's length)."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.ndim > 0:
            return int(a.shape[0])
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)) and a:
            return len(a)
    return 1


class PassCounter:
    """Counts the outermost ``nn.Module`` calls made while active (a context manager), by class:
    ``calls``, forward ``samples``, ``backward_samples`` (samples whose output received a gradient), and
    the FLOPs of each, from FLOPs per sample measured once per (class, per-sample input shape) with
    ``FlopCounterMode`` on the live module (see the module docstring). ``overhead_wall`` / ``overhead_cpu``:
    seconds spent measuring, to subtract from timings."""

    def __init__(self):
        self.calls = defaultdict(int)
        self.samples = defaultdict(int)
        self.backward_samples = defaultdict(int)
        self.flops_fwd = defaultdict(float)  # by kind: total forward FLOPs
        self.flops_bwd = defaultdict(float)
        self.per_sample = {}  # (kind, shapes) -> forward FLOPs per sample
        self.per_sample_bwd = {}  # (kind, shapes) -> backward FLOPs per sample
        self.overhead_wall = self.overhead_cpu = 0.0
        self._local = threading.local()
        self._handles = []

    # the hooks
    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def _pre(self, module, args):
        if not getattr(self._local, "measuring", False):
            self._local.depth = self._depth() + 1

    def _post(self, module, args, kwargs, output):
        if getattr(self._local, "measuring", False):
            return
        self._local.depth = self._depth() - 1
        if self._depth() > 0:  # inside another counted call: part of that one's cost
            return
        kind = type(module).__name__
        n = _batch(args, kwargs)
        key = (kind, tuple(tuple(t.shape[1:]) for t in _tensors((args, kwargs))))
        grads = [t for t in _tensors(output) if t.requires_grad]
        if key not in self.per_sample or (grads and key not in self.per_sample_bwd):
            self._measure(module, args, kwargs, key, n, backward=bool(grads))
        self.calls[kind] += 1
        self.samples[kind] += n
        self.flops_fwd[kind] += n * self.per_sample[key]
        if grads:
            def on_grad(g, kind=kind, n=n, key=key):
                self.backward_samples[kind] += n
                self.flops_bwd[kind] += n * self.per_sample_bwd[key]

            grads[0].register_hook(on_grad)

    def _measure(self, module, args, kwargs, key, n, backward: bool) -> None:
        """FLOPs per sample of this call (forward; and backward when it needs gradients), measured by
        re-running it; the RNG and the module's buffers (e.g. BatchNorm statistics) are left as they were."""
        from torch.utils.flop_counter import FlopCounterMode

        wall, cpu = time.perf_counter(), time.process_time()
        self._local.measuring = True
        # the re-run updates copies of the buffers (e.g. BatchNorm statistics): the originals, which the real
        # call's autograd graph may hold, are never written
        swapped = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
        for m, name, b in swapped:
            m._buffers[name] = b.clone()
        try:
            with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as fc:
                with torch.set_grad_enabled(backward):
                    out = module(*args, **kwargs)
                    fwd = fc.get_total_flops()
                    if backward:
                        outs = [t for t in _tensors(out) if t.requires_grad]
                        wrt = [p for p in module.parameters() if p.requires_grad]
                        wrt += [t for t in _tensors((args, kwargs)) if t.requires_grad]
                        torch.autograd.grad(outs, wrt, [torch.ones_like(t) for t in outs], allow_unused=True)
                total = fc.get_total_flops()
        finally:
            for m, name, b in swapped:
                m._buffers[name] = b
            self._local.measuring = False
            self.overhead_wall += time.perf_counter() - wall
            self.overhead_cpu += time.process_time() - cpu
        self.per_sample[key] = fwd / n
        if backward:
            self.per_sample_bwd[key] = (total - fwd) / n

    def __enter__(self):
        from torch.nn.modules import module as M

        self._handles = [M.register_module_forward_pre_hook(self._pre),
                         M.register_module_forward_hook(self._post, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def summary(self) -> dict:
        """-> ``{kind: {calls, samples, backward_samples, gflops_fwd, gflops_bwd}}`` and ``total_gflops``."""
        kinds = {k: {"calls": self.calls[k], "samples": self.samples[k], "backward_samples": self.backward_samples[k],
                     "gflops_fwd": self.flops_fwd[k] / 1e9, "gflops_bwd": self.flops_bwd[k] / 1e9} for k in self.calls}
        return {"kinds": kinds, "total_gflops": sum(v["gflops_fwd"] + v["gflops_bwd"] for v in kinds.values())}


class Cost:
    """Wall and CPU seconds (this process, ``resource.getrusage`` user + sys) and the passes of the
    commands run inside it (a context manager; ``record()`` -> dict)."""

    def __enter__(self):
        self.counter = PassCounter().__enter__()
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu
        self.counter.__exit__(*exc)
        return False

    def record(self) -> dict:
        c = self.counter
        return {"wall_seconds": self.wall - c.overhead_wall, "cpu_seconds": self.cpu - c.overhead_cpu,
                "measure_seconds": c.overhead_wall, **c.summary()}


# -- sampling and evaluation ------------------------------------------------------------------------------


def sampler():
    """The testbed pipeline with DDIM (the scheduler of every rollout and evaluation here)."""
    from diffusers import DDIMScheduler

    import diffplug

    pipe = diffplug.testbed.load("sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tuned_sampler(run_dir: Path, checkpoint: Path | None = None):
    """``sampler()`` with a tuned run's adapter: its ``final/`` (``adapters.load``), or the LoRA tensors of
    one of its checkpoints (the run's ``final/adapter.json`` says the LoRA's settings)."""
    from diffplug.finetune import adapters
    from diffplug.finetune.state import MODEL_FILE, load_module

    pipe = sampler()
    if checkpoint is None:
        return adapters.load(pipe, run_dir / "final")
    record = json.loads((run_dir / "final" / adapters.META).read_text())
    pipe.unet.requires_grad_(False)  # as the trainer: only the adapter's tensors are "trainable"
    adapters.add_lora(pipe.unet, record["lora"])
    load_module(pipe.unet, checkpoint / MODEL_FILE, trainable_only=True)
    pipe.unet.requires_grad_(False)
    return pipe


@torch.no_grad()
def evaluate(pipe, prompts, n, seed0, setting, steps, policy=None, chunk=50) -> dict:
    """Images ``seed0 + i`` (i < n) of every prompt, prompt-major -> per image ``reward`` (the run's reward),
    ``align`` (classifier top-1 on the prompted class), ``judge`` / ``judge_align`` (the independent judge's
    log p / top-1) and ``sharpness``."""
    from diffplug.evals.compare import judge_metric
    from diffplug.evals.image_stats import sharpness
    from diffplug.evals.rewards import prompt_class
    from diffplug.finetune.find import NoisePolicy
    from diffplug.finetune.pairs import resolve_reward
    from diffplug.guidance import CFG
    from diffplug.pipelines import from_pipe
    from diffplug.testbed import load_classifier

    cfg, eta, reward_name = setting["cfg"], setting["eta"], setting["reward"]
    reward, clf, judge = resolve_reward(reward_name), load_classifier().eval(), judge_metric()
    run = from_pipe(pipe, guidance=CFG(cfg))
    if policy is None:  # the prior N(0, I): the eps the policy would use, so images pair up
        c = pipe.unet.config
        shape = (c.in_channels, c.sample_size, c.sample_size)
        policy = NoisePolicy(torch.zeros(len(prompts), *shape), torch.ones(len(prompts), *shape), prompts, {})
    out = defaultdict(list)
    for prompt in prompts:
        for start in range(0, n, chunk):
            gens = [torch.Generator().manual_seed(seed0 + i) for i in range(start, min(n, start + chunk))]
            z = policy.sample_initial_noise([prompt], len(gens), generator=gens)
            images = run([prompt], num_images_per_prompt=len(gens), latents=z, num_inference_steps=steps,
                         eta=eta, generator=gens, output_type="pt").images.float().clamp(0, 1)
            names = [prompt] * len(gens)
            j = judge(images, names)
            out["reward"].append(torch.as_tensor(reward(images, names)).float().reshape(-1))
            out["align"].append((clf(images).argmax(-1) == prompt_class(prompt)).float())
            out["judge"].append(j["judge_logprob"])
            out["judge_align"].append(j["judge_accuracy"])
            out["sharpness"].append(sharpness(images).float())
    return {k: torch.cat(v) for k, v in out.items()}


def cached(path: Path, fn) -> dict:
    """``fn()`` (a dict of tensors) kept in ``path`` (safetensors)."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(str(path))
    ev = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ev.items()}, str(path))
    return ev


def policy_at(folder: Path, prompts):
    """The FIND policy of a checkpoint (its trained tensors) or of final/."""
    from safetensors.torch import load_file

    from diffplug.finetune.find import NoisePolicy, load_noise_policy

    if (folder / "noise_policy.safetensors").is_file():
        return load_noise_policy(folder / "noise_policy.safetensors")
    t = load_file(str(folder / "trainable.safetensors"))
    return NoisePolicy(t["mean"], t["log_std"].exp(), prompts, {})


def checkpoints(run: Path) -> list[Path]:
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


# -- the training commands, each measured ---------------------------------------------------------------


def measured(run: Path, fn) -> dict:
    """Run ``fn()`` (a training command) under ``Cost`` once; its record is kept in ``run/cost.json``."""
    path = run / "cost.json"
    if path.is_file():
        return json.loads(path.read_text())
    with Cost() as c:
        fn()
    rec = {**c.record(), "start": time.time() - c.wall}
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    return rec


def train_find(args, out: Path, setting: dict, rollouts_per_prompt: int, curve_points: int) -> dict:
    from diffplug.finetune.cli import main

    steps = rollouts_per_prompt * len(args.prompts) * args.policy_steps
    argv = ["find", "--output_dir", str(out), "--seed", str(args.seed), "--reward", args.reward,
            "--prompts", ",".join(args.prompts), "--num_steps", str(args.steps), "--guidance_scale", str(setting["cfg"]),
            "--eta", str(setting["eta"]), "--samples_per_prompt", str(args.samples_per_prompt),
            "--policy_steps", str(args.policy_steps), "--max_steps", str(steps),
            "--checkpoint_every", str(steps // curve_points if curve_points else 0), "--log_every", "5",
            "--tensorboard", "false", "--learning_rate", str(args.learning_rate)]

    def run():
        if main(argv):
            raise SystemExit("diffplug finetune find failed")

    return measured(out, run)


def train_spo(args, rdir: Path, cfg: float) -> tuple[dict, dict]:
    """``spo-pm`` then ``spo`` through ``finetune_bench.train`` (the commands and defaults of that benchmark),
    at the selected CFG; -> (the preference model's cost, the RL run's cost)."""
    from finetune_bench import train

    ns = argparse.Namespace(model="testbed", seed=args.seed)
    P = args.prompts
    pm = measured(rdir / "spo-pm", lambda: train("spo-pm", rdir / "spo-pm", ns, dict(
        reward=args.reward, prompts=P, max_steps=args.pm_steps, generate_repeats=args.pm_repeats * 10 // len(P),
        eval_repeats=1, guidance_scale=cfg, spm_guidance_scale=cfg)))
    spo = measured(rdir / "spo", lambda: train("spo", rdir / "spo", ns, dict(
        reward=args.reward, preference_model=str(rdir / "spo-pm" / "final"), max_steps=args.spo_steps,
        learning_rate=args.spo_lr, threshold=args.spo_threshold, train_batch_size=2, prompts=P, guidance_scale=cfg,
        checkpoint_every=max(1, args.spo_steps // args.curve_points_spo))))
    return pm, spo


def train_dpo(args, out: Path, cfg: float) -> dict:
    from diffplug.finetune.cli import main

    argv = ["dpo", "--output_dir", str(out), "--seed", str(args.seed), "--reward", args.reward, "--prompts",
            ",".join(args.prompts), "--generate_steps", str(args.steps), "--guidance_scale", str(cfg),
            "--num_per_prompt", str(args.dpo_per_prompt), "--generate_repeats", str(args.dpo_repeats),
            "--max_steps", str(args.dpo_steps), "--train_batch_size", "4", "--learning_rate", str(args.dpo_lr),
            "--beta", str(args.dpo_beta), "--checkpoint_every", "0", "--log_every", "5", "--tensorboard", "false"]

    def run():
        if main(argv):
            raise SystemExit("diffplug finetune dpo failed")

    return measured(out, run)


# -- the benchmark ---------------------------------------------------------------------------------------


def parse_grid(text: str) -> list[dict]:
    """``"1:0,2:0"`` -> [{"cfg": 1.0, "eta": 0.0}, {"cfg": 2.0, "eta": 0.0}] (CFG:eta)."""
    out = []
    for cell in text.split(","):
        try:
            cfg, eta = (float(v) for v in cell.split(":"))
        except ValueError:
            raise ValueError(f"--select_grid: {cell!r} is not CFG:eta (e.g. 1:0,2:0,1:1,2:1)") from None
        out.append({"cfg": cfg, "eta": eta})
    return out


def tag(s: dict) -> str:
    return f"cfg{s['cfg']:g}_eta{s['eta']:g}"


def select(args, P) -> dict:
    """FIND at each grid setting, scored on the tuning seeds; -> {"chosen": setting, "rows": [...]}. Each
    setting's row is kept in its run folder (``row.json``), so settings may run in separate calls."""
    rows = []
    for s in parse_grid(args.select_grid):
        setting = {**s, "reward": args.reward}
        run = args.out / "select" / tag(s)
        if (run / "row.json").is_file():
            rows.append(json.loads((run / "row.json").read_text()))
            continue
        cost = train_find(args, run, setting, args.select_rollouts, 0)
        pipe = sampler()
        ev = args.out / "evals"
        base = cached(ev / f"base_{tag(s)}_tune{args.tune_images}.safetensors",
                      lambda: evaluate(pipe, P, args.tune_images, TUNE_SEED, setting, args.steps))
        find = cached(ev / f"select_{tag(s)}_tune{args.tune_images}.safetensors",
                      lambda: evaluate(pipe, P, args.tune_images, TUNE_SEED, setting, args.steps, policy_at(run / "final", P)))
        g = gain(base["reward"], find["reward"], "tune")
        rows.append({**s, "gain": g.gain, "paired_se": g.paired_se, "base": g.base.mean, "base_align": float(base["align"].mean()),
                     "find_align": float(find["align"].mean()), "cpu_seconds": cost["cpu_seconds"]})
        (run / "row.json").write_text(json.dumps(rows[-1], indent=1))
        print("select", rows[-1], flush=True)
    best = max(rows, key=lambda r: r["gain"])
    return {"chosen": {"cfg": best["cfg"], "eta": best["eta"]}, "rows": rows}


def curve_rows(cost: dict, run: Path, max_steps: int, gains: list, offset: dict | None = None) -> list[dict]:
    """Per checkpoint: the run's cost prorated by steps (+ ``offset``, e.g. the preference model) and its gain."""
    offset = offset or {"total_gflops": 0.0, "wall_seconds": 0.0, "cpu_seconds": 0.0}
    out = []
    for ck, g in zip(checkpoints(run), gains):
        f = int(ck.name.split("-")[1]) / max_steps
        out.append({"step": int(ck.name.split("-")[1]), "gain": g.gain, "se": g.paired_se,
                    **{k: offset[k] + f * cost[k] for k in ("total_gflops", "wall_seconds", "cpu_seconds")}})
    return out


def fmt_gain(g) -> str:
    return f"{g.gain:+.3f} ± {g.paired_se:.3f} ({g.z_paired:+.1f} s.e.; two-sample ± {g.two_sample_se:.3f})"


def main():
    from diffplug.finetune.pairs import HARD_FASHION_PROMPTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--stages", default="select,find,spo,dpo,report",
                    help="what this call does (each stage reuses what an earlier call of the same --out finished)")
    ap.add_argument("--prompts", nargs="+", default=list(HARD_FASHION_PROMPTS))
    ap.add_argument("--reward", default="classifier_logprob")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps of FIND's rollouts and of every evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--select_grid", default="1:0,2:0,1:1,2:1", help="CFG:eta settings FIND is selected over (tuning seeds)")
    ap.add_argument("--select_rollouts", type=int, default=20, help="FIND rollouts per prompt of each selection run")
    ap.add_argument("--tune_images", type=int, default=32, help="tuning images per prompt of the selection")
    ap.add_argument("--rollouts_per_prompt", type=int, default=150, help="FIND rollouts per prompt (paper: 150 iterations)")
    ap.add_argument("--samples_per_prompt", type=int, default=8)
    ap.add_argument("--policy_steps", type=int, default=1, help="FIND optimiser steps per rollout (official 1)")
    ap.add_argument("--learning_rate", type=float, default=1e-3, help="FIND's policy learning rate (paper: 1e-3)")
    ap.add_argument("--extension_policy_steps", type=int, default=0,
                    help="also FIND with this many policy steps per rollout (our extension), the same rollouts; 0 = off")
    ap.add_argument("--pm_steps", type=int, default=150, help="spo-pm steps (finetune_bench: 300)")
    ap.add_argument("--pm_repeats", type=int, default=5, help="spo-pm pair rounds x 10 / prompts (finetune_bench: 10)")
    ap.add_argument("--spo_steps", type=int, default=60, help="SPO optimiser steps (finetune_bench: 60)")
    ap.add_argument("--spo_lr", type=float, default=6e-4, help="finetune_bench's SPO LR")
    ap.add_argument("--spo_threshold", type=float, default=0.3)
    ap.add_argument("--dpo_steps", type=int, default=100)
    ap.add_argument("--dpo_per_prompt", type=int, default=4)
    ap.add_argument("--dpo_repeats", type=int, default=8)
    ap.add_argument("--dpo_lr", type=float, default=3e-4)
    ap.add_argument("--dpo_beta", type=float, default=5000.0)
    ap.add_argument("--eval_images", type=int, default=200, help="evaluation images per prompt of the final models")
    ap.add_argument("--curve_points", type=int, default=6, help="FIND checkpoints evaluated")
    ap.add_argument("--curve_points_spo", type=int, default=4, help="SPO checkpoints evaluated")
    ap.add_argument("--curve_images", type=int, default=32, help="evaluation images per prompt of each checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    P, stages = args.prompts, set(args.stages.split(","))

    sel = select(args, P)  # every stage needs the chosen setting
    if stages == {"select"}:
        return
    setting = {**sel["chosen"], "reward": args.reward}
    cfg, eta = setting["cfg"], setting["eta"]
    find_dir, spo_root, dpo_dir = args.out / "find", args.out / "spo", args.out / "dpo"
    find_steps = args.rollouts_per_prompt * len(P) * args.policy_steps
    if "find" in stages:
        train_find(args, find_dir, setting, args.rollouts_per_prompt, args.curve_points)
    if "find_ext" in stages and args.extension_policy_steps:
        ext = argparse.Namespace(**{**vars(args), "policy_steps": args.extension_policy_steps})
        train_find(ext, args.out / f"find_ps{ext.policy_steps}", setting, args.rollouts_per_prompt, args.curve_points)
    if "spo" in stages:
        train_spo(args, spo_root, cfg)
    if "dpo" in stages:
        train_dpo(args, dpo_dir, cfg)
    if "report" in stages:
        report(args, P, sel, setting, find_dir, spo_root, dpo_dir, find_steps)


def report(args, P, sel, setting, find_dir, spo_root, dpo_dir, find_steps):
    began = time.time()
    ev = args.out / "evals"
    t = tag(setting)
    n = args.eval_images
    pipe = sampler()
    E = lambda name, fn, k=n: cached(ev / f"{name}_{t}_eval{k}.safetensors", fn)  # noqa: E731
    base = E("base", lambda: evaluate(pipe, P, n, EVAL_SEED, setting, args.steps))
    models = {"FIND": E("find", lambda: evaluate(pipe, P, n, EVAL_SEED, setting, args.steps, policy_at(find_dir / "final", P)))}
    costs = {"FIND": json.loads((find_dir / "cost.json").read_text())}
    has_spo, has_dpo = (spo_root / "spo" / "cost.json").is_file(), (dpo_dir / "cost.json").is_file()
    if has_spo:
        models["SPO"] = E("spo", lambda: evaluate(tuned_sampler(spo_root / "spo"), P, n, EVAL_SEED, setting, args.steps))
        costs["SPO preference model (spo-pm)"] = json.loads((spo_root / "spo-pm" / "cost.json").read_text())
        costs["SPO RL (spo)"] = json.loads((spo_root / "spo" / "cost.json").read_text())
    if has_dpo:
        models["DPO"] = E("dpo", lambda: evaluate(tuned_sampler(dpo_dir), P, n, EVAL_SEED, setting, args.steps))
        costs["DPO (pairs + training)"] = json.loads((dpo_dir / "cost.json").read_text())

    # curves on the first curve_images evaluation seeds
    k = args.curve_images
    base_c = E("base", lambda: evaluate(pipe, P, k, EVAL_SEED, setting, args.steps), k)
    curves = {}
    gains = [gain(base_c["reward"], E(f"find_{ck.name}", lambda ck=ck: evaluate(pipe, P, k, EVAL_SEED, setting, args.steps,
                                                                              policy_at(ck, P)), k)["reward"])
             for ck in checkpoints(find_dir)]
    curves["FIND"] = curve_rows(costs["FIND"], find_dir, find_steps, gains)
    ps = args.extension_policy_steps
    ext_dir = args.out / f"find_ps{ps}"
    if ps and (ext_dir / "cost.json").is_file():  # our extension: ps policy steps per rollout, the same rollouts
        name = f"FIND, {ps} policy steps per rollout (our extension)"
        models[name] = E(f"find_ps{ps}", lambda: evaluate(pipe, P, n, EVAL_SEED, setting, args.steps, policy_at(ext_dir / "final", P)))
        costs[name] = json.loads((ext_dir / "cost.json").read_text())
        gains = [gain(base_c["reward"], E(f"find_ps{ps}_{ck.name}", lambda ck=ck: evaluate(
            pipe, P, k, EVAL_SEED, setting, args.steps, policy_at(ck, P)), k)["reward"]) for ck in checkpoints(ext_dir)]
        curves[name] = curve_rows(costs[name], ext_dir, find_steps * ps, gains)
    if has_spo:
        run = spo_root / "spo"
        gains = [gain(base_c["reward"], E(f"spo_{ck.name}", lambda ck=ck: evaluate(tuned_sampler(run, ck), P, k, EVAL_SEED,
                                                                                 setting, args.steps), k)["reward"])
                 for ck in checkpoints(run)]
        curves["SPO"] = curve_rows(costs["SPO RL (spo)"], run, args.spo_steps, gains, costs["SPO preference model (spo-pm)"])

    cmd = "python benchmarks/find_bench.py " + " ".join(sys.argv[1:])
    L = ["# FIND on the testbed: initial-noise policies vs RL fine-tuning (SPO) and DPO, cost in FLOPs", "",
         f"Device: CPU ({platform.machine()}, {torch.get_num_threads()} thread(s) per process, the 2 cores shared with other "
         f"jobs: wall seconds are inflated, CPU seconds and FLOPs are not). Date: {datetime.date.today()}. "
         f"Command (each call reuses the stages an earlier call of the same --out finished): `{cmd}`.", "",
         f"Prompts: {', '.join(P)}; reward `{args.reward}`; testbed UNet; DDIM. **Seeds**: training = each trainer's own "
         f"per-sample noise; tuning = images `{TUNE_SEED:,} + i` (i < {args.tune_images} per prompt), used only to select "
         f"the sampler setting; evaluation = images `{EVAL_SEED:,} + i` (i < {n} per prompt for the final models, the "
         f"first {k} for the curves), never used for a choice. Gains are paired (same seeds for every model; "
         "`diffplug.evals.stats.gain`: ± paired s.e., two-sample beside it).", "",
         f"## 1. Sampler setting, selected on the tuning seeds", "",
         f"FIND ({args.select_rollouts} rollouts x {args.samples_per_prompt} draws per prompt, {args.policy_steps} policy "
         f"step per rollout, lr {args.learning_rate:g}, DDIM {args.steps}) trained at each setting; paired gain over the base "
         f"on {args.tune_images} tuning images per prompt. The largest gain is chosen.", "",
         "| CFG | eta | base reward | FIND gain (paired, tuning seeds) | base -> FIND align | train CPU s | chosen |", "|---|---|---|---|---|---|---|"]
    for r in sel["rows"]:
        ch = "**yes**" if (r["cfg"], r["eta"]) == (setting["cfg"], setting["eta"]) else ""
        L.append(f"| {r['cfg']:g} | {r['eta']:g} | {r['base']:.3f} | {r['gain']:+.3f} ± {r['paired_se']:.3f} | "
                 f"{100 * r['base_align']:.1f} -> {100 * r['find_align']:.1f} % | {r['cpu_seconds']:.0f} | {ch} |")

    L += ["", f"## 2. Gains on the evaluation seeds (CFG {setting['cfg']:g}, eta {setting['eta']:g}, DDIM {args.steps}; "
          f"{n} images per prompt)", "",
          f"FIND: {args.rollouts_per_prompt} rollouts x {args.samples_per_prompt} draws per prompt, {args.policy_steps} policy "
          f"step per rollout (official), lr {args.learning_rate:g}. SPO: `spo-pm` ({args.pm_steps} steps, "
          f"`--generate_repeats {args.pm_repeats * 10 // len(P)} --eval_repeats 1`, CFG {setting['cfg']:g} for its pairs and one-step predictions) "
          f"then `spo` ({args.spo_steps} optimiser steps, lr {args.spo_lr:g}, threshold {args.spo_threshold}, 2 prompts per "
          f"rollout, LoRA r 4, DDIM 20 eta 1 rollouts at CFG {setting['cfg']:g}), via `finetune_bench.train`. DPO: LoRA r 8, "
          f"{args.dpo_steps} steps, lr {args.dpo_lr:g}, beta {args.dpo_beta:g}, pairs from {args.dpo_per_prompt} samples x "
          f"{args.dpo_repeats} rounds per prompt.", "",
          "| model | reward (± s.e.) | reward gain | align | judge log p gain | judge align | sharpness gain |",
          "|---|---|---|---|---|---|---|"]
    b = mean_se(base["reward"])
    L.append(f"| base | {b.mean:.3f} ± {b.se:.3f} | – | {100 * float(base['align'].mean()):.1f} % | – | "
             f"{100 * float(base['judge_align'].mean()):.1f} % | – |")
    finals = {}
    for name, m in models.items():
        g, gj, gs = gain(base["reward"], m["reward"]), gain(base["judge"], m["judge"]), gain(base["sharpness"], m["sharpness"])
        finals[name] = g
        L.append(f"| {name} | {g.tuned.mean:.3f} ± {g.tuned.se:.3f} | {fmt_gain(g)} | {100 * float(m['align'].mean()):.1f} % | "
                 f"{gj.gain:+.3f} ± {gj.paired_se:.3f} | {100 * float(m['judge_align'].mean()):.1f} % | "
                 f"{gs.gain:+.5f} ± {gs.paired_se:.5f} |")
    L += ["", "Per prompt (reward gain, paired):", "", "| prompt | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for i, p in enumerate(P):
        sl = slice(i * n, (i + 1) * n)
        L.append(f"| {p} | " + " | ".join(f"{gain(base['reward'][sl], m['reward'][sl]).gain:+.3f} ± "
                                        f"{gain(base['reward'][sl], m['reward'][sl]).paired_se:.3f}" for m in models.values()) + " |")

    L += ["", "## 3. Cost of training", "",
          "Measured around each command (`PassCounter`, `Cost`): samples through each network's forward and backward, "
          "FLOPs = samples x FLOPs per sample measured with `torch.utils.flop_counter.FlopCounterMode` on the first call "
          "of each network and input shape (the backward measured with the call's own trainable tensors, not assumed 2x; "
          "matmul / conv / attention FLOPs, element-wise ops not counted). Wall and CPU seconds include model loading, "
          "pair generation and the preference model's held-out evaluation; the FLOP measurements' own time is subtracted.", "",
          "| run | wall s | CPU s | forward GFLOP | backward GFLOP | total GFLOP | UNet samples fwd / bwd |", "|---|---|---|---|---|---|---|"]

    def row(name, c):
        f = sum(v["gflops_fwd"] for v in c["kinds"].values())
        bw = sum(v["gflops_bwd"] for v in c["kinds"].values())
        u = c["kinds"].get("UNet2DConditionModel", {"samples": 0, "backward_samples": 0})
        return f"| {name} | {c['wall_seconds']:.0f} | {c['cpu_seconds']:.0f} | {f:,.1f} | {bw:,.1f} | {f + bw:,.1f} | {u['samples']:,} / {u['backward_samples']:,} |"

    for name, c in costs.items():
        L.append(row(name, c))
    if has_spo:
        pm, rl = costs["SPO preference model (spo-pm)"], costs["SPO RL (spo)"]
        total = {"wall_seconds": pm["wall_seconds"] + rl["wall_seconds"], "cpu_seconds": pm["cpu_seconds"] + rl["cpu_seconds"],
                 "kinds": {f"{k} ({w})": v for w, c in (("pm", pm), ("rl", rl)) for k, v in c["kinds"].items()}}
        total["kinds"]["UNet2DConditionModel"] = {
            "samples": sum(c["kinds"].get("UNet2DConditionModel", {}).get("samples", 0) for c in (pm, rl)),
            "backward_samples": sum(c["kinds"].get("UNet2DConditionModel", {}).get("backward_samples", 0) for c in (pm, rl)),
            "gflops_fwd": 0.0, "gflops_bwd": 0.0}
        L.append(row("**SPO total (preference model + RL)**", total))
        costs["SPO total"] = {**total, "total_gflops": pm["total_gflops"] + rl["total_gflops"]}
    L += ["", "By network (calls; samples forward / backward; GFLOP forward / backward; measured MFLOP per sample, "
          "forward / backward):", "",
          "| run | network | calls | samples fwd / bwd | GFLOP fwd / bwd | MFLOP per sample fwd / bwd |", "|---|---|---|---|---|---|"]
    for name, c in costs.items():
        if name == "SPO total":
            continue
        for kind, v in sorted(c["kinds"].items(), key=lambda kv: -kv[1]["gflops_fwd"] - kv[1]["gflops_bwd"]):
            per = lambda g, s: f"{1e3 * g / s:,.2f}" if s else "–"  # noqa: E731
            L.append(f"| {name} | {kind} | {v['calls']:,} | {v['samples']:,} / {v['backward_samples']:,} | "
                     f"{v['gflops_fwd']:,.2f} / {v['gflops_bwd']:,.2f} | {per(v['gflops_fwd'], v['samples'])} / "
                     f"{per(v['gflops_bwd'], v['backward_samples'])} |")

    L += ["", f"## 4. Gain against cost (checkpoints; paired gain on the first {k} evaluation images per prompt)", "",
          "A checkpoint's cost is its run's prorated by optimiser steps (FIND: every step is one rollout of the same "
          "size; SPO: rollouts fall at uneven steps, so approximate), SPO's with its whole preference model added.", "",
          "| method | step | GFLOP | wall s | CPU s | gain (paired) |", "|---|---|---|---|---|---|"]
    for m, rows in curves.items():
        L += [f"| {m} | {r['step']} | {r['total_gflops']:,.1f} | {r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} | "
              f"{r['gain']:+.3f} ± {r['se']:.3f} |" for r in rows]
    for fname in [m for m in curves if m.startswith("FIND")] if curves.get("SPO") else []:
        target = min(curves[fname][-1]["gain"], curves["SPO"][-1]["gain"])
        hit = {m: next((r for r in curves[m] if r["gain"] >= target), None) for m in (fname, "SPO")}
        L += ["", f"{fname} and SPO: cost to the same gain (+{target:.3f}, the smaller final gain of the two curves; first "
              "checkpoint at or above it):", ""]
        for m, r in hit.items():
            L.append(f"* {m}: step {r['step']}, {r['total_gflops']:,.1f} GFLOP, {r['wall_seconds']:.0f} wall s, {r['cpu_seconds']:.0f} CPU s")
        f, s = hit[fname], hit["SPO"]
        L.append(f"* SPO / {fname}: **{s['total_gflops'] / f['total_gflops']:.2f}x** the FLOPs, "
                 f"{s['wall_seconds'] / f['wall_seconds']:.2f}x the wall seconds, {s['cpu_seconds'] / f['cpu_seconds']:.2f}x the "
                 f"CPU seconds (final models, whole runs: {costs['SPO total']['total_gflops'] / costs[fname]['total_gflops']:.2f}x "
                 f"the FLOPs, {costs['SPO total']['cpu_seconds'] / costs[fname]['cpu_seconds']:.2f}x the CPU seconds).")
    L += ["", f"Report (evaluations) wall time: {time.time() - began:.0f} s.", ""]
    text = "\n".join(L)
    print(text)
    (args.out / "find_results.md").write_text(text)
    if args.results:
        keep = ""  # hand-written sections after the marker are kept
        marker = "<!-- end of the generated part -->"
        if args.results.is_file() and marker in args.results.read_text():
            keep = args.results.read_text().split(marker, 1)[1]
        args.results.write_text(text + "\n" + marker + keep)


if __name__ == "__main__":
    main()
