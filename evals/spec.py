"""Generation-spec mode of ``diffplug eval``: generate with each method over a parameter sweep, from
the same noise, then score every run against one reference. A spec (YAML or JSON):

.. code-block:: yaml

    model: testbed                 # see `diffplug sample --help`: testbed, tiny-sd, a local folder
    scheduler: ddim                # optional (default: the model's own); scheduler_options: {...}
    steps: 30
    prompts: [a photo of a sneaker, a photo of a bag]   # or  prompts_file: prompts.txt
    images_per_prompt: 8
    seed: 0                        # image i always starts from the noise of seed + i
    methods:                       # one curve per method in the report
      - {name: CFG, guidance: cfg}
      - {name: APG, guidance: apg, options: {eta: 0.0}}
      - {name: DC, guidance: cfg, scheduler: dc-solver, scheduler_options: {dc_ratios: cpr}}
    sweep: {guidance_scale: [1.0, 3.0, 5.0, 7.5]}      # one parameter, passed to the guidance;
                                   # or {steps: [5, 10]} to sweep the number of inference steps
    reference: fashion-mnist:test  # optional; needed for fid/kid/precision/recall
    metrics: [fid, kid, precision, recall, clip, saturation, contrast, accuracy]
    accuracy_reference: {scheduler: ddim, steps: 200}   # "accuracy": MSE/PSNR to this run, same noise
    clip_scorer: testbed           # or {scorer: transformers, path: /local/clip}
    features: inception            # protocol: clean
    batch_size: 16

Outputs: ``OUT/images/<method>/<param>=<value>/NNN.png``, ``OUT/metrics.json`` (``runs``: one record
per method and value, plus ``protocol`` and the spec), ``OUT/report.html`` (metric-vs-parameter
curves, one per method, and a grid per run) and, with fid/kid/precision/recall, each run's features
(``OUT/features/<method>_<param>=<value>.safetensors``, :func:`features_path`; what
``benchmarks/fid_paired.py`` reads to give FID differences a paired s.e.).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from .. import atomic

METHOD_KEYS = {"name", "guidance", "options", "scheduler", "scheduler_options"}
SPEC_METRICS = ("fid", "kid", "precision", "recall", "clip", "saturation", "contrast", "accuracy")


def images_path(out: Path, method: str, param: str, value) -> Path:
    """The folder of a run's images: one per method and sweep value."""
    return Path(out) / "images" / method / f"{param}={value}"


def features_path(out: Path, method: str, param: str, value) -> Path:
    """Where a run's features are kept: one file per method and sweep value, a file-system-safe name."""
    return Path(out) / "features" / (re.sub(r"[^\w.=-]+", "_", f"{method}_{param}={value}") + ".safetensors")


def load_spec(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--spec {path}: no such file")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    if not isinstance(spec, dict):
        raise ValueError(f"--spec {path}: expected a mapping of settings")
    return spec


def _prompts(spec: dict, base: Path) -> list[str]:
    prompts = list(spec.get("prompts") or [])
    if spec.get("prompts_file"):
        f = Path(spec["prompts_file"])
        f = f if f.is_absolute() else base / f
        prompts += [line.strip() for line in f.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("spec: give 'prompts' (a list) or 'prompts_file'")
    return prompts


@torch.no_grad()
def _generate(pipe, guidance, prompts, per_prompt, seed, steps, batch, height=None, width=None):
    """-> (uint8 images (N, 3, H, W), final latents, float images in [0, 1], flat prompts).

    Image i of the run starts from the noise of ``seed + i``, whatever the method or scale."""
    from diffplug.pipelines import from_pipe

    run = from_pipe(pipe, guidance=guidance)
    flat = [p for p in prompts for _ in range(per_prompt)]
    lat, img = [], []
    for i in range(0, len(flat), batch):
        chunk = flat[i:i + batch]
        gens = [torch.Generator(pipe.device).manual_seed(seed + i + j) for j in range(len(chunk))]
        res = run(chunk, num_inference_steps=steps, generator=gens, output_type="latent", height=height,
                  width=width)
        lat.append(res.images)
        img.append(run.family.decode(res.images, "pt")[0].float().clamp(0, 1).cpu())
    images = torch.cat(img)
    return (images * 255).round().to(torch.uint8), torch.cat(lat), images, flat


@torch.no_grad()
def run_spec(spec: dict, out: Path, device, progress: bool = True, base: Path = Path(".")) -> dict:
    from diffplug.pipelines.registry import load_pipeline, make_guidance, make_scheduler

    from .accuracy import trajectory_error
    from .clip_score import get_clip_scorer
    from .features import get_feature_network
    from .fid import FrechetInceptionDistance, stats_from_sums
    from .image_stats import gray_contrast, saturation
    from .kid import kernel_inception_distance
    from .precision_recall import precision_recall
    from .reference import reference_stats
    from .report import image_grid_uri, svg_lines, write_report

    metrics = list(spec.get("metrics", ["fid", "clip", "saturation"]))
    bad = [m for m in metrics if m not in SPEC_METRICS]
    if bad:
        raise ValueError(f"spec metrics: unknown {bad}; choose from {SPEC_METRICS}")
    need_net = any(m in metrics for m in ("fid", "kid", "precision", "recall"))
    if need_net and not spec.get("reference"):
        raise ValueError("spec: fid/kid/precision/recall need 'reference' (a folder or fashion-mnist:test)")
    prompts = _prompts(spec, base)
    per_prompt, seed = int(spec.get("images_per_prompt", 4)), int(spec.get("seed", 0))
    steps, batch = int(spec.get("steps", 30)), int(spec.get("batch_size", 16))
    methods = spec.get("methods") or [{"name": "cfg", "guidance": "cfg"}]
    for m in methods:
        unknown = set(m) - METHOD_KEYS
        if unknown:
            raise ValueError(f"spec methods: unknown key(s) {sorted(unknown)} in {m}; allowed: {sorted(METHOD_KEYS)}")
    sweep = spec.get("sweep") or {"guidance_scale": [spec.get("guidance_scale", 7.5)]}
    if len(sweep) != 1:
        raise ValueError(f"spec sweep: one parameter at a time, got {list(sweep)}")
    (param, values), = sweep.items()

    pipe = load_pipeline(spec.get("model"), str(device), spec.get("dtype"))
    pipe.set_progress_bar_config(disable=True)
    if spec.get("scheduler"):
        pipe.scheduler = make_scheduler(spec["scheduler"], pipe, **(spec.get("scheduler_options") or {}))
    net, ref = None, None
    if need_net:
        net = get_feature_network(spec.get("features", "inception"), spec.get("protocol", "clean")).to(device)
        ref = reference_stats(spec["reference"], net, need_features=True, batch_size=batch,
                              limit=spec.get("reference_limit"), device=device, progress=progress)
        ref_mu, ref_sigma = stats_from_sums(ref["sum"].to(device), ref["outer"].to(device), int(ref["n"]))
    if "accuracy" in metrics:
        acc = spec.get("accuracy_reference") or {"scheduler": "ddim", "steps": 200}
        acc_scheduler = make_scheduler(acc["scheduler"], pipe, **(acc.get("options") or {}))
        acc_steps = int(acc["steps"])
    scorer = None
    if "clip" in metrics:
        cs = spec.get("clip_scorer", "testbed")
        scorer = get_clip_scorer(**cs) if isinstance(cs, dict) else get_clip_scorer(cs)

    runs, grids = [], {}
    from tqdm.auto import tqdm

    base_scheduler = pipe.scheduler
    todo = [(m, v) for m in methods for v in values]
    for method, value in tqdm(todo, desc="runs", disable=not progress):
        guidance_name = method.get("guidance", "cfg")
        name = method.get("name", method.get("scheduler", guidance_name))
        options = dict(method.get("options") or {})
        run_steps = steps
        if param == "steps":  # the sweep is over the number of inference steps, not a guidance option
            run_steps = int(value)
        else:
            options[param] = value
        guidance = make_guidance(guidance_name, **options)
        pipe.scheduler = base_scheduler
        if method.get("scheduler"):  # a per-method scheduler, swapped from the run's own config
            pipe.scheduler = make_scheduler(method["scheduler"], pipe, **(method.get("scheduler_options") or {}))
        t0 = time.perf_counter()
        images, latents, images_f, flat = _generate(pipe, guidance, prompts, per_prompt, seed, run_steps, batch,
                                                    spec.get("height"), spec.get("width"))
        rec = {"method": name, "guidance": guidance_name, param: value, "options": options,
               "scheduler": type(pipe.scheduler).__name__, "steps": run_steps,
               "n": len(images), "generate_seconds": round(time.perf_counter() - t0, 3)}
        folder = images_path(out, name, param, value)
        folder.mkdir(parents=True, exist_ok=True)
        from PIL import Image
        for i, im in enumerate(images):
            atomic.save_image(Image.fromarray(im.permute(1, 2, 0).numpy()), folder / f"{i:04d}.png")
        if need_net:
            feats = torch.cat([net(images[i:i + batch].to(device)) for i in range(0, len(images), batch)])
            kept = features_path(out, name, param, value)
            kept.parent.mkdir(parents=True, exist_ok=True)
            atomic.save_safetensors({"features": feats.float().cpu().contiguous()}, kept)
            if "fid" in metrics:
                fid = FrechetInceptionDistance(features=None, num_features=feats.shape[1],
                                               sync_on_compute=False).to(device)
                fid.load_reference(ref_mu, ref_sigma, int(ref["n"]))
                fid.update(features=feats, real=False)
                rec["fid"] = float(fid.compute())
            real = ref["features"].to(device)
            if "kid" in metrics:
                rec["kid"] = float(kernel_inception_distance(feats, real, subset_size=None)[0])
            if ("precision" in metrics or "recall" in metrics) and len(feats) > 3:  # k = 3 neighbours
                p, r = precision_recall(real, feats)
                rec["precision"], rec["recall"] = float(p), float(r)
        if scorer is not None:
            cos = torch.cat([torch.as_tensor(scorer(images[i:i + batch].to(device), flat[i:i + batch])).float().cpu()
                             for i in range(0, len(images), batch)])
            rec["clip"] = float((100 * cos.clamp(min=0)).mean())
            rec["clip_cosine"] = float(cos.mean())
        if "accuracy" in metrics:  # the same guidance and noise through the reference sampler
            own = pipe.scheduler
            pipe.scheduler = acc_scheduler
            try:
                _, ref_lat, ref_img, _ = _generate(pipe, guidance, prompts, per_prompt, seed, acc_steps, batch,
                                                   spec.get("height"), spec.get("width"))
            finally:
                pipe.scheduler = own
            rec["latent_mse"] = float(trajectory_error(latents, ref_lat)["mse"])
            err = trajectory_error(images_f, ref_img, data_range=1.0)
            rec["image_mse"], rec["image_psnr"] = float(err["mse"]), float(err["psnr"])
        if "saturation" in metrics:
            rec["saturation"] = float(saturation(images).mean())
        if "contrast" in metrics:
            rec.update({k: float(v.mean()) for k, v in gray_contrast(images).items()})
        runs.append(rec)
        grids[f"{name}, {param}={value}"] = image_grid_uri(images[:16], nrow=8)

    protocol = {"sweep": param, "steps": steps if param != "steps" else values, "seed": f"image i starts from seed {seed} + i in every run",
                "clip": "100 * max(cos, 0) per image, averaged" if scorer is not None else None,
                "saturation": "mean HSV saturation" if "saturation" in metrics else None,
                "accuracy": (f"MSE of final latents / MSE, PSNR of [0,1] images vs {acc['scheduler']} with "
                             f"{acc_steps} steps, same guidance and noise") if "accuracy" in metrics else None}
    if net is not None:
        protocol.update(net.describe())
        protocol["reference"] = ref.get("dataset")
        protocol["n_reference"] = int(ref["n"])
    result = {"runs": runs, "protocol": protocol, "spec": spec, "device": str(device)}
    atomic.write_text(out / "metrics.json", json.dumps(result, indent=2, default=str))  # never partial

    plots = []
    for key in [m for m in ("fid", "kid", "precision", "recall", "clip", "saturation", "contrast", "clip_white",
                            "latent_mse", "image_psnr")
                if any(m in r for r in runs)]:
        series = {}
        for r in runs:
            series.setdefault(r["method"], ([], []))
            series[r["method"]][0].append(float(r[param]))
            series[r["method"]][1].append(float(r[key]))
        plots.append((f"{key} vs {param}", svg_lines(series, key, param, key)))
    info = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in protocol.items() if v is not None}
    info.update({"model": spec.get("model", "testbed"), "prompts": len(prompts),
                 "images per run": len(prompts) * per_prompt})
    best = {}
    for key, better in (("fid", min), ("clip", max)):
        vals = [r[key] for r in runs if key in r]
        if vals:
            best[f"best {key}"] = better(vals)
    write_report(out / "report.html", f"diffplug eval: {param} sweep", {**best, "runs": runs}, info, grids, plots)
    return result
