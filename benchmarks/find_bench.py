"""FIND on the testbed: per-prompt initial-noise policies vs tuning the model itself (DPO-style) on the
same prompts and reward.

    python benchmarks/find_bench.py --out /tmp/find_bench --results benchmarks/find_results.md

Both methods run through the commands a user runs (``diffplug finetune find`` / ``dpo``) on the hard
Fashion-MNIST classes, DDIM 10 steps, reward ``classifier_logprob``; by default at CFG 1 and eta 0 (the
setting with headroom where z_T decides the image; the paper's eta 1 and ``--guidance_scale 2`` are flags). Every evaluation draws its images from held-out seeds with common random numbers:
image i of a prompt uses the same generator for the base model, the FIND policy (eps of
``z = mu + sigma * eps``, then the sampler's noise) and the DPO-tuned model, so gains are also given
paired. Alignment = the testbed classifier's top-1 on the prompted class. Cost: wall seconds of each
command (model loading included, evaluations excluded) and network evaluations (UNet calls per sample).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from diffplug.evals.stats import mean_se

HERE = Path(__file__).resolve().parent


def sampler(model_dir=None):
    """The testbed pipeline with DDIM (and the DPO LoRA when ``model_dir`` is given)."""
    from diffusers import DDIMScheduler

    import diffplug

    pipe = diffplug.testbed.load("sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if model_dir is not None:
        pipe.load_lora_weights(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate(pipe, prompts, n, args, policy=None, chunk=50):
    """Per prompt: (log p(class), top-1 correct) of ``n`` images from held-out seeds ``10**6 + i``."""
    from diffplug.evals.rewards import prompt_class
    from diffplug.finetune.find import NoisePolicy
    from diffplug.guidance import CFG
    from diffplug.pipelines import from_pipe
    from diffplug.testbed import load_classifier

    clf = load_classifier().eval()
    run = from_pipe(pipe, guidance=CFG(args.guidance_scale))
    if policy is None:  # the prior N(0, I): the eps the policy would use, so images pair up
        shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        policy = NoisePolicy(torch.zeros(len(prompts), *shape), torch.ones(len(prompts), *shape), prompts, {})
    out = {}
    for prompt in prompts:
        logps, hits = [], []
        for start in range(0, n, chunk):
            gens = [torch.Generator().manual_seed(10**6 + i) for i in range(start, min(n, start + chunk))]
            z = policy.sample_initial_noise([prompt], len(gens), generator=gens)
            images = run([prompt], num_images_per_prompt=len(gens), latents=z, num_inference_steps=args.steps,
                         eta=args.eta, generator=gens, output_type="pt").images.float()
            logp = clf(images).float().log_softmax(-1)
            c = prompt_class(prompt)
            logps.append(logp[:, c])
            hits.append((logp.argmax(-1) == c).float())
        out[prompt] = (torch.cat(logps), torch.cat(hits))
    return out


def base_evaluate(pipe, prompts, n, args):
    """``evaluate`` of the base model, kept in ``--base_cache`` (safetensors) so runs of one setting share it."""
    from safetensors.torch import load_file, save_file

    if args.base_cache is None:
        return evaluate(pipe, prompts, n, args)
    key = f"base_{args.reward}_s{args.steps}_cfg{args.guidance_scale}_eta{args.eta}_n{n}.safetensors"
    path, names = args.base_cache / key, {f"{i}_{k}": (p, j) for i, p in enumerate(prompts) for j, k in enumerate(("logp", "hit"))}
    if path.is_file():
        t = load_file(str(path))
        if all(k in t for k in names) and json.loads(path.with_suffix(".json").read_text()) == prompts:
            return {p: (t[f"{i}_logp"], t[f"{i}_hit"]) for i, p in enumerate(prompts)}
    ev = evaluate(pipe, prompts, n, args)
    args.base_cache.mkdir(parents=True, exist_ok=True)
    save_file({k: ev[p][j].contiguous() for k, (p, j) in names.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(prompts))
    return ev


def mse(x):
    """(mean, s.e.) by the shared statistic (``diffplug.evals.stats``)."""
    m = mean_se(x)
    return m.mean, m.se


def train_find(args, out: Path) -> float:
    from diffplug.finetune.cli import main

    steps = args.rollouts_per_prompt * len(args.prompts) * args.policy_steps
    argv = ["find", "--output_dir", str(out), "--seed", str(args.seed), "--reward", args.reward,
            "--prompts", ",".join(args.prompts), "--num_steps", str(args.steps), "--guidance_scale", str(args.guidance_scale),
            "--eta", str(args.eta), "--samples_per_prompt", str(args.samples_per_prompt), "--policy_steps", str(args.policy_steps),
            "--max_steps", str(steps), "--checkpoint_every", str(steps // args.curve_points if args.curve_points else 0), "--log_every", "5",
            "--tensorboard", "false", "--learning_rate", str(args.learning_rate), "--ratio_reference", args.ratio_reference,
            "--clip_mode", args.clip_mode, "--advantage", args.advantage]
    start = time.time()
    assert main(argv) == 0
    (out / "bench_time.json").write_text(json.dumps({"start": start, "seconds": time.time() - start}))
    return start


def train_dpo(args, out: Path) -> None:
    from diffplug.finetune.cli import main

    argv = ["dpo", "--output_dir", str(out), "--seed", str(args.seed), "--reward", args.reward, "--prompts",
            ",".join(args.prompts), "--generate_steps", str(args.steps), "--guidance_scale", str(args.guidance_scale),
            "--num_per_prompt", str(args.dpo_per_prompt), "--generate_repeats", str(args.dpo_repeats),
            "--max_steps", str(args.dpo_steps), "--train_batch_size", "4", "--learning_rate", str(args.dpo_lr),
            "--beta", str(args.dpo_beta), "--checkpoint_every", "0", "--log_every", "5", "--tensorboard", "false",
            "--eval_every", str(max(1, args.dpo_steps // max(1, args.curve_points))), "--eval_reward", args.reward,
            "--eval_prompts", ",".join(args.prompts), "--eval_images_per_prompt", str(args.curve_images),
            "--sample_steps", str(args.steps)]
    start = time.time()
    assert main(argv) == 0
    (out / "bench_time.json").write_text(json.dumps({"start": start, "seconds": time.time() - start}))


def policy_at(folder: Path, prompts):
    """The FIND policy of a checkpoint (its trained tensors) or of final/."""
    from safetensors.torch import load_file

    from diffplug.finetune.find import NoisePolicy, load_noise_policy

    if (folder / "noise_policy.safetensors").is_file():
        return load_noise_policy(folder / "noise_policy.safetensors")
    t = load_file(str(folder / "trainable.safetensors"))
    return NoisePolicy(t["mean"], t["log_std"].exp(), prompts, {})


def grid(pipe, policy, prompts, args, path: Path, n=8):
    """Rows: per prompt, base then FIND, the same seeds."""
    from torchvision.utils import save_image

    from diffplug.finetune.find import NoisePolicy
    from diffplug.guidance import CFG
    from diffplug.pipelines import from_pipe

    run, rows = from_pipe(pipe, guidance=CFG(args.guidance_scale)), []
    prior = NoisePolicy(torch.zeros_like(policy.mean), torch.ones_like(policy.std), policy.prompts, {})
    for prompt in prompts:
        for pol in (prior, policy):
            gens = [torch.Generator().manual_seed(10**6 + i) for i in range(n)]
            z = pol.sample_initial_noise([prompt], n, generator=gens)
            rows.append(run([prompt], num_images_per_prompt=n, latents=z, num_inference_steps=args.steps, eta=args.eta,
                            generator=gens, output_type="pt").images.float())
    save_image(torch.cat(rows), str(path), nrow=n, padding=1)


def main():
    from diffplug.finetune.pairs import HARD_FASHION_PROMPTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--prompts", nargs="+", default=list(HARD_FASHION_PROMPTS))
    ap.add_argument("--reward", default="classifier_logprob")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance_scale", type=float, default=1.0)
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta of training and evaluation (paper: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rollouts_per_prompt", type=int, default=40)
    ap.add_argument("--samples_per_prompt", type=int, default=8)
    ap.add_argument("--policy_steps", type=int, default=1, help="optimiser steps per rollout (official 1; the results of 2026-11-28 used 5)")
    ap.add_argument("--dpo_steps", type=int, default=100)
    ap.add_argument("--dpo_per_prompt", type=int, default=4)
    ap.add_argument("--dpo_repeats", type=int, default=8)
    ap.add_argument("--dpo_lr", type=float, default=3e-4)
    ap.add_argument("--dpo_beta", type=float, default=5000.0)
    ap.add_argument("--eval_images", type=int, default=200)
    ap.add_argument("--curve_points", type=int, default=4, help="FIND checkpoints to evaluate (0: none)")
    ap.add_argument("--curve_images", type=int, default=32)
    ap.add_argument("--learning_rate", type=float, default=1e-3, help="FIND's policy learning rate (paper: 1e-3)")
    ap.add_argument("--ratio_reference", default="initial", help="FIND's pi_old: initial (official) or rollout (PPO)")
    ap.add_argument("--clip_mode", default="clamp", help="clamp (official) or ppo")
    ap.add_argument("--advantage", default="value", help="value (official R - V) or group ((R - mean) / std per prompt)")
    ap.add_argument("--dpo_from", type=Path, default=None, help="a finished DPO run of this benchmark to reuse (its out dir)")
    ap.add_argument("--base_cache", type=Path, default=None, help="folder keeping the base model's evaluations")
    ap.add_argument("--skip_dpo", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    P = args.prompts
    began = time.time()

    find_dir = args.out / "find"
    if not (find_dir / "final").exists():
        train_find(args, find_dir)
    ft = json.loads((find_dir / "bench_time.json").read_text())
    dpo_dir = (args.dpo_from or args.out) / "dpo"
    if not args.skip_dpo and not (dpo_dir / "final").exists():
        train_dpo(args, dpo_dir)

    pipe = sampler()
    final = policy_at(find_dir / "final", P)
    base_ev, find_ev = base_evaluate(pipe, P, args.eval_images, args), evaluate(pipe, P, args.eval_images, args, final)
    dpo_ev = None
    if not args.skip_dpo:
        dpo_ev = evaluate(sampler(dpo_dir / "final"), P, args.eval_images, args)
    grid(pipe, final, P, args, args.out / "find_grid.png")

    # FIND's curve: paired gain of each checkpoint on curve_images held-out seeds per prompt
    checkpoints = sorted(find_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    curve, base_c = [], base_evaluate(pipe, P, args.curve_images, args) if checkpoints else None
    for ck in checkpoints:
        stats = json.loads((ck / "find_rollout_rank0.json").read_text())["tree"]["stats"]
        t = json.loads((ck / "trainer_state.json").read_text())["time"] - ft["start"]
        ev = evaluate(pipe, P, args.curve_images, args, policy_at(ck, P))
        gain = torch.cat([ev[p][0] - base_c[p][0] for p in P])
        curve.append((int(ck.name.split("-")[1]), t, stats["nfe"], *mse(gain)))

    lines = ["# FIND on the testbed: initial-noise policies vs DPO-style model tuning", "",
             f"Device: CPU ({platform.machine()}, {torch.get_num_threads()} thread(s), other jobs sharing the 2 cores). "
             f"Date: {datetime.date.today()}. Command: `python benchmarks/find_bench.py --out {args.out} "
             f"--steps {args.steps} --guidance_scale {args.guidance_scale} --eta {args.eta} --reward {args.reward} "
             f"--rollouts_per_prompt {args.rollouts_per_prompt} --samples_per_prompt {args.samples_per_prompt} "
             f"--learning_rate {args.learning_rate} --ratio_reference {args.ratio_reference} --clip_mode {args.clip_mode} "
             f"--advantage {args.advantage} --dpo_steps {args.dpo_steps} --eval_images {args.eval_images} --curve_points {args.curve_points}"
             + (f" --dpo_from {args.dpo_from}" if args.dpo_from else "")
             + (f" --base_cache {args.base_cache}" if args.base_cache else "")
             + (" --skip_dpo" if args.skip_dpo else "")
             + (f" --results {args.results}`." if args.results else "`."), "",
             f"Setting: testbed UNet, DDIM {args.steps} steps, eta {args.eta}, CFG {args.guidance_scale}; reward "
             f"`{args.reward}` (log p of the prompted class, testbed classifier); alignment = its top-1 on the prompted "
             f"class. {args.eval_images} held-out images per prompt and model, the same seeds (common random numbers) "
             "for every model: gains are paired per image (± s.e. of the paired differences).", "",
             "| prompt | base reward | FIND reward | FIND gain (paired) | DPO reward | DPO gain (paired) | base align | FIND align | DPO align |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = P + ["all"]
    for p in rows:
        pick = (lambda ev: torch.cat([ev[q][0] for q in P])) if p == "all" else (lambda ev: ev[p][0])
        pick_h = (lambda ev: torch.cat([ev[q][1] for q in P])) if p == "all" else (lambda ev: ev[p][1])
        b, f = pick(base_ev), pick(find_ev)
        d = pick(dpo_ev) if dpo_ev else None
        fmt = lambda x: "%.3f ± %.3f" % mse(x)
        pct = lambda x: "%.1f %%" % (100 * float(x.mean()))
        lines.append(f"| {p} | {fmt(b)} | {fmt(f)} | {fmt(f - b)} | {fmt(d) if d is not None else '–'} | "
                     f"{fmt(d - b) if d is not None else '–'} | {pct(pick_h(base_ev))} | {pct(pick_h(find_ev))} | "
                     f"{pct(pick_h(dpo_ev)) if dpo_ev else '–'} |")

    lines += ["", "## Cost", "", "| method | wall seconds (command) | network evaluations for training | trained numbers |", "|---|---|---|---|"]
    n_lat = final.mean.numel()
    lines.append(f"| FIND | {ft['seconds']:.0f} | {int(final.meta['nfe']):,} ({int(final.meta['images'])} images) | {2 * n_lat:,} (mu, sigma) + value net |")
    if dpo_ev:
        dt = json.loads((dpo_dir / "bench_time.json").read_text())["seconds"]
        gen = len(P) * args.dpo_per_prompt * args.dpo_repeats * args.steps * (1 if args.guidance_scale == 1 else 2)  # CFG 1: one pass
        train_nfe = args.dpo_steps * 4 * 4  # batch 4 pairs x (policy, reference) x (winner, loser)
        lines.append(f"| DPO (LoRA r=8) | {dt:.0f} | {gen + train_nfe:,} ({gen:,} generating pairs + {train_nfe:,} training) | 82,432 (LoRA) |")

    lines += ["", "## FIND: gain against training cost", "",
              f"Checkpoints of the same run; paired gain over the base on {args.curve_images} held-out images per prompt.", "",
              "| step | train seconds | network evaluations | gain (paired) |", "|---|---|---|---|"]
    lines += [f"| {s} | {t:.0f} | {n:,} | {g:+.3f} ± {e:.3f} |" for s, t, n, g, e in curve]
    if dpo_ev:
        recs = [json.loads(l) for l in (dpo_dir / "logs.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "eval_reward" in r]
        lines += ["", f"DPO's held-out reward during training (trainer's fixed seeds, {args.curve_images} images per "
                  "prompt, eta 0; train seconds include generating the pairs):", "",
                  "| step | train seconds | eval reward |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['train_seconds']:.0f} | {r['eval_reward']:.3f} ± {r['eval_reward_se']:.3f} |" for r in recs]

    lines += ["", "## The learned distributions", "", "| prompt | rms mu | mean sigma | sigma min..max | cos(mu, mu of prompt 1) |",
              "|---|---|---|---|---|"]
    mu0 = final.mean[0].flatten()
    for i, p in enumerate(final.prompts):
        mu, sd = final.mean[i], final.std[i]
        cos = float(torch.nn.functional.cosine_similarity(mu.flatten(), mu0, dim=0))
        lines.append(f"| {p} | {float(mu.square().mean().sqrt()):.3f} | {float(sd.mean()):.3f} | "
                     f"{float(sd.min()):.3f}..{float(sd.max()):.3f} | {cos:.2f} |")
    lines += ["", "![base (odd rows) vs FIND (even rows), same seeds](find_grid.png)", "",
              f"Total benchmark wall time: {time.time() - began:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    (args.out / "find_results.md").write_text(text)
    if args.results:
        args.results.write_text(text)
        import shutil

        shutil.copy(args.out / "find_grid.png", args.results.parent / "find_grid.png")


if __name__ == "__main__":
    main()
