"""The denoising loop on a GPU: stock pipeline vs diffplug eager vs diffplug with CUDA graphs.

An SD1.5-shape pipeline with random weights (UNet and VAE at SD1.5 sizes, a 2-layer 768-d CLIP
text model built from a config over the tiny test tokenizer, fp16), one process. For each row of
the matrix schedulers x guidance (CFG, APG, CFG cut at half the steps) x batch x output (latent:
the loop; pil: plus the VAE decode) it times, minimum of ``--repeats`` after a warm-up:

    stock   the StableDiffusionPipeline itself (CFG rows only: it has no other guidance)
    eager   from_pipe(pipe, guidance, cuda_graph=False)
    graph   from_pipe(pipe, guidance, cuda_graph=True)

and the floor: the UNet alone replayed from a CUDA graph at batch 2B, x steps (goal: graph within
1.1x of it). ``agreement`` compares final latents (same generator): stock vs eager, eager vs graph.
Prints JSON (and writes it to ``--out`` after every row, so a cut-off run keeps what it measured).

    python benchmarks/loop_gpu.py --out loop.json                  # the H200/H100 run
    python benchmarks/loop_gpu.py --device cpu --tiny --steps 3    # smoke test of this script
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings

import torch

warnings.filterwarnings("ignore")

SCHEDULERS = ("dpm++", "unipc", "unipc-fast", "dc-solver", "ddim")
GUIDANCE = ("cfg", "apg", "cfg-cutoff")


def build(device: str, dtype: torch.dtype, tiny: bool):
    """A StableDiffusionPipeline with SD1.5-shape (or, ``tiny``, test-size) random models."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from diffplug.testing import _clip_text, tiny_pipeline

    base = tiny_pipeline("sd")
    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8, cross_attention_dim=768, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, norm_num_groups=8,
        )
        vae = base.vae
    else:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
        )  # SD1.5's VAE shape
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=_clip_text(hidden=768), tokenizer=base.tokenizer,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def scheduler_for(name: str, pipe):
    from diffplug.pipelines.registry import make_scheduler

    if name == "unipc-fast":
        from diffplug.samplers import FastUniPCScheduler

        return FastUniPCScheduler.from_config(pipe.scheduler.config)
    return make_scheduler(name, pipe)


def guidance_for(name: str, scale: float):
    from diffplug.guidance import APG, CFG

    return {
        "cfg": lambda: CFG(scale),
        "apg": lambda: APG(scale, eta=0.0, norm_threshold=15, momentum=-0.5),
        "cfg-cutoff": lambda: CFG(scale, stop=0.5),
    }[name]()


def timer(device: str, repeats: int):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        fn()  # warm-up (and graph capture)
        sync()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return 1000 * best

    return timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="test-size models (a smoke test, e.g. on a CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    parser.add_argument("--guidance", nargs="+", default=list(GUIDANCE), choices=GUIDANCE)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--outputs", nargs="+", default=["latent", "pil"], choices=["latent", "pil"])
    parser.add_argument("--out", default=None, help="also write the JSON here, after every row")
    args = parser.parse_args()

    from diffplug.pipelines import from_pipe
    from diffplug.pipelines.graphs import CUDAGraphModel

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; smoke-test with --device cpu --tiny")
    dtype = torch.float16 if cuda else torch.float32
    timed = timer(args.device, args.repeats)
    start = time.perf_counter()
    pipe = build(args.device, dtype, args.tiny)
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "dtype": str(dtype), "tiny": args.tiny, "steps": args.steps, "scale": args.scale,
        "build_s": round(time.perf_counter() - start, 1), "floors": {}, "agreement": [], "rows": [], "errors": [],
    }

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    def attempt(what, fn):
        try:
            return fn()
        except Exception as err:  # keep going: a device session is short
            res["errors"].append({"what": what, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]})
            print("ERROR", what, err, flush=True)
        finally:
            save()

    side = pipe.unet.config.sample_size
    tokens = pipe.tokenizer.model_max_length

    def floor(batch):
        x = torch.randn(2 * batch, 4, side, side, device=args.device, dtype=dtype)
        emb = torch.randn(2 * batch, tokens, 768, device=args.device, dtype=dtype)
        t = torch.tensor(500, device=args.device)
        unet = lambda x, t, encoder_hidden_states: pipe.unet(x, t, encoder_hidden_states, return_dict=False)[0]  # noqa: E731
        out = {"batch": batch, "unet_eager_ms": timed(lambda: unet(x, t, emb))}
        if cuda:
            graph = CUDAGraphModel(unet)
            out["unet_graph_ms"] = timed(lambda: graph(x, t, encoder_hidden_states=emb))
            out["floor_ms"] = out["unet_graph_ms"] * args.steps
        res["floors"][str(batch)] = out
        return out

    def agreement(sched):
        pipe.scheduler = scheduler_for(sched, pipe)
        kw = dict(num_inference_steps=args.steps, guidance_scale=args.scale, output_type="latent")

        def latents(run):
            gen = torch.Generator(args.device).manual_seed(1)
            return run(["a photo of a bag"], generator=gen, **kw).images.float()

        stock, eager = latents(pipe), latents(from_pipe(pipe, cuda_graph=False))
        out = {"scheduler": sched, "scale": stock.abs().max().item(),
               "stock_vs_eager_maxabs": (stock - eager).abs().max().item()}
        if cuda:
            out["eager_vs_graph_maxabs"] = (eager - latents(from_pipe(pipe, cuda_graph=True))).abs().max().item()
        res["agreement"].append(out)
        return out

    def row(sched, guide, batch, output):
        pipe.scheduler = scheduler_for(sched, pipe)
        prompts = ["a photo of a sneaker"] * batch
        kw = dict(num_inference_steps=args.steps, guidance_scale=args.scale, output_type=output)
        r = {"scheduler": sched, "guidance": guide, "batch": batch, "output": output}
        if guide == "cfg":
            r["stock_ms"] = timed(lambda: pipe(prompts, **kw))
        guidance = guidance_for(guide, args.scale)
        eager = from_pipe(pipe, guidance=guidance, cuda_graph=False)
        r["eager_ms"] = timed(lambda: eager(prompts, **kw))
        if cuda:
            graph = from_pipe(pipe, guidance=guidance, cuda_graph=True)
            r["graph_ms"] = timed(lambda: graph(prompts, **kw))
            floor_ms = res["floors"].get(str(batch), {}).get("floor_ms")
            if floor_ms:
                r["graph_over_floor"] = r["graph_ms"] / floor_ms
            if "stock_ms" in r:
                r["speedup_vs_stock"] = r["stock_ms"] / r["graph_ms"]
        res["rows"].append(r)
        print(json.dumps(r), flush=True)
        return r

    with torch.inference_mode():
        for batch in args.batches:
            attempt(f"floor b{batch}", lambda b=batch: floor(b))
        for sched in args.schedulers:
            attempt(f"agreement {sched}", lambda s=sched: agreement(s))
        for sched in args.schedulers:
            for guide in args.guidance:
                for batch in args.batches:
                    for output in args.outputs:
                        attempt(f"{sched} {guide} b{batch} {output}",
                                lambda s=sched, g=guide, b=batch, o=output: row(s, g, b, o))
    res["total_s"] = round(time.perf_counter() - start, 1)
    save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
