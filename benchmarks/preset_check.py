"""Do the `diffplug finetune dpo` presets hold on prompt sets they were not tuned on?

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/preset_check.py --preset lora --sets hard,emoji --out runs/preset_check

The `lora` preset was tuned on JPEG compressibility over the 10 fashion prompts. Here each preset runs as a
new user would run it, every other key at its default (`--prompts FILE --reward R --preset P`), on

* ``hard``: the 4 prompts the testbed classifier confuses most (``pairs.HARD_FASHION_PROMPTS``), reward
  ``classifier_logprob``;
* ``emoji``: the 20 emoji prompts of ``finetune_bench.prompt_sets()``, reward ``colorfulness``.

Base and tuned models then sample the same fresh seeds (DDIM 20, CFG 5, ``--images`` per set) and are
scored with the training reward and with the independent judge (``evals.compare.judge_metric``: the
log-probability and top-1 of the prompted class; never a training reward); sharpness beside them. Gains are
``diffplug.evals.stats.gain``: paired s.e. (the headline), two-sample beside it. A preset holds when, on
every set, the reward gain is >= 3 paired s.e. and the judge's log-probability gain is > -2 paired s.e.

Each (set, preset) is cached in ``--out/<set>/<preset>/scores.json`` (base scores in ``--out/<set>/base.json``),
so sets can run in separate processes and a last call with all sets writes the combined verdict. CPU
seconds (user + sys of this process, and of the cached parts as recorded) are reported beside wall-clock.
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_bench import cpu_seconds, prompt_sets, sample, train  # noqa: E402  (the benchmark's runner, sampler, clock)

from diffplug.evals.stats import gain  # noqa: E402

HERE = Path(__file__).resolve().parent
SET_REWARD = {"hard": "classifier_logprob", "emoji": "colorfulness"}
MIN_REWARD_Z, MIN_JUDGE_Z = 3.0, -2.0


def score(images: torch.Tensor, prompts: list[str], reward: str) -> dict:
    """Per-image columns: the training reward, the judge (log-prob, top-1 of the prompted class), sharpness."""
    from diffplug.evals.compare import judge_metric
    from diffplug.evals.image_stats import sharpness
    from diffplug.evals.rewards import get_reward

    with torch.no_grad():
        out = {"reward": torch.as_tensor(get_reward(reward)(images, prompts)).float().flatten().tolist()}
        out.update({k: v.tolist() for k, v in judge_metric()(images, prompts).items()})
        out["sharpness"] = sharpness(images).tolist()
    return out


def cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    t0, c0 = time.time(), cpu_seconds()
    result = make()
    result.update(wall_seconds=time.time() - t0, cpu_seconds=cpu_seconds() - c0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def run_set(args, which: str, preset: str) -> dict:
    prompts, reward = prompt_sets()[which], SET_REWARD[which]
    folder = Path(args.out) / which
    folder.mkdir(parents=True, exist_ok=True)
    prompt_file = folder / "prompts.txt"  # as a user passes them (emoji prompts hold commas)
    prompt_file.write_text("".join(p + "\n" for p in prompts))
    per = max(1, args.images.get(which, args.images["default"]) // len(prompts))
    names = [p for p in prompts for _ in range(per)]

    def tuned():
        import shutil

        run, keys = folder / preset, {"preset": preset, "reward": reward, "prompts": str(prompt_file)}
        shared = folder / "pairs"  # the generated pairs depend on seed, prompts, reward and model, not on the preset
        if shared.is_dir() and not run.exists():  # reuse them: --resume latest with no checkpoint starts the run
            shutil.copytree(shared, run / "pairs")
            keys["resume"] = "latest"
        t0, c0 = time.time(), cpu_seconds()
        final, _ = train("dpo", run, args, keys)
        if not shared.is_dir():
            shutil.copytree(run / "pairs", shared)
        train_cpu, train_wall = cpu_seconds() - c0, time.time() - t0
        logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
        held = [r for r in logs if "heldout_loss" in r]
        config = yaml.safe_load((final / "config.yaml").read_text())
        pairs = sum(1 for _ in (run / "pairs" / "pairs.jsonl").open())
        images = sample(args.model, final, prompts, per, args.eval_seed)
        return {"scores": score(images, names, reward), "train_cpu_seconds": train_cpu, "train_wall_seconds": train_wall,
                "max_steps": config["max_steps"], "pairs": pairs, "heldout": held,
                "command": f"diffplug finetune dpo --preset {preset} --reward {reward} --prompts {prompt_file} "
                           f"--model {args.model} --seed {args.seed} --output_dir {run}"
                           + (" --resume latest (pairs copied in from an earlier run of the same set)" if "resume" in keys else "")}

    base = cached(folder / f"base-{per}.json", lambda: {"scores": score(sample(args.model, None, prompts, per, args.eval_seed),
                                                                          names, reward)})
    res = cached(folder / preset / f"scores-{per}.json", tuned)
    return {"set": which, "reward": reward, "prompts": len(prompts), "images": len(names), "base": base, "tuned": res}


def verdict(rows: list[dict]) -> tuple[bool, list[str]]:
    fails = []
    for r in rows:
        g = gain(r["base"]["scores"]["reward"], r["tuned"]["scores"]["reward"], r["reward"])
        j = gain(r["base"]["scores"]["judge_logprob"], r["tuned"]["scores"]["judge_logprob"], "judge_logprob")
        if not g.z_paired >= MIN_REWARD_Z:
            fails.append(f"{r['set']}: reward gain {g.z_paired:+.1f} paired s.e. (< {MIN_REWARD_Z:g})")
        if not j.z_paired > MIN_JUDGE_Z:
            fails.append(f"{r['set']}: judge log-prob {j.z_paired:+.1f} paired s.e. (<= {MIN_JUDGE_Z:g})")
    return not fails, fails


def steps_taken(tuned: dict) -> str:
    """``max_steps``, where the run stopped and which scoring's weights it kept (the trainer's rule)."""
    from diffplug.finetune.pairs import best_scoring

    held = tuned["heldout"]
    if not held:
        return str(tuned["max_steps"])
    last, kept = held[-1]["step"], best_scoring(held, "accuracy")["step"]
    return (f"{tuned['max_steps']}" + (f", stopped at {last}" if last < tuned["max_steps"] else "") +
            f", kept step {kept}" + (" (= base)" if kept == 0 else ""))


def report(args, preset: str, rows: list[dict], cmd: str, cpu_total: float, wall: float) -> list[str]:
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, shared)"
    ok, fails = verdict(rows)
    lines = ["", f"## `--preset {preset}`, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC", "",
             f"Command: `{cmd}`. Device: {device}, load average {os.getloadavg()[0]:.1f} at the end. CPU time "
             f"(user + sys, all parts, cached ones as recorded): {cpu_total:.0f} s; this call's wall-clock {wall:.0f} s.", "",
             "| set (reward) | pairs, steps (early stopping) | training CPU s | images | reward: base -> tuned | reward gain ± paired s.e. "
             "(z; two-sample z) | judge log-prob gain (z) | judge top-1 (z) | sharpness gain (z) | reading |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, t = r["base"]["scores"], r["tuned"]["scores"]
        g = gain(b["reward"], t["reward"], "reward")
        j = gain(b["judge_logprob"], t["judge_logprob"], "judge_logprob")
        a = gain(b["judge_accuracy"], t["judge_accuracy"], "judge_accuracy")
        s = gain(b["sharpness"], t["sharpness"], "sharpness")
        tu = r["tuned"]
        costs = [f"{name} {x.z_paired:+.1f} s.e." for name, x in (("judge log-prob", j), ("judge top-1", a), ("sharpness", s))
                 if x.z_paired <= -2]
        reading = ("**reward hacking?** " + ", ".join(costs)) if costs and g.z_paired >= MIN_REWARD_Z else \
            ("gain" if g.z_paired >= MIN_REWARD_Z else "no significant gain") + (f"; {', '.join(costs)}" if costs else "")
        lines.append(
            f"| {r['set']} ({r['prompts']} prompts, `{r['reward']}`) | {tu['pairs']}, {steps_taken(tu)} | "
            f"{tu['train_cpu_seconds']:.0f} | {r['images']} | {g.base.mean:.4g} -> {g.tuned.mean:.4g} | "
            f"{g.gain:+.4g} ± {g.paired_se:.2g} ({g.z_paired:+.1f}; {g.z_two_sample:+.1f}) | {j.gain:+.4g} ({j.z_paired:+.1f}) | "
            f"{100 * a.base.mean:.1f} -> {100 * a.tuned.mean:.1f} % ({a.z_paired:+.1f}) | {s.gain:+.3g} ({s.z_paired:+.1f}) | "
            f"{reading} |")
    lines += ["", "Held-out pairs during training (step: held-out loss / implicit accuracy; training pairs' accuracy):", ""]
    for r in rows:
        h = r["tuned"]["heldout"]
        lines.append(f"* {r['set']}: " + ", ".join(f"{x['step']}: {x['heldout_loss']:.3f} / {x['heldout_acc']:.2f}; "
                                                    f"{x['train_acc']:.2f}" for x in h) if h else f"* {r['set']}: none")
    lines += ["", f"Runs: " + "; ".join(f"`{r['tuned']['command']}`" for r in rows), "",
              f"**Verdict on {', '.join(r['set'] for r in rows)}: `--preset {preset}` " +
              ("holds** by the rule (reward >= 3 paired s.e., judge log-prob > -2 paired s.e. on every set); the reading "
               "column names any other cost."
                                                     if ok else "does not hold**: " + "; ".join(fails) + "."),
              "", "Training CPU seconds are the trainer's (held-out scorings included); pair generation is not in them when "
              "the run names pairs copied in from an earlier run of the same set (same seed, prompts, reward and model: "
              "the same pairs)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="lora", choices=("lora", "paper"))
    parser.add_argument("--sets", default="hard,emoji")
    parser.add_argument("--images", default="200", help="images per set, e.g. '200' or '200,emoji=100'")
    parser.add_argument("--out", default="runs/preset_check")
    parser.add_argument("--model", default="testbed", help="the base pipeline (tiny:sd for a dry run)")
    parser.add_argument("--seed", type=int, default=0, help="the training run's --seed (pairs, split, LoRA init)")
    parser.add_argument("--eval_seed", type=int, default=4242, help="seed of the fresh evaluation samples")
    parser.add_argument("--results", default=str(HERE / "preset_results.md"))
    parser.add_argument("--no_report", action="store_true", help="only compute and cache (a later call reports)")
    args = parser.parse_args()
    images = {"default": 200}
    for part in args.images.split(","):
        k, _, v = part.rpartition("=")
        images[k or "default"] = int(v)
    args.images = images

    torch.set_num_threads(int(os.environ.get("DIFFPLUG_THREADS", "1")))
    t0 = time.time()
    rows = [run_set(args, which, args.preset) for which in args.sets.split(",")]
    cpu_total = sum(r["tuned"]["cpu_seconds"] + r["base"]["cpu_seconds"] for r in rows)
    cmd = "python benchmarks/preset_check.py " + " ".join(a for a in sys.argv[1:] if a != "--no_report")
    lines = report(args, args.preset, rows, cmd, cpu_total, time.time() - t0)
    print("\n".join(lines))
    if not args.no_report:
        path = Path(args.results)
        head = "" if path.is_file() else ("# Do the DPO presets hold outside their tuning set?\n\nWritten by "
                                          "`benchmarks/preset_check.py` (its docstring says what is measured).\n")
        with open(path, "a") as f:
            f.write(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
