"""PSO on the few-step testbed (``testbed:sd-lcm``, 4 steps), written to benchmarks/pso_results.md.

offline: a synthetic style of Fashion-MNIST sneakers ("a photo of a sneaker", ``--targets`` training
images; ``--style red``: tinted, ``mirror``: flipped left-right), learnt by plain denoising-loss
fine-tuning (``diffplug finetune sft``, all timesteps) and by PSO (``pso``, ``pso_db``) with the same LoRA,
learning rate, batch and steps. Each tuned model samples ``--images`` held-out seeds at 4 steps: FID
(testbed features) against held-out test sneakers in the style (did it reach the target?) and plain ones
(base domain), a style score (redness / left-minus-right mass), sharpness (variance of the Laplacian;
the targets' own in the header) and alignment (classifier: sneaker).

online: ``diffplug finetune pso --mode online --reward R`` for ``--steps`` steps; base and tuned models
sample the same ``--images`` held-out seeds (ten Fashion-MNIST prompts): reward mean +- s.e., gain in
s.e. (unpaired and paired per seed), sharpness, alignment, train seconds per step and total.

    python benchmarks/pso_bench.py offline --out /tmp/pso_off --steps 300
    python benchmarks/pso_bench.py offline --teacher --style mirror --targets 256 --lr 3e-5 --steps 200 --out /tmp/t
    (``--teacher``: the same sft recipe on the 50-step teacher, 30 steps: check that it does not break it)
    python benchmarks/pso_bench.py online --out /tmp/pso_on --reward jpeg_compressibility --steps 300
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffplug.evals.image_stats import sharpness
from diffplug.evals.stats import gain, mean_se


HERE = Path(__file__).resolve().parent
TINT = torch.tensor([1.0, 0.3, 0.3]).view(1, 3, 1, 1)  # the synthetic style: red
PROMPT = "a photo of a sneaker"
SNEAKER = 7


def sneakers(split: str, n: int, style: str = "none") -> torch.Tensor:
    """``n`` Fashion-MNIST sneakers of ``split`` in a synthetic style: ``red`` (tinted), ``mirror`` (flipped
    left-right: the testbed's sneakers point left, the targets right) or ``none`` (the base domain)."""
    from diffplug.testbed import data as D

    s = D.fashion_mnist(split)
    idx = torch.nonzero(s.labels == SNEAKER).flatten()[:n]
    images = s.images[idx].float() / 255
    return {"red": lambda x: x * TINT, "mirror": lambda x: x.flip(-1), "none": lambda x: x}[style](images)


def redness(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


def style_score(images: torch.Tensor, style: str) -> torch.Tensor:
    """How much of the style each image shows: red minus the other channels (``red``) or left-half minus
    right-half mass (``mirror``; the testbed's sneakers carry more mass on the right)."""
    if style == "red":
        return redness(images)
    w = images.shape[-1] // 2
    return images[..., :w].mean((1, 2, 3)) - images[..., -w:].mean((1, 2, 3))


def write_targets(folder: Path, n: int, style: str = "red") -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(sneakers("train", n, style)):
        Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(PROMPT)


def train(method: str, out: Path, args_list: list[str]) -> float:
    from diffplug.finetune.cli import main

    start = time.perf_counter()
    if out.exists() and (out / "final").is_dir():
        return json.loads((out / "bench_seconds.json").read_text())["seconds"]
    rc = main([method, "--output_dir", str(out), "--tensorboard", "false", *args_list])
    assert rc == 0, f"{method} failed"
    seconds = time.perf_counter() - start
    (out / "bench_seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


@torch.no_grad()
def sample(lora: Path | None, prompts: list[str], seed: int, scale: float, model: str = "sd-lcm",
           steps: int = 4) -> torch.Tensor:
    from diffplug import testbed

    pipe = testbed.load(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    out = []
    for i in range(0, len(prompts), 50):
        g = torch.Generator().manual_seed(seed + i)
        out.append(pipe(prompts[i : i + 50], num_inference_steps=steps, guidance_scale=scale, generator=g, output_type="pt").images)
    return torch.cat(out).float()


def fid(a, b) -> float:
    from testbed_lcm import fid as f

    return f(a, b)


def _header(args, what: str) -> list[str]:
    return [f"## {what} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.machine()} CPU shared with other "
            "jobs, 1 thread)", "", f"`python benchmarks/pso_bench.py {' '.join(args.argv)}`", ""]


def offline(args) -> list[str]:
    """sft vs PSO on the 4-step student; with ``--teacher``, only sft on the 50-step teacher (``testbed``),
    sampled at 30 steps: a recipe that breaks the teacher cannot separate the methods on the student."""
    from diffplug import testbed

    torch.set_num_threads(1)
    out = Path(args.out)
    write_targets(out / "targets", args.targets, args.style)
    model, steps = ("testbed", 30) if args.teacher else ("testbed:sd-lcm", 4)
    common = ["--model", model, "--data", str(out / "targets"), "--max_steps", str(args.steps),
              "--train_batch_size", str(args.batch), "--learning_rate", str(args.lr), "--lora_rank", "16",
              "--lr_scheduler", "constant", "--seed", "0", "--checkpoint_every", "0", "--log_every", "50"]
    common += [] if args.teacher else ["--guidance_scale", str(args.scale)]
    runs = {"sft (plain denoising loss)": ("sft", common)}
    extra = args.pso_flags.split()
    for loss in [] if args.teacher else args.losses:
        runs[f"pso ({loss}{' ' + args.pso_flags if extra else ''})"] = ("pso", common + ["--mode", "offline", "--loss_type", loss] + extra)
    held, plain = sneakers("test", args.images, args.style), sneakers("test", args.images)
    prompts = [PROMPT] * args.images
    classifier = testbed.load_classifier()
    pipe_name = "sd" if args.teacher else "sd-lcm"
    rows = []
    base = sample(None, prompts, 10_000, args.scale, pipe_name, steps)
    for name, (method, flags) in [(f"base ({pipe_name})", (None, None))] + list(runs.items()):
        seconds = 0.0
        if method is None:
            images = base
        else:
            folder = out / "".join(c if c.isalnum() else "_" for c in pipe_name + "_" + name)
            seconds = train(method, folder, flags)
            images = sample(folder / "final", prompts, 10_000, args.scale, pipe_name, steps)
        with torch.no_grad():
            align = (classifier(images).argmax(-1) == SNEAKER).float().mean().item()
        rows.append((name, fid(held, images), fid(plain, images), fid(base, images), style_score(images, args.style),
                     sharpness(images), align, seconds))
        print(rows[-1][:4], flush=True)
    what = f"Offline: {args.style} sneakers, {'teacher (`testbed`), 30' if args.teacher else '4'}-step samples"
    lines = _header(args, what) + [
        f"{args.targets} training targets (Fashion-MNIST training sneakers, style `{args.style}`, \"{PROMPT}\"), "
        f"LoRA r 16, lr {args.lr} constant, batch {args.batch}, {args.steps} steps each"
        f"{'' if args.teacher else f', guidance scale {args.scale} (the UNet input)'}; sampled with guidance scale "
        f"{args.scale}. {args.images} held-out seeds per row. Targets (held-out test sneakers in the style): style score "
        f"{style_score(held, args.style).mean().item():.3f} (base domain {style_score(plain, args.style).mean().item():.3f}), sharpness {sharpness(held).mean().item():.4f}; FID targets vs "
        f"base domain (plain test sneakers) {fid(held, plain):.2f}.",
        "",
        "Style score and sharpness: mean ± s.e. over the held-out seeds; every row samples the same seeds, so the "
        "comparisons are paired per seed (`diffplug.evals.stats.gain`: gain ± paired s.e., z in paired s.e.).",
        "",
        "| model | FID vs targets | FID vs base domain | FID vs base samples | style score | sharpness (Laplacian var.) "
        "| sharpness vs base (paired) | sharpness vs sft (paired) | alignment (sneaker) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sharp_base, sharp_sft = rows[0][5], rows[1][5] if len(rows) > 1 else None
    for i, (name, f_t, f_d, f_b, style, sharp, align, sec) in enumerate(rows):
        vs = [gain(ref, sharp, "sharpness") if ref is not None and i > k else None for k, ref in ((0, sharp_base), (1, sharp_sft))]
        cells = ["–" if g is None else f"{g.gain:+.4f} ± {g.paired_se:.4f} ({g.z_paired:+.1f})" for g in vs]
        lines.append(f"| {name} | {f_t:.2f} | {f_d:.2f} | {f_b:.2f} | {mean_se(style)} | {mean_se(sharp)} | {cells[0]} | {cells[1]} "
                     f"| {100 * align:.1f} % | {sec:.0f} |")
    return lines


def online(args) -> list[str]:
    from diffplug import testbed
    from diffplug.evals.compare import BLOCK_HEADER, block_cells, tuned_vs_base
    from diffplug.finetune.pairs import FASHION_PROMPTS, resolve_reward
    from diffplug.testbed.data import fashion_mnist

    torch.set_num_threads(1)
    out = Path(args.out)
    flags = ["--mode", "online", "--model", "testbed:sd-lcm", "--reward", args.reward, "--max_steps", str(args.steps),
             "--train_batch_size", str(args.batch), "--guidance_scale", str(args.scale), "--seed", "0",
             "--checkpoint_every", "0", "--log_every", "10"] + (["--learning_rate", str(args.lr)] if args.lr else [])
    seconds = train("pso", out / "online", flags)
    reward = resolve_reward(args.reward)
    prompts = [FASHION_PROMPTS[i % 10] for i in range(args.images)]
    classifier = testbed.load_classifier()
    labels = torch.arange(args.images) % 10
    images, align = {}, {}
    for name, lora in (("base (sd-lcm)", None), ("online PSO", out / "online" / "final")):
        images[name] = sample(lora, prompts, 20_000, args.scale)
        with torch.no_grad():
            align[name] = (classifier(images[name]).argmax(-1) == labels).float().mean().item()
    # the judge, sharpness and FID beside the reward gain, and the one reward-hacking rule (evals/compare.py)
    block = tuned_vs_base(images["base (sd-lcm)"], images["online PSO"], prompts,
                          {args.reward: lambda im, p: torch.as_tensor(reward(im, p)).float()},
                          fashion_mnist("test").floats()[: args.fid_real])
    g = block["gains"][f"reward_{args.reward}"]
    sb, st = block["gains"]["sharpness"].base, block["gains"]["sharpness"].tuned
    lines = _header(args, f"Online: reward `{args.reward}`, 4-step samples") + [
        f"Ten Fashion-MNIST prompts, batch {args.batch} prompts x 2 trajectories per step, {args.steps} steps, "
        f"guidance scale {args.scale}; {args.images} held-out seeds per row (the same for both). Train: "
        f"{seconds:.0f} s in all, {seconds / args.steps:.2f} s per step (setup included). Beside the reward gain, from "
        "the same images (`diffplug.evals.compare.tuned_vs_base`): the independent judge (`testbed.load_judge()`, "
        "never a training reward), Laplacian sharpness (paired gains, z in paired s.e.), FID (testbed features) "
        f"against {args.fid_real} Fashion-MNIST test images, and `hacking_verdict`'s label.",
        "",
        "| model | held-out reward (± s.e.) | gain (± paired s.e.) | paired s.e. units (two-sample) | sharpness | "
        + " | ".join(BLOCK_HEADER) + " | alignment (classifier) |",
        "|---|---|---|---|---|" + "---|" * len(BLOCK_HEADER) + "---|",
        f"| base (sd-lcm) | {g.base} | – | – | {sb} | – | {100 * block['gains']['judge_accuracy'].base.mean:.1f} % | – "
        f"| {block['fid']['b']:.2f} | – | {100 * align['base (sd-lcm)']:.1f} % |",
        f"| online PSO | {g.tuned} | {g.gain:+.4g} ± {g.paired_se:.2g} | {g.z_paired:+.1f} ({g.z_two_sample:+.1f}) | {st} | "
        + " | ".join(block_cells(block)) + f" | {100 * align['online PSO']:.1f} % |",
        "",
        f"Gain {g} (diffplug.evals.stats).",
    ]
    return lines


def main(argv=None) -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["offline", "online"])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.0, help="0: offline 2e-4, online PSO's default")
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--targets", type=int, default=64)
    p.add_argument("--fid_real", type=int, default=1000, help="online: Fashion-MNIST test images for FID")
    p.add_argument("--style", choices=["red", "mirror"], default="red", help="offline: the targets' style")
    p.add_argument("--teacher", action="store_true", help="offline: sft on the 50-step teacher only (recipe check)")
    p.add_argument("--losses", nargs="+", default=["pso", "pso_db"])
    p.add_argument("--reward", default="jpeg_compressibility")
    p.add_argument("--pso_flags", default="", help="offline: extra PSO keys, e.g. '--neg_defactor 1 --beta 50'")
    p.add_argument("--results", default=str(HERE / "pso_results.md"))
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.mode == "offline" and not args.lr:
        args.lr = 2e-4
    lines = offline(args) if args.mode == "offline" else online(args)
    path = Path(args.results)
    head = "# PSO on the few-step testbed (`testbed:sd-lcm`, 4 steps)\n\n"
    old = path.read_text() if path.is_file() else head
    path.write_text(old.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
