"""DeeDiff early exit on the testbed DiT: speed against quality across exit thresholds.

    OMP_NUM_THREADS=1 python benchmarks/early_exit_bench.py --images 96 --steps 20 \
        --out benchmarks/early_exit_results.md            # --device cuda on a GPU

Model: ``EarlyExit.from_testbed()`` (the testbed DiT, 4 blocks, with its shipped heads) inside the
stock ``testbed.load("dit")`` pipeline, run through diffplug's loop with CFG (``--scale``), DDIM.
Every threshold renders the same prompts from the same seeds (``guidance_quality.prompt_set``: half
Fashion-MNIST class prompts, half held-out emoji captions), so PSNR compares each image with the full
model's image from the same noise (threshold 0 = the full model, bit for bit).

Per threshold: mean blocks run per network evaluation (one sample, one CFG pass), the block saving,
theoretical FLOPs per evaluation (``torch.utils.flop_counter`` on one row of each piece: input stage,
block, exit head, UEM, final layer; heads and UEMs included), sampling wall time and denoiser CPU
time (process time inside the transformer's forward), and quality: FID and precision/recall on the
testbed classifier's features (``--features inception`` for the real Inception) against real test
images of the same prompts, alignment (testbed classifier top-1 on the prompted class), PSNR to the
full model. Then where exits happen along the trajectory (mean blocks per third of the steps).

    OMP_NUM_THREADS=1 python benchmarks/early_exit_bench.py --model flux --heads D/final/early_exit.safetensors \
        --backbone D/final/transformer --images 96 --steps 20 --out /tmp/ee_flux.md

``--model flux``: the flow testbed (``testbed.load("flux")``, a stock FluxPipeline, 3 double- and 5
single-stream blocks) with heads (and with ``--backbone`` the transformer) written by ``diffplug finetune
deediff --model testbed:flux [--train_backbone true] --output_dir D``; FlowMatchEuler, true CFG against
the empty negative prompt (default scale 5), ``max_sequence_length=pipe.tokenizer_2.model_max_length``.
The same sweep and scores; FLOPs per block kind (double-, single-stream; the UEM counted by hand as in
``--flow-flops``); the exits' errors are velocity-MSEs keyed on sigma, through the training code path
(``DiffusionModel``: the same noisy inputs, targets and model call as ``finetune deediff``).

    python benchmarks/early_exit_bench.py --flow-flops benchmarks/early_exit_flow_flops.md

counts instead what heads and UEMs cost on real-size Flux.1-dev and SD3-medium shapes (meta device,
no weights; no trained heads exist for them here).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from guidance_quality import Scorer, call_kwargs, fmt, prompt_set  # noqa: E402  (one prompt set and scorer for all benchmarks)

from diffplug import testbed  # noqa: E402
from diffplug.guidance import CFG  # noqa: E402
from diffplug.pipelines import from_pipe  # noqa: E402
from diffplug.samplers import EarlyExit  # noqa: E402

ADDED = {"resolution": None, "aspect_ratio": None}
NOTES = "\n## Reading it"
SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the flow model's exit errors: noise levels (Flux's timestep input is sigma)
# what the written table calls things, per --model (the DiT's strings are the ones its results were written with)
LABELS = {
    "dit": dict(title="the testbed DiT", model="the testbed DiT", sampler="DDIM steps, CFG", error="epsilon-MSE",
                level="t", shipped="the shipped heads `testbed/weights/dit_early_exit.safetensors`"),
    "flux": dict(title="the flow testbed (Flux)", model="the flow testbed's transformer (`testbed.load(\"flux\")`)",
                 sampler="FlowMatchEuler steps, true CFG (empty negative prompt)", error="velocity-MSE", level="sigma",
                 shipped=None),
}


@torch.no_grad()
def counted(fn) -> tuple[int, object]:
    """(FLOPs of ``fn()`` as flop_counter counts them: matmuls and attention only, its result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out


def piece_flops(ee: EarlyExit, tokens_len: int = 20) -> dict:
    """Theoretical FLOPs of one row through each piece (flop_counter counts matmuls and attention)."""
    dev, cfg = ee.device, ee.config
    size = cfg.sample_size
    x = torch.randn(1, cfg.in_channels, size, size, device=dev)
    ctx = torch.randn(1, tokens_len, cfg.caption_channels, device=dev)
    mask, t = torch.ones(1, tokens_len, device=dev), torch.tensor([500], device=dev)
    count = counted
    embed, p = count(lambda: ee.embed(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs=ADDED,
                                      encoder_attention_mask=mask))
    block, _ = count(lambda: ee.blocks[0](p.x, encoder_hidden_states=p.rows["ctx"], encoder_attention_mask=p.rows["ctx_mask"],
                                          timestep=p.rows["temb"]))
    head, _ = count(lambda: ee.head(1, p))
    final, _ = count(lambda: ee.head(ee.num_blocks, p))
    uem, _ = count(lambda: ee.uncertainty(1, p))
    norm = 5 * p.x.numel()  # the UEM's parameter-free LayerNorm input (flop_counter counts no elementwise ops)
    return {"embed": embed, "block": block, "head": head, "final": final, "uem": uem + norm}


def flops_per_eval(f: dict, exits: list[int], threshold: float) -> float:
    """Mean FLOPs per evaluation given exits per block (index i: exited after block i+1)."""
    n, rows = len(exits), sum(exits)
    blocks = f.get("blocks") or [f["block"]] * n  # per block in order (Flux: double- then single-stream)
    total = 0.0
    for k, count in enumerate(exits, start=1):
        uems = 0 if threshold <= 0 else min(k, n - 1)  # UEMs after blocks 1..min(k, N-1)
        out = f["final"] if k == n else f["head"]
        total += count * (f["embed"] + sum(blocks[:k]) + uems * f["uem"] + out)
    return total / max(rows, 1)


def text_kwargs(pipe, args) -> dict:
    """The text arguments beside the prompts: the DiT's 20 tokens; on Flux the trained text length
    (``max_sequence_length=pipe.tokenizer_2.model_max_length``) and true CFG's empty negative prompt."""
    if getattr(args, "model", "dit") == "flux":
        return call_kwargs(pipe, [])
    return {"max_sequence_length": 20}


def render(pipe, prompts, args, device):
    """``pipe.transformer`` (an EarlyExit, or the bare model) through diffplug's loop with CFG ->
    images (N, 3, H, W) in [0, 1], wall seconds, denoiser CPU seconds, exit log ([] for a bare model)."""
    run = from_pipe(pipe, guidance=CFG(args.scale), cuda_graph=False)
    ee = pipe.transformer
    clock = {"t": 0.0, "start": 0.0}
    pre = ee.register_forward_pre_hook(lambda *_: clock.update(start=time.process_time()))
    post = ee.register_forward_hook(lambda *_: clock.update(t=clock["t"] + time.process_time() - clock["start"]))
    exits = isinstance(ee, EarlyExit)
    if exits:
        ee.reset_stats()
        ee.log_exits = True
    images, start, text = [], time.perf_counter(), text_kwargs(pipe, args)
    try:
        for b in range(0, len(prompts), args.batch):
            out = run(prompts[b : b + args.batch], num_inference_steps=args.steps, output_type="pt",
                      generator=torch.Generator(device).manual_seed(args.seed + b // args.batch), **text)
            images.append(out.images.float().cpu())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    finally:
        pre.remove()
        post.remove()
    return torch.cat(images), time.perf_counter() - start, clock["t"], list(ee.exit_log) if exits else []


def trajectory(log, steps: int) -> list[float]:
    """Mean blocks per evaluation in each third of the sampling steps (high noise first); a call's step
    is the rank of its noise level (timestep or sigma, falling along the trajectory) among those visited."""
    levels = sorted({float(key.max()) for key, _ in log}, reverse=True)
    rank = {level: i for i, level in enumerate(levels)}
    per_call = [(rank[float(key.max())], blocks.float().mean().item(), len(blocks)) for key, blocks in log]
    thirds = []
    for lo, hi in ((0, steps // 3), (steps // 3, 2 * steps // 3), (2 * steps // 3, steps)):
        sel = [(m, n) for s, m, n in per_call if lo <= s < hi]
        thirds.append(sum(m * n for m, n in sel) / max(1, sum(n for _, n in sel)))
    return thirds


@torch.no_grad()
def head_errors(pipe, ee, items, timesteps=(100, 300, 500, 700, 900), seed: int = 0) -> list[dict]:
    """Per noise level: each exit's epsilon-MSE on real test images (same noise), the UEMs' mean u and
    the pseudo-label mean u_hat -- how much worse an early answer is, and whether the UEM knows it."""
    from diffplug.finetune.deediff import per_token

    dev = ee.device
    real = torch.stack([r for _, _, r in items]).float().to(dev) / 127.5 - 1
    x0 = pipe.vae.encode(real).latent_dist.mean * pipe.vae.config.scaling_factor
    embeds, mask, _, _ = pipe.encode_prompt([p for p, _, _ in items], do_classifier_free_guidance=False,
                                            device=dev, max_sequence_length=20)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in timesteps:
        eps = torch.randn(x0.shape, generator=g).to(dev)
        tt = torch.full((len(x0),), t, device=dev)
        x_t = pipe.scheduler.add_noise(x0, eps, tt.long())
        preds, us = ee.all_exits(x_t, embeds, tt, encoder_attention_mask=mask, added_cond_kwargs=ADDED)
        c = eps.shape[1]
        row = {"t": t, "mse": [float((p[:, :c] - eps).pow(2).mean()) for p in preds], "u": [float(u.mean()) for u in us],
               "u_hat": [float(per_token(torch.tanh((p[:, :c] - eps).abs()), ee.config.patch_size).mean()) for p in preds[:-1]]}
        out.append(row)
    return out


@torch.no_grad()
def flow_head_errors(pipe, ee, items, sigmas=SIGMAS, seed: int = 0) -> list[dict]:
    """``head_errors`` on a flow model, keyed on sigma, through the training code path (``DiffusionModel``'s
    latents, ``x_t = (1 - sigma) x0 + sigma eps``, velocity target ``eps - x0``, the family's model call,
    ``AllExits``): each exit's velocity-MSE on the real test images, the UEMs' mean u and mean u_hat."""
    from diffplug.finetune.deediff import AllExits, per_token
    from diffplug.finetune.model import DiffusionModel

    model = DiffusionModel(pipe, families=("flux", "chroma", "sd3"))
    real = torch.stack([r for _, _, r in items]).float().to(ee.device) / 127.5 - 1
    model.resolution = real.shape[-1]
    x0 = model.encode_images(real)
    cond = model.encode_prompts([p for p, _, _ in items], real.shape[-1])
    exits = AllExits(ee.transformer, uem_buckets=ee.uems[0].buckets)  # the same heads, as training calls them
    exits.load_state_dict(ee.state_dict())
    g = torch.Generator().manual_seed(seed)
    out = []
    for sigma in sigmas:
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        t = torch.full((len(x0),), sigma * model.num_train_timesteps, device=x0.device)
        x_t, target = model.noisy(x0, eps, t)
        preds = model.predict(exits, x_t, t, cond).chunk(ee.num_blocks)
        us = exits.__dict__.pop("uncertainties")
        out.append({"t": sigma, "mse": [float((p - target).pow(2).mean()) for p in preds], "u": [float(u.mean()) for u in us],
                    "u_hat": [float(per_token(torch.tanh((p - target).abs()), 1).mean()) for p in preds[:-1]]})
    return out


@torch.no_grad()
def count_pieces(ee: EarlyExit, kw: dict) -> dict:
    """Per-row FLOPs of each piece of a flow transformer wrapped in EarlyExit, for forward arguments ``kw``
    of one row: input stage, each block (``blocks``, in order; ``kinds``: kind -> [FLOPs, count]), exit
    head, final layer, UEM. flop_counter counts matmuls and attention only: the UEM (elementwise) is
    counted by hand as 7 T D + 2 D (LayerNorm ~5 T D, a dot product per token 2 T D, the embedding's 2 D)."""
    def count(fn):
        return counted(fn)[0]

    p = ee.embed(**kw)
    out = {"embed": count(lambda: ee.embed(**kw))}
    kinds, blocks = {}, []
    for i, block in enumerate(ee.blocks):
        kind = type(block).__name__
        if kind not in kinds:  # one block of each kind (the others are the same shape)
            kinds[kind] = [count(lambda i=i, block=block: ee.trunk.block(i, block, p)), 0]
        else:
            ee.trunk.block(i, block, p)
        kinds[kind][1] += 1
        blocks.append(kinds[kind][0])
    t, d = ee.trunk.image(p).shape[1:]
    out.update(kinds=kinds, blocks=blocks, tokens=t, dim=d, head=count(lambda: ee.head(1, p)),
               final=count(lambda: ee.head(ee.num_blocks, p)), uem=7 * t * d + 2 * d)
    out["full"] = out["embed"] + sum(blocks) + out["final"]
    return out


@torch.no_grad()
def flux_piece_flops(pipe, ee: EarlyExit) -> dict:
    """``count_pieces`` on one row of the pipeline's own inputs at its default size: packed latents and
    RoPE ids from ``prepare_latents``, the text at ``tokenizer_2.model_max_length``."""
    cfg, dev = ee.config, ee.device
    size = pipe.default_sample_size * pipe.vae_scale_factor
    latents, img_ids = pipe.prepare_latents(1, cfg.in_channels // 4, size, size, torch.float32, dev,
                                            torch.Generator().manual_seed(0))
    text = pipe.tokenizer_2.model_max_length
    kw = dict(hidden_states=latents, encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, device=dev),
              pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=dev),
              timestep=torch.full((1,), 0.5, device=dev), txt_ids=torch.zeros(text, 3, device=dev), img_ids=img_ids)
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((1,), 3.5, device=dev)
    return count_pieces(ee, kw)


# Published shapes, built on the meta device (no weights, no memory): 1024x1024 images.
FLOW_MODELS = {
    "Flux.1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)), 512),
    "SD3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), 77 + 256),
}


@torch.no_grad()
def flow_flops(name: str) -> dict:
    """``count_pieces`` of a real-size Flux / SD3 transformer wrapped in EarlyExit, on the meta device."""
    import diffusers

    cls, config, text = FLOW_MODELS[name]
    with torch.device("meta"):
        ee = EarlyExit(getattr(diffusers, cls)(**config))
        if cls.startswith("Flux"):
            tokens = 64 * 64
            kw = dict(hidden_states=torch.randn(1, tokens, 64), pooled_projections=torch.randn(1, 768),
                      encoder_hidden_states=torch.randn(1, text, 4096), timestep=torch.full((1,), 0.5),
                      guidance=torch.full((1,), 3.5), txt_ids=torch.zeros(text, 3), img_ids=torch.zeros(tokens, 3))
        else:
            kw = dict(hidden_states=torch.randn(1, 16, 128, 128), pooled_projections=torch.randn(1, 2048),
                      encoder_hidden_states=torch.randn(1, text, 4096), timestep=torch.full((1,), 500.0))
    return {**count_pieces(ee, kw), "name": name, "cls": cls, "text": text, "blocks": ee.num_blocks}


def write_flow_flops(path: Path, argv) -> None:
    lines = ["# DeeDiff early exit on real-size flow transformers: the cost of heads and UEMs", "",
             f"Command: `python benchmarks/early_exit_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
             f"torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Theoretical FLOPs of one row "
             "(one sample, one pass) at 1024x1024, counted with torch.utils.flop_counter on the published shapes built "
             "on the meta device (no weights: the numbers depend on shapes only). No trained heads exist for these "
             "models here: this says what an exit costs and saves, not how good early answers are.", "",
             "| model | image / text tokens | blocks | input stage GFLOPs | block GFLOPs (count) | exit head GFLOPs | UEM GFLOPs "
             "| head + UEM / block | full pass GFLOPs | pass exiting after block N/2 |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name in FLOW_MODELS:
        f = flow_flops(name)
        kinds = list(f["kinds"].items())
        mean_block = sum(v * c for v, c in f["kinds"].values()) / f["blocks"]
        half, done, cost = f["blocks"] // 2, 0, f["embed"]
        for flops, c in f["kinds"].values():  # blocks in order, with a UEM after each, then the exit head
            k = min(c, half - done)
            cost, done = cost + k * (flops + f["uem"]), done + k
        cost += f["head"]
        lines.append(
            f"| {name} (`{f['cls']}`) | {f['tokens']} / {f['text']} | {f['blocks']} | {f['embed'] / 1e9:.1f} | "
            + ", ".join(f"{k.replace('TransformerBlock', '')}: {v / 1e9:.0f} ({c})" for k, (v, c) in kinds) + " | "
            f"{f['head'] / 1e9:.2f} | {f['uem'] / 1e9:.3f} | {(f['head'] + f['uem']) / mean_block:.3%} | "
            f"{f['full'] / 1e9:.0f} | {cost / 1e9:.0f} ({1 - cost / f['full']:.1%} saved) |")
        print(lines[-1], flush=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dit", choices=sorted(LABELS),
                   help="dit: the testbed DiT (shipped heads); flux: the flow testbed (needs --heads from finetune deediff)")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scale", type=float, default=None, help="CFG scale (default 4 on the DiT, 5 on flux: true CFG)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thresholds", default="0,0.05,0.1,0.15,0.2,0.25,0.3")
    p.add_argument("--features", default="testbed", help="testbed (classifier features) or inception")
    p.add_argument("--heads", default=None, help="heads file (default on the DiT: the shipped testbed heads; flux: required)")
    p.add_argument("--backbone", default=None, help="a transformer folder (PixArt for dit, Flux for flux) to wrap instead of "
                   "the testbed model's, e.g. the final/transformer of `finetune deediff --train_backbone true` (pair it "
                   "with that run's --heads)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default: benchmarks/early_exit_results.md, flux: benchmarks/early_exit_flux_results.md)")
    p.add_argument("--flow-flops", type=Path, default=None,
                   help="only count the FLOPs of heads and UEMs on real-size Flux.1 / SD3 shapes (meta device) into this file")
    args = p.parse_args(argv)
    if args.flow_flops is not None:
        return write_flow_flops(args.flow_flops, argv)
    flux = args.model == "flux"
    args.scale = args.scale if args.scale is not None else (5.0 if flux else 4.0)
    args.out = args.out or HERE / ("early_exit_flux_results.md" if flux else "early_exit_results.md")
    check_pairing(args)

    torch.manual_seed(0)
    pipe = testbed.load(args.model)
    if args.backbone:
        import diffusers

        from diffplug.checked import check_finite_weights

        cls = getattr(diffusers, "FluxTransformer2DModel" if flux else "PixArtTransformer2DModel")
        pipe.transformer = cls.from_pretrained(args.backbone, use_safetensors=True)
        check_finite_weights(pipe.transformer, path=args.backbone, what="--backbone transformer")
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    ee = EarlyExit(pipe.transformer, heads=args.heads or testbed.WEIGHTS_DIR / "dit_early_exit.safetensors")
    pipe.transformer = ee
    items = prompt_set(args.images, args.seed)
    prompts = [prompt for prompt, _, _ in items]
    score = Scorer(items, testbed.load_classifier(), args.features)
    flops = flux_piece_flops(pipe, ee) if flux else piece_flops(ee)
    thresholds = [float(v) for v in args.thresholds.split(",")]

    rows, ref = [], None
    for tau in thresholds:
        ee.threshold = tau
        images, wall, cpu, log = render(pipe, prompts, args, args.device)
        stats = ee.stats()
        row = score(images, ref) if ref is not None else dict(score(images), psnr=math.inf)
        ref = images if ref is None else ref
        row.update(tau=tau, blocks=stats["mean_blocks"], exits=stats["exits_per_block"], wall=wall, cpu=cpu,
                   flops=flops_per_eval(flops, stats["exits_per_block"], tau), thirds=trajectory(log, args.steps))
        rows.append(row)
        print(f"tau {tau}: blocks {row['blocks']:.2f} fid {row.get('fid', float('nan')):.2f} align {row.get('align', 0):.3f} "
              f"psnr {row['psnr']:.1f} wall {wall:.1f}s", flush=True)
    errors = flow_head_errors(pipe, ee, items) if flux else head_errors(pipe, ee, items)
    write(args, rows, flops, ee.num_blocks, argv, errors)


def check_pairing(args) -> None:
    """Flux has no shipped heads; heads trained with the backbone (``train_backbone``: their run's
    ``early_exit.json`` names ``transformer/``) need that backbone: refused otherwise, not run on another model."""
    import json

    if args.model == "flux" and args.heads is None:
        raise ValueError("--heads: --model flux has no shipped heads; train them with `diffplug finetune deediff --model "
                         "testbed:flux --train_backbone true --output_dir D` and pass --heads D/final/early_exit.safetensors "
                         "--backbone D/final/transformer")
    record = Path(args.heads).parent / "early_exit.json" if args.heads else None
    if args.backbone is None and record is not None and record.is_file():
        if json.loads(record.read_text()).get("backbone") == "transformer/":
            raise ValueError(f"--backbone: the heads {args.heads} were trained jointly with a backbone ({record} says "
                             f"'transformer/'); pass --backbone {Path(args.heads).parent / 'transformer'}")


def write(args, rows, flops, n, argv, errors) -> None:
    full, lab = rows[0], LABELS[args.model]
    if args.model == "flux":
        names = {"FluxTransformerBlock": "double-stream", "FluxSingleTransformerBlock": "single-stream"}
        kinds = ", ".join(f"{names.get(k, k)} block {v / 1e6:.2f} M ({c})" for k, (v, c) in flops["kinds"].items())
        flops_line = (f"FLOPs of one row (flop_counter; {flops['tokens']} image tokens of {flops['dim']}): input stage "
                      f"{flops['embed'] / 1e6:.2f} M, {kinds}, exit head {flops['head'] / 1e6:.3f} M, UEM {flops['uem'] / 1e6:.3f} M "
                      f"(by hand: 7 T D + 2 D), final layer {flops['final'] / 1e6:.3f} M.")
    else:
        flops_line = (f"FLOPs of one row (flop_counter): input stage {flops['embed'] / 1e6:.2f} M, block {flops['block'] / 1e6:.2f} M, "
                      f"exit head {flops['head'] / 1e6:.3f} M, UEM {flops['uem'] / 1e6:.3f} M, final layer {flops['final'] / 1e6:.3f} M.")
    lines = [
        f"# DeeDiff early exit on {lab['title']}",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())} python "
        f"benchmarks/early_exit_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Device: {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), a shared "
        f"machine: wall times are noisy), torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.  ",
        f"Model: {'the transformer `' + str(args.backbone) + '`' if args.backbone else lab['model']} ({n} blocks) with "
        f"{'the heads `' + str(args.heads) + '`' if args.heads else lab['shipped']}; "
        f"{args.images} images (half Fashion-MNIST class prompts, half held-out emoji), {args.steps} {lab['sampler']} {args.scale:g}, "
        f"the same seeds for every threshold. FID/precision/recall on {args.features} features against real test images "
        "of the same prompts (small sample: compare rows, not with other tables).",
        "",
        flops_line,
        "",
        "| threshold | blocks / eval | block saving | exits after block 1..N | MFLOPs / eval | FLOP saving | wall s | denoiser CPU s | FID | precision | recall | align | PSNR to full (dB) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tau']:g} | {r['blocks']:.2f} | {1 - r['blocks'] / n:.1%} | {' / '.join(map(str, r['exits']))} | "
            f"{r['flops'] / 1e6:.2f} | {1 - r['flops'] / full['flops']:.1%} | {r['wall']:.1f} | {r['cpu']:.1f} | "
            f"{fmt(r.get('fid'), 2)} | {fmt(r.get('precision'))} | {fmt(r.get('recall'))} | {fmt(r.get('align'))} | {fmt(r['psnr'], 1)} |"
        )
    lines += ["", "Where exits happen along the trajectory (mean blocks per evaluation; sampling runs from pure noise (first third) to the image):", "",
              "| threshold | first third (high noise) | middle third | last third (low noise) |", "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tau']:g} | " + " | ".join(f"{v:.2f}" for v in r["thirds"]) + " |")
    target = "eps" if args.model == "dit" else "v"
    lines += ["", f"Exit quality by noise level: {lab['error']} of each exit on the {args.images} real test images of the prompts "
              f"(VAE latents, one noise draw), with the UEMs' mean u and the pseudo-label mean u_hat = tanh|g_i - {target}|:", "",
              f"| {lab['level']} | " + " | ".join(f"MSE exit {i}" for i in range(1, n)) + " | MSE full | "
              + " | ".join(f"u / u_hat {i}" for i in range(1, n)) + " |", "|---:|" + "---:|" * (2 * n - 1)]
    for e in errors:
        lines.append(f"| {e['t']} | " + " | ".join(f"{v:.3f}" for v in e["mse"]) + " | "
                     + " | ".join(f"{u:.2f} / {h:.2f}" for u, h in zip(e["u"], e["u_hat"])) + " |")
    old = args.out.read_text() if args.out.is_file() else ""
    notes = old[old.index(NOTES) + 1 :] if NOTES in old else ""  # the hand-written reading is kept (recheck its numbers)
    args.out.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
