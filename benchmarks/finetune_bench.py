"""Base vs Diffusion-DPO vs SPO (vs FIND) on the testbed, per reward: held-out reward vs training wall-clock.

    python benchmarks/finetune_bench.py --rewards_only --out runs/fb          # the rewards' headroom table
    python benchmarks/finetune_bench.py --out runs/fb --rewards jpeg_compressibility --spo_steps 60 --dpo_steps 200
    python benchmarks/finetune_bench.py --model testbed:flux --methods dpo,find --rewards classifier_logprob \
        --eval_every 0 --results benchmarks/finetune_flow_results.md      # the flow testbed (FluxPipeline)

For each reward, through the same commands a user runs:

* ``spo-pm --reward R``: the step-aware preference model on pairs of base samples labelled by R
  (its held-out step-wise accuracy vs R on the same one-step predictions is in the table);
* ``spo --reward R --preference_model <that>`` (official update schedule);
* ``dpo --preset lora --reward R`` (pairs generated from R; ``--dpo_preset paper`` for the paper's recipe);
* ``find --reward R`` (``--methods find``): FIND's initial-noise policy on the frozen model, its rollouts at
  the evaluation's steps and CFG with ``--find_eta`` (0: the deterministic sampler, so z_T decides the image;
  on flow models ``--scheduler auto`` = the model's own flow scheduler, and eta > 0 = the reverse SDE).

Flow models (``--model testbed:flux``): the evaluation samples with the pipeline's own FlowMatchEuler and
true CFG through diffplug's loop (the family passes ``max_sequence_length``); ``--spo_eta`` is SPO's noise
level a of the reverse SDE (Flow-GRPO: 0.7; left out, the trainer's default), ``--flow_beta`` DPO's weighting
of velocity errors (``finetune/dpo.py``; left out, the trainer's default ``epsilon``). When FIND is among the
methods, every model (base included) samples from the same eps through a noise policy (the prior N(0, I) for
all but FIND), so FIND's images pair with the base's seed by seed.

Each run evaluates the held-out reward every ``--eval_every`` steps on ``--eval_images`` images (the
trainer's fixed noise). Then base and tuned models sample the same *other* seeds and are scored:
reward mean ± s.e., gain ± paired s.e. (the headline; two-sample beside it; both from
``diffplug.evals.stats``) and, beside it, from the same images (``diffplug.evals.compare.tuned_vs_base``):
the independent judge's log-probability and accuracy on the prompted class (``testbed.load_judge()``,
never a training reward), Laplacian sharpness (both as paired gains), FID (testbed features) against
Fashion-MNIST test images, and the verdict of ``evals.compare.hacking_verdict`` ("reward hacking?":
a reward gain that costs the judge, sharpness or FID). Alignment (the testbed classifier's top-1,
the network behind ``classifier_logprob``) is kept for comparison with older tables. Train
seconds include setup, pair generation and, for SPO, the preference model's training; evaluations
are excluded; the CPU seconds (user + sys) of each training command are listed under its table, the
preference model's (``spo-pm``) separately. Results are appended to ``--results`` (``benchmarks/finetune_results.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from diffplug.evals.stats import gain, mean_se

HERE = Path(__file__).resolve().parent


def prompt_sets(n_emoji: int = 20) -> dict[str, list[str]]:
    from diffplug.finetune.pairs import FASHION_PROMPTS, HARD_FASHION_PROMPTS
    from diffplug.testbed import data as D

    emo = D.emoji("test")
    idx = list(range(0, len(emo), max(1, len(emo) // n_emoji)))[:n_emoji]
    return {"fashion": list(FASHION_PROMPTS), "hard": list(HARD_FASHION_PROMPTS), "emoji": [emo.captions[i][0] for i in idx]}


# the prompts each reward is trained and evaluated on (where it has headroom)
REWARD_PROMPTS = {"jpeg_compressibility": "fashion", "jpeg_incompressibility": "fashion", "classifier_logprob": "hard",
                  "colorfulness": "emoji", "testbed": "fashion"}


def train(method: str, out: Path, args, extra: dict) -> tuple[Path, float]:
    from diffplug.finetune.cli import main

    argv = [method, "--output_dir", str(out), "--model", args.model, "--seed", str(args.seed), "--log_every", "5",
            "--checkpoint_every", "0", "--tensorboard", "false"]
    for k, v in extra.items():
        argv += [f"--{k}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    if (out / "final").exists():
        print(f"{out} done already; reusing it")
        return out / "final", float(json.loads((out / "bench_time.json").read_text())["seconds"])
    t0, c0 = time.time(), cpu_seconds()
    if main(argv):
        raise SystemExit(f"diffplug finetune {method} failed")
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    evals = [r for r in logs if "eval_reward" in r]
    seconds = evals[-1]["train_seconds"] if evals else time.time() - t0  # evaluations excluded
    # CPU seconds of the whole command (periodic evaluations included: run with --eval_every 0 for the training alone)
    (out / "bench_time.json").write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds() - c0, "argv": argv}))
    return out / "final", seconds


def cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def train_cpu(run: Path) -> float | None:
    path = run / "bench_time.json"
    return json.loads(path.read_text()).get("cpu_seconds") if path.is_file() else None


POLICY_FILE = "noise_policy.safetensors"  # what `diffplug finetune find` writes into final/


@torch.no_grad()
def sample(model: str, weights: Path | None, prompts: list[str], per_prompt: int, seed: int, steps: int = 20,
           cfg: float = 5.0, prior_latents: bool = False) -> torch.Tensor:
    """``per_prompt`` images of each prompt (generator ``seed * 1000 + i`` for prompt i) from the base model
    with ``weights``: a fine-tuning result (``adapter.json``), a full UNet, a diffusers LoRA folder, or a FIND
    noise policy. With a policy (or ``prior_latents``: the untrained policy N(0, I)) z_T = mean + std * eps,
    eps drawn from that generator in the policy's latent layout, so every model sees the same eps."""
    from diffplug.finetune import adapters
    from diffplug.finetune.model import load_pipeline
    from diffplug.guidance.base import CFG
    from diffplug.pipelines import family_of, from_pipe
    from diffplug.samplers.noise_policy import NoisePolicy, load_noise_policy

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    policy = None
    if weights is not None and (weights / POLICY_FILE).is_file():
        policy = load_noise_policy(weights / POLICY_FILE)
    elif weights is not None and (weights / "unet").is_dir():
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(str(weights), subfolder="unet")
    elif weights is not None and (weights / adapters.META).is_file():
        adapters.load(pipe, weights)  # LoRA / SaRA / full, checked against this base model
    elif weights is not None:
        pipe.load_lora_weights(str(weights))
    if policy is None and prior_latents:
        family = family_of(pipe)
        shape = tuple(family.latent_shape(1, *family.default_size())[1:])
        policy = NoisePolicy(torch.zeros(len(prompts), *shape), torch.ones(len(prompts), *shape), prompts, {})
    run = from_pipe(pipe, guidance=CFG(cfg))
    out = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        z = None if policy is None else policy.sample_initial_noise([prompt], per_prompt, generator=g, pipe=pipe)
        out.append(run(prompt, num_images_per_prompt=per_prompt, num_inference_steps=steps, generator=g, latents=z,
                       output_type="pt").images.float())
    return torch.cat(out).clamp(0, 1)


def rewards_table(args) -> list[str]:
    """Each reward's mean, s.d. and s.e. on the base model's samples, per prompt set."""
    from diffplug.evals.rewards import get_reward

    sets = prompt_sets()
    names = ["jpeg_compressibility", "jpeg_incompressibility", "classifier_logprob", "colorfulness", "testbed"]
    lines = ["", f"## Reward headroom on the base model ({args.eval_images} images per prompt set, {args.steps} steps, CFG {args.cfg:g})", "",
             "| reward | direction, range | " + " | ".join(f"{k} ({len(v)} prompts)" for k, v in sets.items()) + " |",
             "|---|---|" + "---|" * len(sets)]
    images = {k: sample(args.model, None, v, max(1, args.eval_images // len(v)), args.seed + 777, args.steps, args.cfg)
              for k, v in sets.items()}
    for name in names:
        r = get_reward(name)
        cells = []
        for k, v in sets.items():
            per = max(1, args.eval_images // len(v))
            s = mean_se(torch.as_tensor(r(images[k], [p for p in v for _ in range(per)])), name)
            cells.append(f"{s.mean:.4g} (s.d. {s.se * s.n ** 0.5:.3g}, s.e. {s.se:.2g})")
        lo, hi = r.range
        lines.append(f"| `{name}` | {'higher' if r.higher_is_better else 'lower'} is better, [{lo:g}, {hi:g}] | " + " | ".join(cells) + " |")
    return lines


def evaluate(args, reward_name: str, prompts: list[str], runs: dict) -> dict:
    from diffplug import testbed
    from diffplug.evals.compare import block_cells, block_json, judge_metric, tuned_vs_base
    from diffplug.evals.rewards import get_reward, prompt_class
    from diffplug.testbed.data import fashion_mnist

    reward, classifier, judge = get_reward(reward_name), testbed.load_classifier(), judge_metric()
    per = max(1, args.eval_images // len(prompts))
    names = [p for p in prompts for _ in range(per)]
    labels = torch.tensor([prompt_class(p) for p in names])
    real = fashion_mnist("test").floats()[: args.fid_real]
    out, base = {}, None
    for name, weights in runs.items():
        images = sample(args.model, weights, prompts, per, args.seed + 12345, args.steps, args.cfg, prior_latents="find" in runs)
        base = images if base is None else base
        block = tuned_vs_base(base, images, names, {reward_name: reward}, real, judge=judge)
        with torch.no_grad():
            alignment = (classifier(images).argmax(-1) == labels).float().mean().item()
        g = block["gains"][f"reward_{reward_name}"]
        out[name] = {"reward": g.tuned.mean, "se": g.tuned.se, "n": g.tuned.n, "gain": g.gain, "paired_se": g.paired_se,
                     "two_sample_se": g.two_sample_se, "z_paired": g.z_paired, "z_two_sample": g.z_two_sample,
                     "alignment": alignment, "fid": block["fid"]["a"],
                     "judge_accuracy": block["gains"]["judge_accuracy"].tuned.mean,
                     "block": block_json(block), "cells": block_cells(block)}
        print(reward_name, name, json.dumps({k: v for k, v in out[name].items() if k != "block"}), flush=True)
    return out


def curve(out: Path) -> list[dict]:
    path = out / "logs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if "eval_reward" in line] if path.is_file() else []


def report(reward: str, prompts: str, res: dict, runs_dir: Path, seconds: dict, args) -> list[str]:
    from diffplug.evals.compare import BLOCK_HEADER

    lines = ["", f"### `{reward}` on the {prompts} prompts", "",
             "| model | held-out reward (± s.e.) | gain (± paired s.e.) | paired s.e. units (two-sample) | "
             + " | ".join(BLOCK_HEADER) + " | alignment (classifier) | train wall-clock |",
             "|---|---|---|---|" + "---|" * len(BLOCK_HEADER) + "---|---|"]
    for name, r in res.items():
        delta = "–" if name == "base" else f"{r['gain']:+.4g} ± {r['paired_se']:.2g}"
        ratio = "–" if name == "base" else f"{r['z_paired']:+.1f} ({r['z_two_sample']:+.1f})"
        block = (["–", f"{100 * r['judge_accuracy']:.1f} %", "–", f"{r['fid']:.2f}", "–"] if name == "base"
                 else r["cells"])
        lines.append(f"| {name} | {r['reward']:.4g} ± {r['se']:.2g} | {delta} | {ratio} | " + " | ".join(block)
                     + f" | {100 * r['alignment']:.1f} % | {seconds.get(name, 0):.0f} s |")
    cpu = {m: train_cpu(runs_dir / m) for m in ("spo-pm", "spo", "dpo", "find")}
    cpu = {m: c for m, c in cpu.items() if c is not None}
    if cpu:
        lines += ["", "Training CPU seconds (user + sys, this process; the preference model's own run apart): "
                  + ", ".join(f"{m} {c:.0f} s" for m, c in cpu.items()) + "."]
    acc_path = runs_dir / "spo-pm" / "final" / "stepwise_accuracy.json"
    if acc_path.is_file():
        acc = json.loads(acc_path.read_text())
        lines += ["", "SPM held-out step-wise accuracy (decided pairs), vs the labelling reward on the same one-step x0 predictions:", "",
                  "| t | " + " | ".join(acc) + " |", "|---|" + "---|" * len(acc),
                  "| SPM | " + " | ".join(f"{a['spm']:.3f} ± {a['spm_se']:.3f}" for a in acc.values()) + " |",
                  f"| `{reward}` on x0_hat | " + " | ".join(f"{a['reward']:.3f} ± {a['reward_se']:.3f}" for a in acc.values()) + " |",
                  "| pairs | " + " | ".join(str(a["pairs"]) for a in acc.values()) + " |"]
    curves = {m: curve(runs_dir / m) for m in ("dpo", "spo")}
    curves = {m: c for m, c in curves.items() if c}
    if curves:
        lines += ["", "Held-out reward vs training wall-clock (the trainer's fixed noise):", "",
                  "| method | step | train seconds | eval reward (± s.e.) |", "|---|---|---|---|"]
        for m, c in curves.items():
            offset = seconds.get("spo-pm", 0) if m == "spo" else 0
            lines += [f"| {m} | {r['step']} | {r['train_seconds'] + offset:.0f} | {r['eval_reward']:.4g} ± {r['eval_reward_se']:.2g} |" for r in c]
        gains = {m: max(r["eval_reward"] for r in c) - c[0]["eval_reward"] for m, c in curves.items()}
        target = min(gains.values())
        lines += ["", f"Time to the same gain (+{target:.4g}, the smaller best gain; SPO includes its preference model):", ""]
        for m, c in curves.items():
            offset = seconds.get("spo-pm", 0) if m == "spo" else 0
            hit = next((r for r in c if r["eval_reward"] - c[0]["eval_reward"] >= target - 1e-12), None)
            lines.append(f"* {m}: step {hit['step']}, {hit['train_seconds'] + offset:.0f} s" if hit else f"* {m}: not reached")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/finetune_bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="testbed", help="the base pipeline (tiny:sd for a dry run of this script)")
    parser.add_argument("--rewards", default="jpeg_compressibility,classifier_logprob")
    parser.add_argument("--methods", default="spo,dpo", help="any of spo (spo-pm, then spo), dpo, find")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the evaluation, DPO's pairs and the "
                        "SPO / FIND rollouts (the model's own scheduler; the trainers' default 20)")
    parser.add_argument("--cfg", type=float, default=5.0, help="CFG scale of the evaluation and of every trainer's sampling")
    parser.add_argument("--rewards_only", action="store_true", help="only the rewards' headroom table")
    parser.add_argument("--pm_steps", type=int, default=300)
    parser.add_argument("--pm_repeats", type=int, default=10, help="rounds over the prompts for the SPM's labelled pairs")
    parser.add_argument("--spo_steps", type=int, default=60, help="SPO optimiser steps (not rollouts)")
    parser.add_argument("--spo_lr", type=float, default=6e-4, help="paper 6e-5 x 10 (testbed / SD pre-training LR)")
    parser.add_argument("--spo_threshold", type=float, default=0.3)
    parser.add_argument("--spo_eta", type=float, default=None, help="spo --eta (flow models: the SDE's noise level a, "
                        "Flow-GRPO 0.7); left out, the trainer's default")
    parser.add_argument("--flow_beta", default=None, choices=("epsilon", "constant"),
                        help="dpo --flow_beta on flow models; left out, the trainer's default")
    parser.add_argument("--dpo_steps", type=int, default=200)
    parser.add_argument("--dpo_repeats", type=int, default=8, help="rounds over the prompts when generating DPO pairs")
    parser.add_argument("--dpo_preset", default="lora", choices=("lora", "paper"), help="dpo --preset")
    parser.add_argument("--dpo_extra", default="", help="extra dpo flags, e.g. '--learning_rate 3e-4'")
    parser.add_argument("--find_steps", type=int, default=400, help="FIND optimiser steps (policy_steps per rollout)")
    parser.add_argument("--find_samples", type=int, default=8, help="find --samples_per_prompt")
    parser.add_argument("--find_policy_steps", type=int, default=5, help="find --policy_steps (the README's run: 5)")
    parser.add_argument("--find_eta", type=float, default=0.0, help="find --eta (0: deterministic; flow: a > 0 = the SDE)")
    parser.add_argument("--find_lr", type=float, default=1e-3, help="find --learning_rate (paper 1e-3)")
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--eval_images", type=int, default=200)
    parser.add_argument("--fid_real", type=int, default=1000)
    parser.add_argument("--results", default=str(HERE / "finetune_results.md"))
    args = parser.parse_args()

    t_start = time.time()
    torch.set_num_threads(int(os.environ.get("DIFFPLUG_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/finetune_bench.py " + " ".join(sys.argv[1:])
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), shared)"
    lines = ["", f"## Run of {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC", "", f"Device: {device}. Command: `{cmd}`."]
    if args.rewards_only:
        lines += rewards_table(args)
    else:
        sets = prompt_sets()
        for reward in args.rewards.split(","):
            which = REWARD_PROMPTS.get(reward, "fashion")
            prompts, rdir = sets[which], out / reward
            per = max(1, args.eval_images // len(prompts))
            evals = dict(eval_every=args.eval_every, eval_prompts=prompts, eval_images_per_prompt=per, prompts=prompts)
            runs, seconds = {"base": None}, {}
            sampling = dict(guidance_scale=args.cfg)
            if "spo" in args.methods:
                pm, seconds["spo-pm"] = train("spo-pm", rdir / "spo-pm", args, dict(
                    reward=reward, prompts=prompts, max_steps=args.pm_steps, generate_repeats=args.pm_repeats * 10 // len(prompts),
                    eval_repeats=max(1, 50 // len(prompts)), generate_steps=args.steps, spm_guidance_scale=args.cfg, **sampling))
                runs["spo"], t = train("spo", rdir / "spo", args, dict(
                    reward=reward, preference_model=str(pm), max_steps=args.spo_steps, learning_rate=args.spo_lr,
                    threshold=args.spo_threshold, train_batch_size=2, num_steps=args.steps, **sampling, **evals,
                    **({} if args.spo_eta is None else {"eta": args.spo_eta})))
                seconds["spo"] = t + seconds["spo-pm"]
            if "dpo" in args.methods:
                extra = dict(zip(args.dpo_extra.split()[::2], args.dpo_extra.split()[1::2]))
                keys = dict(preset=args.dpo_preset, reward=reward, max_steps=args.dpo_steps,
                            generate_repeats=args.dpo_repeats * 10 // len(prompts), generate_steps=args.steps, **sampling,
                            **evals, **({} if args.flow_beta is None else {"flow_beta": args.flow_beta}))
                keys.update({k.lstrip("-"): v for k, v in extra.items()})  # explicit flags win
                runs["dpo"], seconds["dpo"] = train("dpo", rdir / "dpo", args, keys)
            if "find" in args.methods:  # the frozen model's z_T policy; rollouts at the evaluation's sampler
                runs["find"], seconds["find"] = train("find", rdir / "find", args, dict(
                    reward=reward, prompts=prompts, num_steps=args.steps, eta=args.find_eta,
                    samples_per_prompt=args.find_samples, policy_steps=args.find_policy_steps, max_steps=args.find_steps,
                    learning_rate=args.find_lr, **sampling))
            res = evaluate(args, reward, prompts, runs)
            (rdir / "results.json").write_text(json.dumps(res, indent=1))
            lines += report(reward, which, res, rdir, seconds, args)
    use = resource.getrusage(resource.RUSAGE_SELF)
    lines += ["", f"This process: {time.time() - t_start:.0f} s wall-clock, {use.ru_utime + use.ru_stime:.0f} s CPU "
              "(user + sys; runs reused from --out count only their evaluation)."]
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
