"""FKC on the testbed (CPU): FKC-CFG vs CFG at the same guidance scale, and a product of two prompts
vs summed guidance, with the cost in network evaluations (NFE) and wall time per output image.

    python benchmarks/fkc_bench.py --out benchmarks/fkc_results.md

Measures, per method, on ``diffplug.testbed.load("sd")`` (DDIM schedule, ``--steps`` steps):

* CFG table, the ten Fashion-MNIST class prompts: classifier alignment (top-1 = the prompt's class),
  the classifier's probability of that class, the scorer's cosine similarity to the prompt.
  Methods: CFG (DDIM, eta 0; and with K x more steps, the same NFE as FKC), CFG ancestral (eta 1: FKC's move without weights), CFG best-of-K
  (the scorer picks one of K ancestral samples: it selects with an evaluation metric, an upper
  reference), FKC-CFG with K particles (unclamped, ESS-triggered systematic resampling) and the
  official image code's setting (clamp 2, resampling every step).
* Product table, pairs of class prompts A x B: summed guidance ``ε_u + w(ε_A − ε_u) + w(ε_B − ε_u)``
  (DDIM eta 0 and ancestral) vs FKC on the geometric mixture ``q_u^{1−2w} q_A^w q_B^w``:
  the classifier's mass on {A, B} and min(p_A, p_B), both prompts among the scorer's top 3 of the
  ten class prompts, min of the two cosine similarities. ``--two-models``: also B on the testbed DiT
  (``ProductGuidance(second_model=dit)``: two networks sharing the VAE latent space).

FKC's chosen image per group is ``output.chosen`` (drawn ∝ final weights).

``--model flux``: the rectified-flow testbed (FluxPipeline, FlowMatchEuler, shift 1; ``--weights DIR``
for unshipped weights, ``--in-progress`` to label them). Its CFG is true CFG against the empty negative
prompt, prompts are encoded at ``max_sequence_length=pipe.tokenizer_2.model_max_length``; the
deterministic rows are FlowMatchEuler (the flow ODE's Euler step), and the "ancestral" rows, which
FlowMatchEuler cannot run (it has no eta), are FKC's own move with weights and resampling off
(``FKCSampler(1, correct=False)``): at Σβ = 1 the same ancestral (DDPM posterior) step.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffplug.evals.stats import mean_se

from diffplug import testbed
from diffplug.guidance import CFG
from diffplug.pipelines import from_pipe
from diffplug.samplers import FKCSampler, ProductGuidance, encode_condition

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guidance_quality import call_kwargs  # noqa: E402  (Flux: max_sequence_length, the empty negative prompt)

PAIRS = [("sneaker", "sandal"), ("t-shirt", "shirt"), ("pullover", "coat"), ("ankle boot", "sneaker"), ("dress", "coat")]


def flow(pipe) -> bool:
    """A flow-matching pipeline whose scheduler has no eta (FlowMatchEuler): ancestral steps come from FKC's move."""
    return "eta" not in __import__("inspect").signature(pipe.scheduler.step).parameters


def labels(pipe) -> tuple[str, str]:
    """Row labels of the deterministic and the ancestral sampler."""
    return ("FlowMatchEuler", "ancestral (FKC move, unweighted)") if flow(pipe) else ("DDIM eta=0", "ancestral (eta=1)")


def ancestral(pipe, sampler, eta):
    """``(sampler, eta)`` for an ancestral (eta = 1) run without FKC weights: the scheduler's eta where it
    has one, else FKC's move uncorrected (one particle per image, no weights, no resampling)."""
    if eta > 0 and flow(pipe):  # the flow pipeline refuses eta: FKC's move is the ancestral step itself
        return (sampler if sampler is not None else FKCSampler(1, correct=False)), 0.0
    return sampler, eta


def generate(pipe, prompt, guidance, sampler, count, steps, seed, eta):
    """``count`` images for ``prompt`` (all particles when ``sampler`` is set) and the run's output."""
    sampler, eta = ancestral(pipe, sampler, eta)
    run = from_pipe(pipe, guidance=guidance, sampler=sampler)
    out = run(
        prompt, num_inference_steps=steps, num_images_per_prompt=count, eta=eta, output_type="pt",
        generator=torch.Generator().manual_seed(seed), **call_kwargs(pipe, []),
    )
    return out.images.float().clamp(0, 1), out


def chosen(pipe, prompts, guidance, sampler, count, steps, seed, eta):
    """A timed ``generate``; with a sampler, only its chosen image per group.
    -> (images, output, seconds, images per prompt)."""
    start = time.perf_counter()
    images, out = generate(pipe, prompts, guidance, sampler, count, steps, seed, eta)
    seconds = time.perf_counter() - start
    sampler, _ = ancestral(pipe, sampler, eta)
    if sampler is None or sampler.num_particles == 1:  # one particle per image: every image is its own
        return images, out, seconds, count
    return images[torch.as_tensor(out.sampler_output.chosen)], out, seconds, count // sampler.num_particles


def cfg_metrics(images, class_index, prompt, classifier, scorer):
    with torch.no_grad():
        probs = classifier(images).softmax(-1)
        sims = scorer(images, [prompt] * len(images))
    return {
        "align": (probs.argmax(-1) == class_index).float(),
        "p_class": probs[:, class_index],
        "sim": sims,
    }


def product_metrics(images, a, b, classifier, scorer, class_prompts):
    ia, ib = testbed.FASHION_CLASSES.index(a), testbed.FASHION_CLASSES.index(b)
    with torch.no_grad():
        probs = classifier(images).softmax(-1)
        sims = scorer.similarity_matrix(images, class_prompts)  # (N, 10)
    top3 = sims.topk(3, dim=-1).indices
    both_top3 = ((top3 == ia).any(-1) & (top3 == ib).any(-1)).float()
    return {
        "p_a_plus_b": probs[:, ia] + probs[:, ib],
        "min_p": torch.minimum(probs[:, ia], probs[:, ib]),
        "both_top3": both_top3,
        "min_sim": torch.minimum(sims[:, ia], sims[:, ib]),
    }


def summarize(name, rows: list[dict], nfe, seconds, n_images, extra=None):
    keys = rows[0].keys()
    cat = {k: torch.cat([r[k] for r in rows]) for k in keys}
    result = {"method": name, "images": n_images, "nfe_per_image": nfe, "seconds_per_image": seconds / n_images}
    for k, v in cat.items():
        m = mean_se(v, k)
        result[k], result[k + "_se"] = m.mean, m.se
    result["per_image"] = {k: v.tolist() for k, v in cat.items()}  # prompt by prompt: paired comparisons
    result.update(extra or {})
    return result


class FID:
    """FID (testbed classifier features) of a set of images against the first ``n_real`` held-out
    Fashion-MNIST test images; the reference is featurised once (and cached by diffplug.evals)."""

    def __init__(self, n_real: int):
        from diffplug.evals import FrechetInceptionDistance, get_feature_network, stats_from_sums
        from diffplug.evals.reference import reference_stats

        self.net = get_feature_network("testbed")
        ref = reference_stats("fashion-mnist:test", self.net, limit=n_real, progress=False)
        self.mu, self.sigma = stats_from_sums(ref["sum"], ref["outer"], int(ref["n"]))
        self.n, self.make = int(ref["n"]), lambda: FrechetInceptionDistance(features=None, num_features=self.net.num_features)

    def __call__(self, images: torch.Tensor) -> float:
        metric = self.make()
        metric.load_reference(self.mu, self.sigma, self.n)
        metric.update(features=self.net(images), real=False)
        return float(metric.compute())


def fkc_extra(outputs):
    s = [o.sampler_output.summary() for o in outputs]
    return {
        "mean_ess": sum(sum(x["ess_trace"]) / len(x["ess_trace"]) for x in s) / len(s),
        "resampling_steps": sum(x["resampling_steps"] for x in s) / len(s),
        "clamped": sum(x["clamped_increments"] for x in s),
    }


def run_cfg_table(pipe, classifier, scorer, args):
    w, steps, n, Ks = args.guidance_scale, args.steps, args.groups, args.particles
    fid = FID(args.fid_reference) if args.fid_reference else None
    prompts = [testbed.prompt_for_class(c) for c in testbed.FASHION_CLASSES[: args.classes]]
    results = []

    def bench(name, make, count, eta, nfe, num_steps=steps, picks=()):
        """One generation run for all prompts; ``picks``: (name, nfe, fn) measured on the same images."""
        names = [(name, nfe, None), *picks]
        guidance, sampler = make()
        images, out, seconds, per_prompt = chosen(pipe, prompts, guidance, sampler, count, num_steps, args.seed, eta)
        for m, cost, fn in names:
            rows, first_n = [], []
            for k, prompt in enumerate(prompts):
                mine = images[k * per_prompt : (k + 1) * per_prompt]
                mine = mine if fn is None else fn(mine, prompt)
                rows.append(cfg_metrics(mine, k, prompt, classifier, scorer))
                first_n.append(mine[:n])  # FID on the same number of images (n per prompt) for every row
            n_images = sum(len(r["sim"]) for r in rows)
            per_image = seconds / len(images) * (cost / nfe)  # best-of-K: K samples' time per image
            extra = fkc_extra([out]) if sampler is not None and sampler.correct else {}
            if fid is not None:
                extra["fid"] = fid(torch.cat(first_n))
            results.append(summarize(m, rows, cost, per_image * n_images, n_images, extra))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "per_image"}), flush=True)

    def best_of(K):
        def pick(images, prompt):
            groups = images[: n * K].view(n, K, *images.shape[1:])
            with torch.no_grad():
                s = scorer(groups.flatten(0, 1), [prompt] * (n * K)).view(n, K)
            return groups[torch.arange(n), s.argmax(1)]

        return (f"CFG best-of-{K} by scorer ({labels(pipe)[1]})", 2 * steps * K, pick)

    K_max = max(Ks)
    ode, anc = labels(pipe)
    bench(f"CFG w={w} ({ode})", lambda: (CFG(w), None), n, 0.0, 2 * steps)
    # Same NFE as FKC with K_max particles, spent on K_max x more DDIM steps instead.
    if args.extras:
        bench(f"CFG w={w} ({ode}), {K_max * steps} steps", lambda: (CFG(w), None), n, 0.0, 2 * steps * K_max, num_steps=steps * K_max)
    # Ancestral CFG, n groups of K_max samples: all of them measure plain ancestral CFG; the scorer's
    # best of the first K of each group gives best-of-K from the same samples.
    bench(f"CFG w={w} {anc}", lambda: (CFG(w), None), n * K_max, 1.0, 2 * steps, picks=[best_of(K) for K in Ks])
    for K in Ks:
        bench(f"FKC-CFG K={K}", lambda K=K: (CFG(w), FKCSampler(K, ess_threshold=0.5)), n * K, 1.0, 2 * steps * K)
    if args.extras:
        bench(
        f"FKC-CFG K={K_max}, clamp 2, resample every step (official)",
        lambda: (CFG(w), FKCSampler(K_max, ess_threshold=1.0, clamp=2.0)), n * K_max, 1.0, 2 * steps * K_max,
    )
    return results


def run_product_table(pipe, classifier, scorer, args):
    w, steps, n, K = args.product_scale, args.steps, args.groups, max(args.particles)
    class_prompts = [testbed.prompt_for_class(c) for c in testbed.FASHION_CLASSES]
    results = []

    def bench(name, make_sampler, count, eta, nfe, second_pipe=None):
        """``second_pipe``: prompt B goes to this second network (sharing the VAE latents) instead."""
        pairs = PAIRS[: args.pairs]
        firsts = [testbed.prompt_for_class(a) for a, _ in pairs]
        seconds_ = [testbed.prompt_for_class(b) for _, b in pairs]
        if second_pipe is None:
            text = {k: v for k, v in call_kwargs(pipe, []).items() if k != "negative_prompt"}
            guidance = ProductGuidance(encode_condition(pipe, seconds_, num_images_per_prompt=count, **text), w, w)
        else:
            second = encode_condition(second_pipe, seconds_, num_images_per_prompt=count, max_sequence_length=20)
            guidance = ProductGuidance(second, w, w, second_model=second_pipe)
        sampler = make_sampler()
        images, out, seconds, per_prompt = chosen(pipe, firsts, guidance, sampler, count, steps, args.seed, eta)
        rows = [
            product_metrics(images[k * per_prompt : (k + 1) * per_prompt], a, b, classifier, scorer, class_prompts)
            for k, (a, b) in enumerate(pairs)
        ]
        extra = fkc_extra([out]) if sampler is not None and sampler.correct else None
        results.append(summarize(name, rows, nfe, seconds, len(images), extra))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "per_image"}), flush=True)

    ode, anc = labels(pipe)
    bench(f"summed guidance w={w}+{w} ({ode})", lambda: None, n, 0.0, 3 * steps)
    bench(f"summed guidance w={w}+{w} {anc}", lambda: None, n * K, 1.0, 3 * steps)
    bench(f"FKC product K={K}", lambda: FKCSampler(K, ess_threshold=0.5), n * K, 1.0, 3 * steps * K)
    if args.two_models:  # B from the testbed DiT: a product of two networks sharing the VAE latent space
        dit = testbed.load("dit")
        bench(f"two models (UNet: A, DiT: B), summed w={w}+{w} ancestral", lambda: None, n * K, 1.0, 3 * steps, dit)
        bench(f"two models (UNet: A, DiT: B), FKC product K={K}", lambda: FKCSampler(K, ess_threshold=0.5),
              n * K, 1.0, 3 * steps * K, dit)
    if args.extras:
        bench(f"FKC product K={K}, clamp 2, every step", lambda: FKCSampler(K, ess_threshold=1.0, clamp=2.0), n * K, 1.0, 3 * steps * K)
    return results


def versus_first(results, key) -> list[str]:
    """Each row's ``key`` minus the first row's, image by image (the same prompts, image i of each): the gain
    ± paired s.e. (two-sample beside it); rows with another number of images per prompt: "–"."""
    from diffplug.evals.stats import gain

    base = results[0]["per_image"][key]
    cells = []
    for r in results:
        mine = r["per_image"][key]
        if r is results[0] or len(mine) != len(base) or len(base) < 2:
            cells.append("–")
            continue
        g = gain(base, mine, key)
        r[key + "_vs_first"] = g.as_dict()
        cells.append(f"{g.gain:+.3f} ± {g.paired_se:.3f} (two-sample ± {g.two_sample_se:.3f})")
    return cells


def table(results, cols, versus=None):
    """``versus``: (label, key): a column of each row's gain over the first row in ``key`` (paired by prompt)."""
    fid = all("fid" in r for r in results)
    gains = versus_first(results, versus[1]) if versus else None
    head = ("| method | images | NFE/image | s/image | " + " | ".join(c for c, _ in cols) + (f" | {versus[0]}" if versus else "")
            + (" | FID |" if fid else " |"))
    lines = [head, "|" + "---|" * (4 + len(cols) + bool(versus) + fid)]
    for i, r in enumerate(results):
        cells = ([f"{r[k]:.3f} ± {r[k + '_se']:.3f}" for _, k in cols] + ([gains[i]] if versus else [])
                 + ([f"{r['fid']:.2f}"] if fid else []))
        lines.append(f"| {r['method']} | {r['images']} | {r['nfe_per_image']} | {r['seconds_per_image']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["sd", "dit", "flux"], default="sd", help="testbed pipeline")
    p.add_argument("--weights", default=None, help="the testbed model's weights folder (default: the shipped ones)")
    p.add_argument("--in-progress", action="store_true", help="label the numbers: the model is still training")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--product-scale", type=float, default=2.0)
    p.add_argument("--groups", type=int, default=4, help="output images per prompt")
    p.add_argument("--particles", type=int, nargs="+", default=[4, 8])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--pairs", type=int, default=len(PAIRS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-extras", dest="extras", action="store_false",
                   help="skip CFG with K x steps and the clamped every-step FKC variants")
    p.add_argument("--two-models", action="store_true",
                   help="product table: also prompt B on the testbed DiT (two networks, one latent space)")
    p.add_argument("--fid-reference", type=int, default=2000,
                   help="held-out Fashion-MNIST images for the CFG table's FID column (testbed features); 0: no FID")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.two_models and args.model != "sd":
        p.error("--two-models puts prompt B on the testbed DiT beside the UNet (VAE latents): --model sd only")
    from dc_solver_mse import load_model

    pipe = load_model(f"testbed-{args.model}" if args.model != "sd" else "testbed", "cpu", args.weights)
    pipe.set_progress_bar_config(disable=True)
    classifier, scorer = testbed.load_classifier().eval(), testbed.load_scorer().eval()
    start = time.perf_counter()
    cfg = run_cfg_table(pipe, classifier, scorer, args)
    product = run_product_table(pipe, classifier, scorer, args) if args.pairs else []
    total = time.perf_counter() - start
    versus_first(cfg, "p_class")  # gains over the first row, paired by prompt (also in the JSON)
    if product:
        versus_first(product, "min_p")
    if args.json:
        args.json.write_text(json.dumps({"cfg": cfg, "product": product, "args": vars(args)}, indent=2, default=str))
    if args.out:
        command = "python benchmarks/fkc_bench.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        report = [
            f"# FKC (Feynman-Kac correctors) on the testbed ({args.model})",
            "",
            f"Device: CPU ({platform.processor() or platform.machine()}, {args.threads} threads); "
            f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; total {total:.0f} s.",
            f"Command: `{command.strip()}`",
            f"Model: `diffplug.testbed.load(\"{args.model}\")`{f' (weights {args.weights})' if args.weights else ''}, "
            f"{type(pipe.scheduler).__name__}, {args.steps} steps; mean ± standard error."
            + (" TRAINING IN PROGRESS: provisional numbers." if args.in_progress else ""),
            "",
            f"## FKC-CFG vs CFG (w = {args.guidance_scale}, {args.classes} class prompts, {args.groups} images each)",
            "",
            table(cfg, [("classifier top-1 = prompt", "align"), ("p(class)", "p_class"), ("scorer sim", "sim")],
                  ("p(class) − first row (same prompts, ± paired s.e.)", "p_class")),
            "",
            *([f"FID: testbed classifier features (diffplug.evals `features=\"testbed\"`) of the first {args.groups} "
               f"images per prompt of each row ({args.groups * args.classes} images) vs the first {args.fid_reference} "
               "Fashion-MNIST test images; small samples, so compare rows, not with other tables.", ""]
              if args.fid_reference else []),
            *([f"## Product of two prompts vs summed guidance (w = {args.product_scale} each, {args.pairs} pairs)",
               "",
               table(product, [("p(A)+p(B)", "p_a_plus_b"), ("min(p(A), p(B))", "min_p"), ("both in scorer top-3", "both_top3"), ("min sim", "min_sim")],
                     ("min(p(A), p(B)) − first row (same pairs, ± paired s.e.)", "min_p")),
               ""] if product else []),
            "FKC extras (mean ESS fraction over steps, resampling steps per run, clamped increments):",
            "",
        ]
        for r in cfg + product:
            if "mean_ess" in r:
                report.append(f"- {r['method']}: mean ESS {r['mean_ess']:.3f}, {r['resampling_steps']:.1f} resampling steps, {r['clamped']} clamped")
        args.out.write_text("\n".join(report) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
