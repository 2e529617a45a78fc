"""The few-step testbed model (``load("sd-lcm")``) against its 50-step teacher, written to
benchmarks/testbed_lcm_results.md.

For the ten Fashion-MNIST class prompts (``--images`` images, the same seeds for every row): prompt
alignment (testbed classifier top-1 on the prompted class, over all 19 classes and over the 10
Fashion-MNIST ones), FID on testbed-classifier features against as many held-out Fashion-MNIST test
images and against the teacher's own samples, sharpness (variance of the Laplacian) and wall time per
image. Teacher: DDIM 50 steps with CFG; student: ``LCMScheduler`` at 1, 2 and 4 steps, the guidance scale
as its UNet input (one network call per step).

    python benchmarks/testbed_lcm.py --images 200 --scale 7.5
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffplug import testbed
from diffplug.evals.image_stats import sharpness
from diffplug.testbed import data as D

HERE = Path(__file__).resolve().parent


def class_prompts(n: int) -> tuple[list[str], torch.Tensor]:
    labels = torch.arange(n) % len(D.FASHION_CLASSES)
    return [D.prompt_for_class(int(k)) for k in labels], labels


def generate(pipe, prompts, steps: int, scale: float, seed: int = 0, batch: int = 50) -> tuple[torch.Tensor, float]:
    """Images in [0, 1] and seconds per image (seed ``seed + i`` for the batch starting at i)."""
    out, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        out.append(pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=scale, generator=g,
                        output_type="pt").images.float().cpu())
    return torch.cat(out), (time.perf_counter() - start) / len(prompts)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID on the testbed classifier's features between two image sets."""
    from diffplug.evals import FrechetInceptionDistance

    m = FrechetInceptionDistance(features="testbed")
    m.update(a, real=True)
    m.update(b, real=False)
    return float(m.compute())


@torch.no_grad()
def measure(images: torch.Tensor, labels: torch.Tensor, classifier, real: torch.Tensor, teacher: torch.Tensor | None) -> dict:
    logits = classifier(images)
    return {
        "align_19": (logits.argmax(-1) == labels).float().mean().item(),
        "align_10": (logits[:, : len(D.FASHION_CLASSES)].argmax(-1) == labels).float().mean().item(),
        "fid_real": fid(real, images),
        "fid_teacher": fid(teacher, images) if teacher is not None else 0.0,
        "sharpness": sharpness(images).mean().item(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale of both (the pipeline's default: 7.5)")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=str(HERE / "testbed_lcm_grid.png"), help="4-step sample grid ('' = none)")
    p.add_argument("--results", default=str(HERE / "testbed_lcm_results.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    prompts, labels = class_prompts(args.images)
    test = D.fashion_mnist("test")
    real = test.images[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.images]].float() / 255
    classifier = testbed.load_classifier()
    rows = []
    teacher = testbed.load("sd")
    teacher.set_progress_bar_config(disable=True)
    t_images, t_sec = generate(teacher, prompts, args.teacher_steps, args.scale)
    rows.append((f"teacher, DDIM {args.teacher_steps} steps + CFG", 2 * args.teacher_steps, t_sec,
                 measure(t_images, labels, classifier, real, None)))
    student = testbed.load("sd-lcm")
    student.set_progress_bar_config(disable=True)
    for steps in (1, 2, 4):
        images, sec = generate(student, prompts, steps, args.scale)
        rows.append((f"sd-lcm, LCMScheduler {steps} step{'s' if steps > 1 else ''}", steps, sec,
                     measure(images, labels, classifier, real, t_images)))
        print(rows[-1], flush=True)
        if steps == 4 and args.grid:
            from testbed_quality import grid  # noqa: E402  (benchmarks/ is the script's folder)

            grid(torch.cat([images[:20], t_images[:20]]), 10, Path(args.grid))
    lines = [
        "# Few-step testbed model (`load(\"sd-lcm\")`) vs its 50-step teacher",
        "",
        f"`python benchmarks/testbed_lcm.py --images {args.images} --scale {args.scale}` "
        f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.machine()} CPU, {args.threads} thread, "
        "a machine shared with other jobs: wall times are upper bounds). Ten Fashion-MNIST class prompts, "
        f"{args.images} images per row, the same seeds; guidance scale {args.scale}. FID on the testbed "
        "classifier's features, against as many held-out Fashion-MNIST test images (real) and against the "
        "teacher's samples; sharpness = variance of the Laplacian (real test images: "
        f"{sharpness(real).mean().item():.4f}).",
        "",
        "| sampler | network calls | alignment (19 classes) | alignment (10) | FID vs real | FID vs teacher | sharpness | s / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, calls, sec, m in rows:
        lines.append(f"| {name} | {calls} | {100 * m['align_19']:.1f} % | {100 * m['align_10']:.1f} % | {m['fid_real']:.2f} | "
                     f"{m['fid_teacher']:.2f} | {m['sharpness']:.4f} | {sec:.4f} |")
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
