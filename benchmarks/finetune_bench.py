"""Base vs Diffusion-DPO vs SPO on the testbed: reward, prompt alignment, drift, cost.

    python benchmarks/finetune_bench.py --out runs/finetune_bench            # CPU-sized defaults
    python benchmarks/finetune_bench.py --out runs/fb --dpo_steps 400 --spo_steps 60 --eval_per_prompt 32

Runs, each through the same trainer and the same commands a user runs (``diffplug finetune ...``):

* ``dpo``: pairs generated on the testbed from the testbed image-text scorer (N samples per prompt,
  best vs worst), then Diffusion-DPO (LoRA);
* ``spo``: SPO (LoRA) with the step-aware preference model initialised from the same scorer
  (optionally trained first with ``diffplug finetune spo-pm``, ``--train_spm``).

Then every model samples the same held-out seeds for the ten Fashion-MNIST class prompts
(DDIM 20 steps, CFG 5) and is scored: mean reward (the testbed scorer, the optimised objective),
win-rate of the reward against the base model on the same seed, alignment (the testbed classifier's
top-1 accuracy on the prompted class) and the mean absolute pixel change from the base sample
(drift). Results go to ``benchmarks/finetune_results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def train(method: str, out: Path, args, extra: dict) -> tuple[Path, float]:
    from diffplug.finetune.cli import main

    argv = [method, "--output_dir", str(out), "--model", args.model, "--seed", str(args.seed), "--log_every", "5", "--checkpoint_every", "0"]
    for k, v in extra.items():
        argv += [f"--{k}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    t0 = time.time()
    if (out / "final").exists():
        print(f"{out} done already; reusing it")
        return out / "final", float(json.loads((out / "bench_time.json").read_text())["seconds"])
    code = main(argv)
    if code:
        raise SystemExit(f"diffplug finetune {method} failed ({code})")
    seconds = time.time() - t0
    (out / "bench_time.json").write_text(json.dumps({"seconds": seconds}))
    return out / "final", seconds


@torch.no_grad()
def sample(model: str, lora: Path | None, prompts: list[str], per_prompt: int, seed: int) -> torch.Tensor:
    from diffplug.finetune.model import load_pipeline
    from diffplug.guidance.base import CFG
    from diffplug.pipelines import from_pipe

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    run = from_pipe(pipe, guidance=CFG(5.0))
    images = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        images.append(run(prompt, num_images_per_prompt=per_prompt, num_inference_steps=20, generator=g, output_type="pt").images.float())
    return torch.cat(images)


def reward_curves(evals: dict[str, list[dict]], every: int, n_images: int) -> list[str]:
    """Held-out reward against training wall time (setup included, evaluations excluded), and the time
    each method takes to reach the same reward gain: the smaller of the two methods' best gains."""
    lines = ["", f"## Reward against training time (held-out reward every {every} steps, {n_images} images, fixed noise)", ""]
    gains = {k: max(r["eval_reward"] for r in v) - v[0]["eval_reward"] for k, v in evals.items() if v}
    if len(gains) < 2:
        return lines + ["(no evaluation records)"]
    target = min(gains.values())
    lines += ["| method | step | train seconds | eval reward (± s.e.) |", "|---|---|---|---|"]
    for name, recs in evals.items():
        lines += [f"| {name} | {r['step']} | {r['train_seconds']:.0f} | {r['eval_reward']:.4f} ± {r['eval_reward_se']:.4f} |" for r in recs]
    lines += ["", f"Same reward gain for both (+{target:.4f}, the smaller best gain): first evaluation reaching it:", ""]
    for name, recs in evals.items():
        hit = next((r for r in recs if r["eval_reward"] - recs[0]["eval_reward"] >= target - 1e-12), None)
        lines.append(f"* {name}: step {hit['step']}, {hit['train_seconds']:.0f} s of training" if hit else f"* {name}: not reached")
    return lines


def peak_memory(out: Path, args) -> list[str]:
    """Peak resident memory of a short DPO run (reusing the generated pairs), LoRA vs full fine-tuning,
    each in a fresh process (CPU: RSS stands in for the GPU's peak allocated memory)."""
    import subprocess

    lines = ["", f"## Peak memory, LoRA vs full fine-tuning (DPO, {args.memory_steps} steps, batch 4, fresh process each)", "",
             "| mode | peak RSS of the process (MiB) | trainable parameters | their fp32 gradients + AdamW moments (MiB) |",
             "|---|---|---|---|"]
    for mode, lora in (("LoRA r=8", "true"), ("full", "false")):
        run_dir = out / f"memory-{'lora' if lora == 'true' else 'full'}"
        code = (
            "import resource, sys, json; from diffplug.finetune.cli import main; "
            "rc = main(sys.argv[1:]); print(json.dumps({'rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
        )
        argv = ["dpo", "--output_dir", str(run_dir), "--model", args.model, "--data", str(out / "dpo" / "pairs"),
                "--max_steps", str(args.memory_steps), "--train_batch_size", "4", "--use_lora", lora,
                "--checkpoint_every", "0", "--tensorboard", "false", "--log_every", "1"]
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        if res.returncode:
            lines.append(f"| {mode} | failed: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode} | | |")
            continue
        rss = json.loads(res.stdout.strip().splitlines()[-1])["rss_mib"]
        trainable = next((line for line in res.stdout.splitlines() + res.stderr.splitlines() if "trainable parameters" in line), "")
        count = trainable.split(":")[-1].strip()
        states = int(count.replace(",", "")) * 12 / 2**20 if count.replace(",", "").isdigit() else float("nan")
        lines.append(f"| {mode} | {rss:.0f} | {count} | {states:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/finetune_bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="testbed", help="the base pipeline (tiny:sd for a dry run of this script)")
    parser.add_argument("--dpo_steps", type=int, default=60)
    parser.add_argument("--dpo_repeats", type=int, default=6, help="rounds over the 10 prompts when generating pairs")
    parser.add_argument("--spo_steps", type=int, default=10)
    parser.add_argument("--spo_threshold", type=float, default=0.3, help="SPO compare threshold (paper: 0.3 with PickScore's logit scale 100)")
    parser.add_argument("--spo_lr", type=float, default=6e-5)
    parser.add_argument("--dpo_lr", type=float, default=1e-4)
    parser.add_argument("--train_spm", type=int, default=0, help="spo-pm steps before SPO (0 = untrained SPM)")
    parser.add_argument("--eval_per_prompt", type=int, default=8)
    parser.add_argument("--fid_features", default="testbed", help="FID feature network (diffplug.evals): testbed | inception")
    parser.add_argument("--fid_real", type=int, default=1000, help="held-out Fashion-MNIST test images for the FID reference")
    parser.add_argument("--eval_every", type=int, default=0,
                        help="held-out reward every N training steps (trainer's eval_every): reward-vs-time curves")
    parser.add_argument("--memory_steps", type=int, default=0,
                        help="also train DPO this many steps with LoRA and full fine-tuning in subprocesses: peak RSS")
    parser.add_argument("--results", default=str(HERE / "finetune_results.md"))
    args = parser.parse_args()

    from diffplug import testbed
    from diffplug.finetune.pairs import FASHION_PROMPTS

    # One thread per process: on shared CPUs, oversubscribed OpenMP threads are 20x slower.
    torch.set_num_threads(int(os.environ.get("DIFFPLUG_THREADS", "1")))
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, cost = {"base": None}, {"base": (0.0, 0)}

    curves = dict(eval_every=args.eval_every, eval_prompts=list(FASHION_PROMPTS), eval_images_per_prompt=2) if args.eval_every else {}
    dpo = dict(max_steps=args.dpo_steps, train_batch_size=4, learning_rate=args.dpo_lr, beta=5000, reward="testbed",
               num_per_prompt=4, generate_repeats=args.dpo_repeats, generate_steps=20, lora_rank=8, lr_warmup_steps=0)
    runs["dpo"], t = train("dpo", out / "dpo", args, {**dpo, **curves})
    # samples: the generated images (N per prompt per round) + none online
    cost["dpo"] = (t, 4 * len(FASHION_PROMPTS) * args.dpo_repeats)

    pm = "testbed"
    if args.train_spm:
        spm = dict(max_steps=args.train_spm, train_batch_size=4, learning_rate=1e-4, data="generate", reward="backbone",
                   num_per_prompt=4, generate_repeats=args.dpo_repeats, generate_steps=20)
        pm_final, t_pm = train("spo-pm", out / "spo-pm", args, spm)
        pm = str(pm_final)
    spo = dict(max_steps=args.spo_steps, train_batch_size=2, preference_model=pm, num_steps=20, num_sample_each_step=4,
               divert_start_step=4, threshold=args.spo_threshold, learning_rate=args.spo_lr)
    runs["spo"], t = train("spo", out / "spo", args, {**spo, **curves})
    # samples: per prompt, k candidates at every step after the divert step
    cost["spo"] = (t, args.spo_steps * 2 * 4 * (20 - 4))

    scorer, classifier = testbed.load_scorer(), testbed.load_classifier()
    from diffplug.evals import FID
    from diffplug.testbed.data import fashion_mnist

    fid = FID(features=args.fid_features, reset_real_features=False)
    real = fashion_mnist("test").floats()[: args.fid_real]
    for chunk in real.split(250):
        fid.update(chunk, real=True)
    prompts = list(FASHION_PROMPTS)
    labels = torch.arange(len(prompts)).repeat_interleave(args.eval_per_prompt)
    results, base_images, base_reward = {}, None, None
    for name, lora in runs.items():
        t0 = time.time()
        images = sample(args.model, lora, prompts, args.eval_per_prompt, args.seed + 12345)
        with torch.no_grad():
            reward = scorer(images, [p for p in prompts for _ in range(args.eval_per_prompt)]).float()
            accuracy = (classifier(images).argmax(-1) == labels).float().mean().item()
        fid.reset()
        fid.update(images, real=False)
        fid_value = float(fid.compute())
        if base_images is None:
            base_images, base_reward = images, reward
        results[name] = {
            "reward": reward.mean().item(),
            "reward_sem": (reward.std() / len(reward) ** 0.5).item(),
            "win_rate_vs_base": (reward > base_reward).float().mean().item() if name != "base" else float("nan"),
            "alignment": accuracy,
            "drift": (images - base_images).abs().mean().item(),
            "fid": fid_value,
            "train_seconds": cost[name][0],
            "train_samples": cost[name][1],
            "eval_seconds": time.time() - t0,
        }
        print(name, json.dumps(results[name]))
    (out / "results.json").write_text(json.dumps(results, indent=2))

    cmd = "python benchmarks/finetune_bench.py " + " ".join(sys.argv[1:])
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        "# Fine-tuning: base vs Diffusion-DPO vs SPO on the testbed",
        "",
        f"Device: {device}. Date: {datetime.date.today()}. Command: `{cmd}`.",
        "",
        f"Held-out evaluation: the 10 Fashion-MNIST class prompts x {args.eval_per_prompt} seeds, DDIM 20 steps, CFG 5, "
        "the same seeds for every model. Reward = the testbed image-text scorer (cosine; the objective both methods optimise); "
        "win-rate = share of seeds whose reward beats the base model's sample of the same seed; alignment = the testbed "
        "classifier's top-1 accuracy on the prompted class; drift = mean |pixel change| vs the base sample (0..1 scale); "
        f"FID ({args.fid_features} features) of the samples vs {args.fid_real} held-out Fashion-MNIST test images "
        "(small samples: compare the rows, not with published FIDs).",
        "",
        "| model | reward (± s.e.) | win-rate vs base | alignment | FID | drift | train wall time | samples generated for training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        win = "–" if name == "base" else f"{100 * r['win_rate_vs_base']:.0f} %"
        lines.append(
            f"| {name} | {r['reward']:.4f} ± {r['reward_sem']:.4f} | {win} | {100 * r['alignment']:.1f} % | "
            f"{r['fid']:.2f} | {r['drift']:.4f} | {r['train_seconds']:.0f} s | {r['train_samples']} |"
        )
    def logs(name):
        path = out / name / "logs.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def mean(records, key):
        values = [r[key] for r in records if key in r]
        return sum(values) / max(len(values), 1)

    train_logs = lambda name: [r for r in logs(name) if "loss" in r]  # noqa: E731  (eval records have no loss)
    d, p, m = train_logs("dpo"), train_logs("spo"), train_logs("spo-pm")
    lines += ["", "Training diagnostics (from each run's logs.jsonl):", ""]
    if d:
        lines.append(f"* dpo: loss {d[0]['loss']:.4f} -> {d[-1]['loss']:.4f}, implicit accuracy (last window) {d[-1]['implicit_acc']:.2f}")
    if m:
        lines.append(f"* spo-pm: pairwise accuracy on noisy predictions, first/last window {m[0]['accuracy']:.2f} / {m[-1]['accuracy']:.2f}")
    if p:
        lines.append(f"* spo: valid-pair fraction {mean(p, 'valid_pair_fraction'):.2f}, clipped-ratio fraction {mean(p, 'clipped_fraction'):.3f}, "
                     f"loss {p[0]['loss']:.4f} -> {p[-1]['loss']:.4f}")
    if args.eval_every:
        lines += reward_curves({name: [r for r in logs(name) if "eval_reward" in r] for name in ("dpo", "spo")},
                               args.eval_every, len(FASHION_PROMPTS) * 2)
    if args.memory_steps:
        lines += peak_memory(out, args)
    lines += ["", "Training settings:", "", f"* dpo: `{json.dumps(dpo)}`", f"* spo: `{json.dumps(spo)}`", ""]
    Path(args.results).write_text("\n".join(lines))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
