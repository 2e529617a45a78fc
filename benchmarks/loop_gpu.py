"""GPU: a 20-step CFG loop with an SD1.5-sized UNet (random weights, fp16), three ways.

1. the UNet alone, replayed from a CUDA graph at batch 2 (the floor: 20 x this);
2. the stock StableDiffusionPipeline loop (eager);
3. diffplug's loop, eager and with ``cuda_graph=True``.
Goal (issue 2): (3, graphs) within 1.1x of 20 x (1).

    python benchmarks/loop_gpu.py [--steps 20] [--batch 1] [--scheduler dpm++]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def sd15_pipeline(device, dtype):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffplug.testing import tiny_pipeline

    tiny = tiny_pipeline("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5 shape
    text = tiny.text_encoder
    pipe = StableDiffusionPipeline(
        unet=unet, vae=tiny.vae, text_encoder=text, tokenizer=tiny.tokenizer, scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # the tiny text encoder is 32-d; project to the UNet's 768 with a fixed map so shapes match
    pipe.text_encoder.text_model.final_layer_norm = torch.nn.Sequential(
        pipe.text_encoder.text_model.final_layer_norm, torch.nn.Linear(32, 768)
    )
    return pipe.to(device, dtype)


def cuda_time(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    from diffplug.pipelines import from_pipe
    from diffplug.pipelines.graphs import CUDAGraphModel
    from diffplug.pipelines.registry import make_scheduler

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--scheduler", default="dpm++")
    args = parser.parse_args()
    device, dtype = "cuda", torch.float16
    pipe = sd15_pipeline(device, dtype)
    pipe.scheduler = make_scheduler(args.scheduler, pipe)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a sneaker"] * args.batch
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent")

    x = torch.randn(2 * args.batch, 4, 64, 64, device=device, dtype=dtype)
    emb = torch.randn(2 * args.batch, 32, 768, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    graph = CUDAGraphModel(lambda x, t, encoder_hidden_states: pipe.unet(x, t, encoder_hidden_states, return_dict=False)[0])
    unet_graph = cuda_time(lambda: graph(x, t, encoder_hidden_states=emb), repeats=20)

    results = {
        "device": torch.cuda.get_device_name(),
        "batch": args.batch,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "unet_graph_ms": 1000 * unet_graph,
        "floor_ms": 1000 * unet_graph * args.steps,
        "stock_ms": 1000 * cuda_time(lambda: pipe(prompts, **kw)),
        "diffplug_eager_ms": 1000 * cuda_time(lambda: from_pipe(pipe)(prompts, **kw)),
    }
    fast = from_pipe(pipe, cuda_graph=True)
    results["diffplug_graph_ms"] = 1000 * cuda_time(lambda: fast(prompts, **kw))
    results["graph_over_floor"] = results["diffplug_graph_ms"] / results["floor_ms"]
    results["speedup_vs_stock"] = results["stock_ms"] / results["diffplug_graph_ms"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
