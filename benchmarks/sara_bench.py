"""SaRA vs LoRA vs full fine-tuning: training memory counted in bytes, step time, what each learns
and what it keeps, trainable parameters and stored file size.

    python benchmarks/sara_bench.py memory --model testbed --out runs/sara     # one training step each
    python benchmarks/sara_bench.py memory --model sd15 --out runs/sara        # SD1.5-size UNet, random weights
    python benchmarks/sara_bench.py quality --out runs/sara --steps 200        # diffplug finetune sft runs + evals
    python benchmarks/sara_bench.py report --out runs/sara                     # -> benchmarks/sara_results.md

Memory is counted, not sampled from the process (RSS cannot tell the methods apart): parameters
(every UNet tensor, plus SaRA's int32 indices and base values), gradients (``.grad`` after the
backward), AdamW state after one step, and tensors saved for backward (``saved_tensors_hooks``,
each storage once, parameters' own storages excluded since they are counted already).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the trainer's LoRA default
LORA_RANKS = (4, 8, 16, 64)


# -- memory ---------------------------------------------------------------------------------------------
def build(model: str):
    """(UNet, inputs) -- the testbed UNet at its 32 px with batch 8, or an SD1.5-size UNet (random
    weights, diffusers' default config = SD1.x) at 64 px with batch 1."""
    if model == "testbed":
        from diffplug import testbed

        unet = testbed.load("sd").unet
        b, size, tokens, dim = 8, 16, 16, 384
    else:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=768)
        b, size, tokens, dim = 1, 8, 77, 768
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, unet.config.in_channels, size, size, generator=g)
    return unet.train(), (x, torch.randint(0, 1000, (b,), generator=g), torch.randn(b, tokens, dim, generator=g))


def setup(unet, kind: str, value):
    from diffplug.finetune import sara
    from diffplug.finetune.adapters import add_lora

    if kind == "full":
        unet.requires_grad_(True)
    elif kind == "lora":  # the trainer's own LoRA set-up
        unet.requires_grad_(False)
        add_lora(unet, {"rank": value, "alpha": value, "target_modules": TARGETS, "init": "gaussian"})
    else:
        sara.prepare(unet, fraction=value)
    return [p for p in unet.parameters() if p.requires_grad]


def count(unet, inputs, params, optimizer_step: bool = True, steps: int = 3) -> dict:
    from diffplug.finetune import sara

    a = sara.adapter_of(unet)
    persistent = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    extra = 0
    if a is not None:
        for s in a.slots:
            persistent.update({s.index.untyped_storage().data_ptr(), s.base.untyped_storage().data_ptr()})
            extra += s.index.nbytes + s.base.nbytes
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in persistent:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    opt = torch.optim.AdamW(params, lr=1e-6)
    times = []
    for i in range(steps):
        saved.clear()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = unet(*inputs).sample.float().pow(2).mean()
        loss.backward()
        grads = sum(p.grad.nbytes for p in params if p.grad is not None)
        if optimizer_step:
            opt.step()
        times.append(time.perf_counter() - t0)
        saved_bytes = sum(saved.values())
        opt.zero_grad(set_to_none=True)
    trainable = sum(p.numel() for p in params)
    state = sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())
    if not optimizer_step:
        state = 2 * sum(p.nbytes for p in params)  # AdamW's exp_avg + exp_avg_sq, as measured on the testbed
    weights = sum(p.nbytes for p in unet.parameters()) + extra
    return {"trainable": trainable, "params_bytes": weights, "grad_bytes": grads, "optim_bytes": state,
            "saved_bytes": saved_bytes, "total_bytes": weights + grads + state + saved_bytes,
            "step_s": statistics.median(times), "optimizer_counted": "measured" if optimizer_step else "2 x trainable x 4 B"}


def memory(args) -> None:
    torch.set_num_threads(args.threads)
    unet0, inputs = build(args.model)
    n = sum(p.numel() for p in unet0.parameters())
    lora8 = copy.deepcopy(unet0)
    budget = sum(p.numel() for p in setup(lora8, "lora", 8)) / n
    del lora8
    configs = [("full", None)] + [("lora", r) for r in LORA_RANKS] + [("sara", 0.1), ("sara", budget)]
    out = {"model": args.model, "total_params": n, "threads": args.threads, "rows": []}
    big = args.model == "sd15"
    for kind, value in configs:
        unet = copy.deepcopy(unet0) if not big else build(args.model)[0]
        params = setup(unet, kind, value)
        row = {"kind": kind, "value": value, **count(unet, inputs, params, optimizer_step=not (big and kind == "full"),
                                                      steps=2 if big else 3)}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        del unet, params
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"memory_{args.model}.json").write_text(json.dumps(out, indent=1))


# -- quality ------------------------------------------------------------------------------------------------
def runs(args, budget: float) -> dict:
    lr = {"full": 1e-4, "lora": 1e-3, "sara": 5e-3}  # the papers' SD learning rates x 10 (testbed pre-training LR / SD's)
    return {
        "full": ["--adapter", "full", "--learning_rate", str(lr["full"])],
        "lora r8": ["--adapter", "lora", "--lora_rank", "8", "--learning_rate", str(lr["lora"])],
        "lora r64": ["--adapter", "lora", "--lora_rank", "64", "--learning_rate", str(lr["lora"])],
        "sara 10%": ["--adapter", "sara", "--learning_rate", str(lr["sara"]), "--sara_rank_min_dim", "16"],
        f"sara {100 * budget:.2f}% (= lora r8)": ["--adapter", "sara", "--sara_fraction", f"{budget:.6f}",
                                                  "--learning_rate", str(lr["sara"]), "--sara_rank_min_dim", "16"],
    }


def train(out: Path, argv: list[str], args) -> float:
    from diffplug.finetune.cli import main

    if (out / "final").exists():
        return json.loads((out / "bench_time.json").read_text())["seconds"]
    t0 = time.perf_counter()
    assert main(["sft", "--data", args.data, "--output_dir", str(out), "--max_steps", str(args.steps), "--seed", "0",
                 "--train_batch_size", str(args.batch), "--checkpoint_every", "0", "--tensorboard", "false",
                 "--lr_scheduler", "constant", *argv]) == 0
    seconds = time.perf_counter() - t0
    (out / "bench_time.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def pipeline(final: Path | None):
    from diffplug import testbed
    from diffplug.finetune import sara

    pipe = testbed.load("sd")
    pipe.set_progress_bar_config(disable=True)
    if final is None:
        return pipe
    if (final / sara.FILE).is_file():
        sara.load(pipe.unet, final)
    elif (final / "unet").is_dir():
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(str(final), subfolder="unet", use_safetensors=True)
    else:
        pipe.load_lora_weights(str(final))
        pipe.fuse_lora()
    return pipe


def sample(pipe, prompts: list[str], seed: int) -> torch.Tensor:
    from diffplug.guidance.base import CFG
    from diffplug.pipelines import from_pipe

    run, out = from_pipe(pipe, guidance=CFG(4.0)), []
    for i in range(0, len(prompts), 50):
        g = torch.Generator().manual_seed(seed + i)
        out.append(run(prompts[i : i + 50], num_inference_steps=20, generator=g, output_type="pt").images.float())
    return torch.cat(out).clamp(0, 1)


def quality(args) -> None:
    from diffplug import testbed
    from diffplug.evals import fid_from_features, kernel_inception_distance
    from diffplug.evals.features import TestbedFeatures
    from diffplug.finetune.sft import testbed_set
    from diffplug.evals.compare import block_cells, block_json, judge_metric, tuned_vs_base
    from diffplug.testbed.data import fashion_mnist, prompt_for_class

    torch.set_num_threads(args.threads)
    root = Path(args.out)
    mem = json.loads((root / "memory_testbed.json").read_text())
    budget = next(r["value"] for r in mem["rows"] if r["kind"] == "sara" and r["value"] != 0.1)
    target = testbed_set(args.data.split(":", 1)[1])
    target = target.subset(torch.arange(min(args.target_images, len(target))))
    t_prompts = [c[0] for c in target.captions]
    b_prompts = [prompt_for_class(i % 10) for i in range(args.base_images)]
    b_labels = torch.tensor([i % 10 for i in range(args.base_images)])
    feats, classifier, scorer = TestbedFeatures(), testbed.load_classifier(), testbed.load_scorer()
    with torch.no_grad():
        real_t = feats(target.floats())
        real_base = fashion_mnist("test").floats()[: args.base_images]
        real_b = feats(real_base)
    results, base_ib = {}, None
    judge = judge_metric()
    chosen = {k: v for k, v in runs(args, budget).items() if not args.only or k.split(" (")[0] in args.only}
    for name, argv in {"base": None, **chosen}.items():
        seconds, final = 0.0, None
        if argv is not None:
            out = root / name.split(" (")[0].replace(" ", "_").replace("%", "pct")
            seconds, final = train(out, argv, args), out / "final"
        pipe = pipeline(final)
        with torch.no_grad():
            it, ib = sample(pipe, t_prompts, 1000), sample(pipe, b_prompts, 2000)
            ft, fb = feats(it), feats(ib)
            kid = kernel_inception_distance(ft, real_t, subsets=50, subset_size=min(100, len(ft)))[0]
            res = {"fid_target": float(fid_from_features(real_t, ft)), "kid_target": float(kid),
                   "align_target": float(scorer(it, t_prompts).mean()),
                   "fid_base": float(fid_from_features(real_b, fb)),
                   "align_base": float((classifier(ib).argmax(-1) == b_labels).float().mean()),
                   "train_s": seconds}
        # what it keeps, image by image against the base model's samples of the same seeds: the independent
        # judge, sharpness and FID (evals.compare.tuned_vs_base; sft has no reward, so no hacking verdict applies)
        base_ib = ib if base_ib is None else base_ib
        block = tuned_vs_base(base_ib, ib, b_prompts, None, real_base, judge=judge)
        cells = block_cells(block)[:4]
        if final is None:  # the base row: its own accuracy and FID, no gain
            cells = ["–", f"{100 * block['gains']['judge_accuracy'].base.mean:.1f} %", "–", f"{block['fid']['b']:.2f}"]
        res["kept_block"], res["kept_cells"] = block_json(block), cells
        if final is not None:
            res["file_bytes"] = sum(p.stat().st_size for p in final.rglob("*.safetensors"))
            res["final_loss"] = json.loads((final.parent / "logs.jsonl").read_text().splitlines()[-1]).get("loss")
        results[name] = res
        print(name, json.dumps(res), flush=True)
    (root / "quality.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


# -- report --------------------------------------------------------------------------------------------------
def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def report(args) -> None:
    from diffplug.evals.compare import BLOCK_HEADER

    root = Path(args.out)
    lines = ["# SaRA vs LoRA vs full fine-tuning", "",
             f"`benchmarks/sara_bench.py` ({datetime.date.today()}, {platform.machine()} CPU, 2 cores shared, torch "
             f"{torch.__version__}). Commands: `python benchmarks/sara_bench.py memory --model testbed|sd15 --out runs/sara`, "
             "`... quality --out runs/sara`, `... report --out runs/sara`.", ""]
    for model in ("testbed", "sd15"):
        f = root / f"memory_{model}.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        rows = m["rows"]
        full = next(r for r in rows if r["kind"] == "full")["total_bytes"]
        title = {"testbed": "testbed UNet (1.29 M parameters, float32), batch 8 at 32 px",
                 "sd15": "SD1.5-size UNet (diffusers' default config, random weights, float32), batch 1 at 64 px"}[model]
        lines += [f"## Training memory, {title}", "",
                  "Counted in bytes (MiB below) after one AdamW step: parameters (all UNet tensors; SaRA adds its int32 "
                  "indices and base values), gradients, optimizer state, tensors saved for backward (each storage once; "
                  f"the parameters' own storages not again). Step time: median, {m['threads']} thread(s), busy machine.", "",
                  "| adapter | trainable | parameters | gradients | AdamW state | saved for backward | total | vs full | step s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            name = {"full": "full", "lora": f"LoRA r{r['value']}"}.get(r["kind"]) or f"SaRA {100 * r['value']:.2f} %"
            note = "" if r["optimizer_counted"] == "measured" else " (2 x 4 B x trainable)"
            lines.append(f"| {name} | {r['trainable']:,} | {mib(r['params_bytes'])} | {mib(r['grad_bytes'])} | "
                         f"{mib(r['optim_bytes'])}{note} | {mib(r['saved_bytes'])} | {mib(r['total_bytes'])} | "
                         f"{100 * r['total_bytes'] / full:.0f} % | {r['step_s']:.2f} |")
        lines.append("")
    q = root / "quality.json"
    if q.is_file():
        d = json.loads(q.read_text())
        a = d["args"]
        lines += [f"## What it learns and what it keeps (testbed, `diffplug finetune sft --data {a['data']}`, "
                  f"{a['steps']} steps, batch {a['batch']})", "",
                  f"Target: FID/KID (testbed-classifier features) of one sample per caption of the first "
                  f"{a['target_images']} target images against those images, and the testbed scorer's cosine to the caption. Kept: FID of "
                  f"{a['base_images']} Fashion-MNIST samples (10 class prompts) against Fashion-MNIST test images and the "
                  "classifier's top-1 on the prompted class. CFG 4, DDIM 20, the same seeds for every model.", "",
                  "Kept, image by image against the base model's samples of the same seeds "
                  "(`diffplug.evals.compare.tuned_vs_base`): the independent judge (`testbed.load_judge()`), "
                  "Laplacian sharpness (paired gains, z in paired s.e.) and FID; sft optimises no reward, so no "
                  "reward-hacking verdict applies.", "",
                  "| model | target FID | target KID | target alignment | base FID | base alignment | "
                  + " | ".join(f"kept: {h}" for h in BLOCK_HEADER[:4]) + " | train s | final loss | file KiB |",
                  "|---|---|---|---|---|---|" + "---|" * 4 + "---|---|---|"]
        for name, r in d["results"].items():
            kept = r.get("kept_cells", ["judge not measured"] * 4)
            lines.append(f"| {name} | {r['fid_target']:.2f} | {r['kid_target']:.4f} | {r['align_target']:.3f} | "
                         f"{r['fid_base']:.2f} | {100 * r['align_base']:.1f} % | " + " | ".join(kept) + f" | "
                         f"{r['train_s']:.0f} | {r.get('final_loss') or 0:.4f} | {r.get('file_bytes', 0) / 1024:,.0f} |")
        lines.append("")
    Path(args.results).write_text("\n".join(lines + [args.notes or ""]).rstrip() + "\n")
    print(Path(args.results).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("memory", "quality", "report"))
    p.add_argument("--model", default="testbed", choices=("testbed", "sd15"))
    p.add_argument("--out", default="runs/sara")
    p.add_argument("--data", default="testbed:emoji-heldout")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base_images", type=int, default=200)
    p.add_argument("--target_images", type=int, default=400, help="quality: the first N target images and captions")
    p.add_argument("--only", nargs="*", default=[], help="quality: run names to train (default: all)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    p.add_argument("--results", default=str(HERE / "sara_results.md"), help="report: the file written")
    p.add_argument("--notes", default="", help="report: a paragraph appended under the tables")
    args = p.parse_args()
    {"memory": memory, "quality": quality, "report": report}[args.what](args)


if __name__ == "__main__":
    main()
