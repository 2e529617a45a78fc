"""APG vs CFG across guidance scales, and AG / LinearAG / fixed cut-off vs CFG, on the testbed.

    nice -n 10 python benchmarks/guidance_quality.py --images 48 --steps 20 \
        --out benchmarks/guidance_results.md

Model: ``diffplug.testbed.load("sd")`` (``--model dit`` for the PixArt-style one, ``--model flux`` for the
rectified-flow transformer: FluxPipeline, FlowMatchEuler, true CFG against the empty negative prompt,
``max_sequence_length=pipe.tokenizer_2.model_max_length``; ``--weights DIR`` for weights other than the
shipped ones, ``--in-progress`` labels a model still training; the reference text-to-image model trained on Fashion-MNIST
and Google emoji, 32x32 RGB); if it cannot be loaded the script falls back to the tiny *random*
pipeline of ``diffplug.testing`` and says so in the table header (numbers are then only a smoke test).

Prompts: half Fashion-MNIST class prompts, half held-out emoji captions (colour), each with its
class label for the testbed classifier. Every configuration renders the same prompts from the same
seeds (batch b uses ``torch.Generator().manual_seed(seed + b)``).

Metrics (all from ``diffplug.evals`` / ``diffplug.testbed``):
* saturation: mean HSV saturation (evals.saturation) over the emoji images, and the real emoji's;
* gray clip: fraction of luma pixels at white/black (evals.gray_contrast) over the Fashion images;
* align: testbed classifier accuracy on the prompt's class (alignment);
* FID, precision, recall (k = 3): against the real test images of the same prompts, on the testbed
  classifier's pooled features (``--features testbed``, default) or the Inception (``inception``);
  small samples bias FID upwards: compare rows, not with published values;
* NFE/img (network evaluations per image, the loop's count), denoiser CPU s (process CPU time spent
  inside the UNet/transformer forward, 1 thread: the shared machine makes wall time meaningless, and
  text encoding / VAE decoding, identical for every method, are left out), PSNR to the CFG image from the same seed (dB, images in [0, 1]).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import sys
import time

import torch

from diffplug.evals import gray_contrast, psnr, saturation
from diffplug.guidance import APG, CFG, AdaptiveGuidance, LinearAG, calibrate
from diffplug.pipelines import from_pipe


# ----------------------------------------------------------------------------------------- setup
def load_model(name: str = "sd", weights: str | None = None):
    if weights is not None:  # a weights folder was asked for: no fallback, a clear error
        from dc_solver_mse import load_model as load_testbed

        import diffplug.testbed as testbed

        pipe = load_testbed(f"testbed-{name}", "cpu", weights)
        return pipe, testbed.load_classifier(), f"testbed `{name}` (diffplug.testbed.load({name!r}, weights={weights!r}))"
    try:
        import diffplug.testbed as testbed

        if name == "tiny":
            raise RuntimeError("--model tiny asked for")
        pipe = testbed.load(name)
        classifier = testbed.load_classifier() if hasattr(testbed, "load_classifier") else None
        return pipe, classifier, f"testbed `{name}` (diffplug.testbed.load({name!r}))"
    except Exception as err:  # noqa: BLE001 - report and fall back
        from diffplug.testing import tiny_pipeline

        print(f"testbed not available ({type(err).__name__}: {err}); using tiny random pipeline", file=sys.stderr)
        return tiny_pipeline("sd"), None, f"TINY RANDOM pipeline (testbed unavailable: {type(err).__name__})"


def prompt_set(n: int, seed: int = 0):
    """``n`` (prompt, label, real image or None) triples: half Fashion-MNIST, half held-out emoji."""
    from diffplug.testbed import data as D

    items = []
    g = torch.Generator().manual_seed(seed)
    try:
        fashion = D.fashion_mnist("test")
    except Exception:  # noqa: BLE001
        fashion = None
    try:
        emoji = D.emoji("test")
    except Exception:  # noqa: BLE001
        emoji = None
    n_emoji = n // 2 if emoji is not None else 0
    n_fashion = n - n_emoji
    for i in range(n_fashion):
        c = i % len(D.FASHION_CLASSES)
        real = None
        if fashion is not None:
            idx = (fashion.labels == c).nonzero().flatten()
            real = fashion.images[idx[torch.randint(len(idx), (1,), generator=g)]][0]
        items.append((D.prompt_for_class(c), c, real))
    if n_emoji:
        pick = torch.randperm(len(emoji), generator=g)[:n_emoji].tolist()
        for i in pick:
            items.append((emoji.captions[i][0], int(emoji.labels[i]), emoji.images[i]))
    return items


def call_kwargs(pipe, prompts) -> dict:
    """What a diffplug run of ``prompts`` passes beside them: on Flux the trained text length and the empty
    negative prompt of true CFG (stated, not left to the family's default); {} elsewhere."""
    from dc_solver_mse import text_kwargs

    extra = text_kwargs(pipe)
    if extra:
        extra["negative_prompt"] = ""  # one per prompt (the family repeats it)
    return extra


def render(pipe, guidance, prompts, steps, seed, batch):
    """-> (images, NFE per image, CPU seconds in the denoiser's forward)."""
    from diffplug.pipelines.families import _second_pass

    run = from_pipe(pipe, guidance=guidance)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    clock = {"t": 0.0, "start": 0.0}
    pre = denoiser.register_forward_pre_hook(lambda *_: clock.update(start=time.process_time()))
    post = denoiser.register_forward_hook(lambda *_: clock.update(t=clock["t"] + time.process_time() - clock["start"]))
    images, nfe = [], 0
    try:
        for b in range(0, len(prompts), batch):
            chunk = prompts[b : b + batch]
            extra = call_kwargs(pipe, chunk)
            if not _second_pass(guidance):  # w = 1: one pass, no negative prompt to pass
                extra.pop("negative_prompt", None)
            out = run(chunk, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + b // batch),
                      output_type="pt", **extra)
            images.append(out.images.float().cpu())
            nfe += out.nfe * len(chunk)
    finally:
        pre.remove()
        post.remove()
    return torch.cat(images), nfe / len(prompts), clock["t"]


class Scorer:
    def __init__(self, items, classifier, features: str):
        self.labels = torch.tensor([lab for _, lab, _ in items])
        self.is_emoji = self.labels >= 10
        self.classifier = classifier
        self.real = None
        if all(r is not None for _, _, r in items):
            self.real = torch.stack([r for _, _, r in items]).float() / 255
        self.net = None
        if features != "none" and self.real is not None:
            try:
                from diffplug.evals import get_feature_network

                self.net = get_feature_network(features)
                self.real_features = self.featurise(self.real)
            except Exception as err:  # noqa: BLE001
                print(f"features {features!r} unavailable ({err}); no FID/recall", file=sys.stderr)
                self.net = None

    @torch.no_grad()
    def featurise(self, images):
        return torch.cat([self.net(images[i : i + 64]) for i in range(0, len(images), 64)]).double()

    def __call__(self, images, ref=None):
        row = {}
        if self.is_emoji.any():
            row["sat"] = float(saturation(images[self.is_emoji]).mean())
        fashion = ~self.is_emoji
        if fashion.any():
            stats = gray_contrast(images[fashion])
            row["clip"] = float((stats["clip_white"] + stats["clip_black"]).mean())
        if self.classifier is not None:
            with torch.no_grad():
                pred = self.classifier(images).argmax(1)
            row["correct"] = (pred == self.labels).float()  # per image: paired comparisons (align_vs)
            row["align"] = float(row["correct"].mean())
        if ref is not None:
            p = psnr(images, ref)
            row["psnr"] = float(p[torch.isfinite(p)].mean()) if torch.isfinite(p).any() else math.inf
        if self.net is not None:
            from diffplug.evals import fid_from_features, precision_recall

            fake = self.featurise(images)
            row["fid"] = float(fid_from_features(self.real_features, fake))
            row["precision"], row["recall"] = (float(v) for v in precision_recall(self.real_features, fake))
        return row


def align_vs(row, ref_row) -> str:
    """Alignment gain over the reference row, image by image from the same seeds: paired s.e. (headline),
    two-sample s.e. beside it (diffplug.evals.stats.gain)."""
    from diffplug.evals.stats import gain

    if "correct" not in row or "correct" not in ref_row or row is ref_row or math.isinf(row.get("psnr", 0.0)):
        return "–"
    g = gain(ref_row["correct"], row["correct"], "align")
    return f"{g.gain:+.3f} ± {g.paired_se:.3f} (two-sample ± {g.two_sample_se:.3f})"


def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞ (identical)"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def x0_norms(pipe, prompts, steps, scale, seed):
    """Median per-sample ‖D_c − D_u‖ under CFG: the natural scale for APG's r on this model."""

    class Probe(APG):
        def forward(self, pred_cond, pred_uncond=None):
            if pred_uncond is not None and self._context is not None:
                d = self._context.to_x0(pred_cond.float()) - self._context.to_x0(pred_uncond.float())
                self.norms.append(d.flatten(1).norm(dim=1))
            if pred_uncond is None:
                return self.output(pred_cond, pred_cond)
            return self.output(pred_uncond + self.guidance_scale * (pred_cond - pred_uncond), pred_cond, pred_uncond)

    probe = Probe(scale, eta=1.0, norm_threshold=0.0, momentum=0.0)
    probe.norms = []
    from_pipe(pipe, guidance=probe)(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                                    output_type="latent", **call_kwargs(pipe, prompts))
    return float(torch.cat(probe.norms).median())


def ag_defaults(pipe, prompts, score, args) -> list[str]:
    """``AdaptiveGuidance()``'s defaults vs CFG at the same scale, and the earlier defaults (γ̄ = 0.99 on ε)."""
    w, n = args.ag_scale, args.steps
    ref_images, ref_nfe, ref_wall = render(pipe, CFG(w), prompts, n, args.seed, args.batch)
    lines = [f"### `AdaptiveGuidance()` defaults vs CFG (w = {w:g}, {n} steps, policy per_sample)", "",
             "| method | NFE/img | saved | denoiser CPU s | PSNR to CFG (dB) | align | FID | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    configs = [("CFG", None),
               ("AG defaults: γ̄ = 0.999, x0 space", AdaptiveGuidance(w, policy="per_sample")),
               ("AG earlier defaults: γ̄ = 0.99, ε (model_output)",
                AdaptiveGuidance(w, 0.99, policy="per_sample", space="model_output"))]
    for name, guidance in configs:
        if guidance is None:
            nfe, wall, row = ref_nfe, ref_wall, dict(score(ref_images), psnr=math.inf)
        else:
            images, nfe, wall = render(pipe, guidance, prompts, n, args.seed, args.batch)
            row = score(images, ref_images)
        lines.append(f"| {name} | {nfe:g} | {100 * (1 - nfe / ref_nfe):.1f} % | {wall:.1f} | {fmt(row.get('psnr'), 1)} | "
                     f"{fmt(row.get('align'))} | {fmt(row.get('fid'), 2)} | {fmt(row.get('precision'), 2)} | "
                     f"{fmt(row.get('recall'), 2)} |")
        print(lines[-1], flush=True)
    return lines + [""]


# ------------------------------------------------------------------------------------------ main
def emit(lines: list[str], out: str | None) -> None:
    """Print a results table and append it to ``out`` when given (the flow benchmarks share this)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd", choices=["sd", "dit", "flux", "tiny"],
                   help="testbed model (flux: the rectified-flow transformer; tiny: random test pipeline)")
    p.add_argument("--weights", default=None, help="the testbed model's weights folder (default: the shipped ones)")
    p.add_argument("--in-progress", action="store_true", help="label the numbers: the model is still training")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scales", type=float, nargs="+", default=[3.0, 7.5, 12.0, 20.0])
    p.add_argument("--ag-scale", type=float, default=7.5)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.995, 0.999])
    p.add_argument("--features", default="testbed", help="feature network for FID/precision/recall: testbed "
                   "(the testbed classifier's pooled features, cheap), inception (slow on CPU) or none")
    p.add_argument("--only", choices=["all", "ag-defaults"], default="all",
                   help="ag-defaults: only AdaptiveGuidance() (today's defaults) and the earlier defaults vs CFG")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe, classifier, model_name = load_model(args.model, args.weights)
    if args.in_progress:
        model_name += " (TRAINING IN PROGRESS: provisional numbers)"
    call = call_kwargs(pipe, [])  # Flux: max_sequence_length and the empty negative prompt; {} elsewhere
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    items = prompt_set(args.images, args.seed)
    prompts = [q for q, _, _ in items]
    score = Scorer(items, classifier, args.features)
    lines = [
        f"## Guidance on {model_name}",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} CPU, {args.threads} threads "
        f"(shared 2-core machine), torch {torch.__version__}; {len(prompts)} prompts "
        f"({int(score.is_emoji.sum())} emoji, {int((~score.is_emoji).sum())} Fashion-MNIST), {args.steps} steps, "
        f"scheduler {type(pipe.scheduler).__name__}.",
        "",
        f"Command: `python benchmarks/guidance_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    if score.real is not None:
        real = score(score.real)
        lines.append(f"Real test images of the same prompts: saturation {fmt(real.get('sat'))}, "
                     f"gray clip {fmt(real.get('clip'))}, align {fmt(real.get('align'))}. "
                     f"FID features: {args.features}.")
        lines.append("")

    if args.only == "ag-defaults":
        lines += ag_defaults(pipe, prompts, score, args)
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")
        return

    # -- APG vs CFG -----------------------------------------------------------------------------
    r = x0_norms(pipe, prompts[: args.batch], args.steps, 7.5, args.seed)
    lines += [
        "### APG vs CFG",
        "",
        f"APG: η = 0, β = −0.5, r = {r:.2f} (the median ‖D_c − D_u‖ in x0 space under CFG at w = 7.5 on these "
        "prompts; the paper tunes r per model). `APG model-output` is the same settings applied to ε, as "
        "diffusers' guider does.",
        "",
        "align − CFG: the gain over CFG at the same w, image by image (± paired s.e.; two-sample beside it).",
        "",
        "| w | method | saturation (emoji) | gray clip (fashion) | align | align − CFG | FID | precision | recall | NFE/img | denoiser CPU s |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for w in args.scales:
        cfg_row = None
        for name, guidance in (
            ("CFG", CFG(w)),
            ("APG (x0, paper)", APG(w, eta=0.0, norm_threshold=r, momentum=-0.5)),
            ("APG model-output", APG(w, eta=0.0, norm_threshold=r, momentum=-0.5, space="model_output")),
        ):
            images, nfe, wall = render(pipe, guidance, prompts, args.steps, args.seed, args.batch)
            row = score(images)
            cfg_row = cfg_row or row
            lines.append(f"| {w:g} | {name} | {fmt(row.get('sat'))} | {fmt(row.get('clip'))} | {fmt(row.get('align'))} | "
                         f"{align_vs(row, cfg_row)} | {fmt(row.get('fid'), 2)} | {fmt(row.get('precision'), 2)} | {fmt(row.get('recall'), 2)} | "
                         f"{nfe:g} | {wall:.1f} |")
            print(lines[-1], flush=True)

    # -- AG / LinearAG / cut-off vs CFG -----------------------------------------------------------
    w, n = args.ag_scale, args.steps
    lines += ["", f"### Adaptive Guidance vs CFG vs fixed cut-off (w = {w:g}, {n} steps)", "",
              "Calibration (`diffplug.guidance.calibrate`, one CFG run per space): threshold → mean switch step, "
              "images that never switch, NFE saving (per-sample policy). γ on the raw ε (`model_output`, the "
              "paper's statistic) and on the denoised predictions (`x0`).", "",
              "| space | γ̄ | mean switch step | never switch | saving |", "|---|---:|---:|---:|---:|"]
    grid = sorted(set(args.thresholds) | {0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999})
    cals = {}
    for space in ("model_output", "x0"):
        cals[space] = calibrate(pipe, prompts, thresholds=grid, guidance_scale=w, num_inference_steps=n,
                                seed=args.seed, batch_size=args.batch, space=space, **call)
        for c in cals[space]:
            ks = [k for k in c.switch_steps if k is not None]
            lines.append(f"| {space} | {c.threshold:g} | {fmt(sum(ks) / len(ks), 1) if ks else '–'} | "
                         f"{sum(k is None for k in c.switch_steps)} | {100 * c.saving:.1f} % |")
    for space in ("model_output", "x0"):
        gam = cals[space][0].gammas
        lines += ["", f"Mean γ_t per step under CFG ({space}): " + ", ".join(f"{v:.4f}" for v in gam.nanmean(1).tolist())]
    lines.append("")

    ref_images, ref_nfe, ref_wall = render(pipe, CFG(w), prompts, n, args.seed, args.batch)
    ref_row = score(ref_images)
    fit_prompts = [q for q, _, _ in prompt_set(args.images, args.seed + 1)][: max(8, args.images // 2)]
    near = lambda target: min(cals["x0"], key=lambda c: abs(c.saving - target))  # noqa: E731
    picks = sorted({near(0.2).threshold, near(0.3).threshold})
    lag = LinearAG.fit_from_pipe(pipe, fit_prompts, guidance_scale=w, num_inference_steps=n, seed=args.seed + 100,
                                 batch_size=args.batch, call_kwargs=call)
    configs = [("CFG", CFG(w))]
    configs += [("AG ε-space γ̄=0.999 (paper statistic)", AdaptiveGuidance(w, 0.999, policy="per_sample", space="model_output"))]
    configs += [(f"AG x0-space γ̄={t:g}", AdaptiveGuidance(w, t, policy="per_sample", space="x0")) for t in picks]
    configs += [(f"CFG cut-off stop={f:g}", CFG(w, stop=f)) for f in (0.5, 0.75)]
    configs += [("LinearAG (odd steps of 1st half)", lag),
                (f"LinearAG + AG x0 γ̄={picks[-1]:g}", lag.new(threshold=picks[-1], space="x0"))]
    lines += ["| method | NFE/img | saved | denoiser CPU s | PSNR to CFG (dB) | saturation | gray clip | align | "
              "align − CFG | FID |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    held = []  # (saving, name): rows whose alignment is within one paired s.e. of CFG's
    for name, guidance in configs:
        if name == "CFG":
            images, nfe, wall, row = ref_images, ref_nfe, ref_wall, dict(ref_row, psnr=math.inf)
        else:
            images, nfe, wall = render(pipe, guidance, prompts, n, args.seed, args.batch)
            row = score(images, ref_images)
        lines.append(f"| {name} | {nfe:g} | {100 * (1 - nfe / ref_nfe):.1f} % | {wall:.1f} | {fmt(row.get('psnr'), 1)} | "
                     f"{fmt(row.get('sat'))} | {fmt(row.get('clip'))} | {fmt(row.get('align'))} | {align_vs(row, ref_row)} | "
                     f"{fmt(row.get('fid'), 2)} |")
        print(lines[-1], flush=True)
        if "AG" in name and "correct" in row:  # AG and LinearAG rows (not the fixed cut-off)
            from diffplug.evals.stats import gain

            g = gain(ref_row["correct"], row["correct"], "align")
            if not g.gain < -g.paired_se:  # nan s.e. (identical images) counts as held
                held.append((1 - nfe / ref_nfe, name))
    if held:
        saving, name = max(held)
        lines += ["", f"At CFG's alignment (within one paired s.e.): AG's largest share of network calls saved is "
                  f"{100 * saving:.1f} % ({name})."]
    res = ", ".join(f"step {i}: {v:.3f}" for i, v in sorted(lag.fit_residuals.items()))
    lines += ["", f"LinearAG least-squares fit on {len(fit_prompts)} other prompts; relative residual "
              f"‖ε_u − ε̂_u‖/‖ε_u‖ per replaced step: {res}.", ""]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
