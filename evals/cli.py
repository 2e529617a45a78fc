"""``diffplug eval``: score a folder of generated images against a reference, or with a reward.

    diffplug eval --generated DIR --reference DIR|fashion-mnist:test|stats.safetensors \\
        --metrics fid,kid,precision,recall[,saturation,contrast][,reward:NAME] --out OUT

writes ``OUT/metrics.json`` (every number, plus ``protocol``: feature network, weights, resize
protocol, KID and precision/recall settings) and ``OUT/report.html`` (image grids, a PCA view of the
features, per-image histograms). Reference features are cached (see ``diffplug.evals.reference``).
PNG decoding runs in DataLoader worker processes while the network runs on the device.

``reward:NAME`` (any name of ``diffplug.evals.list_rewards()``, options by ``--reward-opt KEY=VALUE``)
scores each image with its prompt, from ``--prompts FILE`` (JSONL of ``{"file", "prompt"}``) or
the ``images`` list ``diffplug sample`` writes into settings.json; mean and standard error go to
metrics.json, per-image scores to ``OUT/scores.jsonl``. A ``diffplug sample`` folder contributes
exactly the images its settings.json lists (never ``grid.png``); elsewhere files named grid.png are
left out, with a note (``excluded_files``). Files that do not decode are skipped with a warning
and listed in ``skipped_images`` (``--bad-images error`` stops at the first one instead).
A metric that cannot be computed (e.g. precision with no more than k images) is listed with its
reason under ``skipped``; the others are still written.

``judge`` scores each image with the independent testbed judge (never a training reward): accuracy on
the prompted class (``judge_accuracy``) and mean log-probability of it (``judge_logprob``);
``sharpness`` is the variance of the Laplacian per image (mean and s.e.).

    diffplug eval --compare A B --metrics reward:NAME,judge,sharpness[,fid --reference R] --out OUT

compares two ``diffplug sample`` folders made with the same prompts, seed and number of images (refused
otherwise): per metric the gain of A over B with its paired s.e. (headline) and two-sample s.e., FID of
each, the grids side by side, and the label "reward hacking?" (see ``diffplug.evals.compare``).

Exit status: 0 every metric computed; 1 metrics.json written but some metric skipped; 2 error,
nothing written (a bad argument or file, or a file that could not be written, e.g. a full disk: the
error names it, and metrics.json, scores.jsonl and report.html are written together or not at all).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

# Nothing heavy at the top: `diffplug eval` parses and checks its arguments before importing torch.
ALL_METRICS = ("fid", "kid", "precision", "recall", "saturation", "contrast", "judge", "sharpness", "reward:NAME")
FEATURE_METRICS = ("fid", "kid", "precision", "recall")
GRID_N = 32
PROTOCOL_NAMES = ("clean", "torchmetrics", "tf1", "legacy_pytorch")  # evals.resize.PROTOCOLS (tests keep them equal)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="FID/KID/precision/recall (and pixel statistics) of generated images",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", help="folder of generated images (png/jpg/webp, recursive)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two diffplug sample folders (same prompts, seed, number of images): paired gain of A over B "
                        "for reward:NAME, judge, sharpness; FID of each with --reference")
    p.add_argument("--spec", help="generation spec (YAML/JSON): generate a sweep, then score it "
                                  "(see diffplug.evals.spec); replaces --generated")
    p.add_argument("--reference",
                   help="folder of real images, 'fashion-mnist:test' / 'fashion-mnist:train', a testbed set "
                        "('testbed:emoji:test'), or a cached statistics .safetensors file")
    p.add_argument("--metrics", default="fid,kid,precision,recall",
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: %(default)s)")
    p.add_argument("--reward-opt", action="append", metavar="KEY=VALUE",
                   help="option of the reward:NAME metrics, e.g. path=/local/pickscore (JSON values); "
                        "reward:clip_score needs path=<local CLIP folder>, or scorer=testbed (offline, built in)")
    p.add_argument("--prompts", help="JSONL of {\"file\": ..., \"prompt\": ...} (file relative to --generated): "
                                     "the prompts of reward:NAME (default: a diffplug sample settings.json)")
    p.add_argument("--bad-images", choices=("skip", "error"), default="skip",
                   help="an image that does not decode: skip it with a warning and list it (default) or stop")
    p.add_argument("--out", required=True, help="output folder for metrics.json and report.html")
    p.add_argument("--features", default="inception",
                   help="feature network: inception (default), testbed, clip:<dir>, dinov2:<dir>")
    p.add_argument("--protocol", default="clean", choices=PROTOCOL_NAMES, help="Inception resize protocol")
    p.add_argument("--inception-weights", default=None, help="FID Inception .safetensors (default: auto)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None, help="PNG decoding processes (default: min(8, CPUs))")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--limit", type=int, default=None, help="use at most this many generated images")
    p.add_argument("--reference-limit", type=int, default=None, help="use at most this many reference images")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached reference features")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=None,
                   help="default min(1000, #generated, #reference)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/metrics.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=command)
    return p


def command(args) -> int:
    """The ``diffplug eval`` entry: run and return the exit status (0, or 1 when some metric was skipped)."""
    result = run(args)
    return 1 if result.get("skipped") else 0


def _maybe_init_distributed() -> tuple[int, int]:
    """Under ``torchrun``/``accelerate launch`` (WORLD_SIZE > 1): join the process group so each
    process scores a shard and the features are gathered. NCCL on GPUs, gloo on CPU."""
    import os

    import torch
    import torch.distributed as dist

    from .data import dist_info

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_info()


def _device(name: str):
    import os

    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


class _PixelStats:
    """Per-image saturation / contrast / mean intensity, collected on the fly."""

    def __init__(self, want_sat: bool, want_contrast: bool):
        self.want_sat, self.want_contrast = want_sat, want_contrast
        self.values: dict[str, list] = {}

    def add(self, batch) -> None:
        from .image_stats import gray_contrast, saturation

        vals = {"mean_intensity": batch.float().mean(dim=(1, 2, 3)) / 255}
        if self.want_sat:
            vals["saturation"] = saturation(batch)
        if self.want_contrast:
            vals.update(gray_contrast(batch))
        for k, v in vals.items():
            self.values.setdefault(k, []).append(v.cpu())

    def cat(self) -> dict:
        import torch

        return {k: torch.cat(v) for k, v in self.values.items()}


class _Scan:
    """What one pass over a folder collected: features, the grid, reward scores, files, skips."""

    def __init__(self):
        self.feats, self.grid, self.files, self.skipped, self.n = [], [], [], [], 0
        self.scores: dict[str, list] = {}


def _scan(loader, feature_net, device, stats: _PixelStats | None, progress: bool, desc: str, want_features=True,
          bad_images: str = "skip", rewards: dict | None = None, prompts: dict | None = None) -> _Scan:
    """One pass: features (on device), pixel statistics, reward scores (``prompts``: resolved path ->
    prompt, None to pass none), the first GRID_N images for the grid."""
    import torch
    from tqdm.auto import tqdm

    from .data import iterate_batches

    s = _Scan()
    with tqdm(total=len(loader.dataset), desc=desc, unit="img", disable=not progress) as bar:
        for batch, idx in iterate_batches(loader, bad_images, s.skipped, with_index=True):
            if sum(len(g) for g in s.grid) < GRID_N and (not s.grid or batch.shape[1:] == s.grid[0].shape[1:]):
                s.grid.append(batch[:GRID_N])
            if stats is not None:
                stats.add(batch)
            if want_features:
                s.feats.append(feature_net(batch.to(device, non_blocking=True)).float())
            if rewards:
                files = [loader.dataset.files[i] for i in idx]
                s.files += files
                batch_prompts = None if prompts is None else [prompts[f.resolve()] for f in files]
                for name, reward in rewards.items():
                    with torch.no_grad():  # scores only (a differentiable reward would keep its graph)
                        score = torch.as_tensor(reward(batch, batch_prompts)).detach()
                    s.scores.setdefault(name, []).append(score.float().reshape(len(batch)).cpu())
            s.n += len(batch)
            bar.update(len(batch))
    s.grid = torch.cat(s.grid)[:GRID_N] if s.grid else None
    s.feats = torch.cat(s.feats) if s.feats else None
    s.scores = {k: torch.cat(v) for k, v in s.scores.items()}
    return s


def _metric_names(text: str) -> list[str]:
    """``--metrics`` -> names; an unknown metric is an error listing the choices (reward names: later)."""
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in metrics if m not in ALL_METRICS and not m.startswith("reward:")]
    if bad:
        raise ValueError(f"--metrics: unknown {bad}; choose from {','.join(ALL_METRICS)}")
    if not metrics:
        raise ValueError(f"--metrics: empty; choose from {','.join(ALL_METRICS)}")
    return metrics


def _is_named_set(reference: str) -> bool:
    """'fashion-mnist:test', 'testbed:emoji:test': a built-in set, not a path."""
    return reference.startswith(("fashion-mnist:", "testbed:"))


def check_args(args) -> None:
    """Everything checkable before torch is imported: names, counts, paths, the output folder."""
    for flag in ("batch_size", "limit", "reference_limit", "kid_subsets", "kid_subset_size", "k"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", args.device):
        raise ValueError(f"--device {args.device!r}: use auto, cpu, cuda, cuda:N or mps")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    if getattr(args, "compare", None):
        if args.generated or args.spec:
            raise ValueError("--compare A B replaces --generated and --spec; give one of them")
        _metric_names(args.metrics)
        for folder in args.compare:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--compare {folder}: no such folder")
    elif args.spec:
        if not Path(args.spec).is_file():
            raise FileNotFoundError(f"--spec {args.spec}: no such file")
    else:
        metrics = _metric_names(args.metrics)
        if not args.generated or (any(m in metrics for m in FEATURE_METRICS) and not args.reference):
            raise ValueError("give --generated DIR and --reference DIR|fashion-mnist:test (--reference may be left out "
                             "when --metrics has none of fid,kid,precision,recall), or --spec FILE")
        if not Path(args.generated).is_dir():
            raise FileNotFoundError(f"--generated {args.generated}: no such folder")
        if args.prompts and not Path(args.prompts).is_file():
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file")
    if args.reference and not _is_named_set(args.reference) and not Path(args.reference).exists():
        raise FileNotFoundError(f"--reference {args.reference}: no such folder or file (or use fashion-mnist:test, "
                         "testbed:<dataset>:<split>)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if (out / "metrics.json").exists() and not args.overwrite:
        raise FileExistsError(f"--out {out}: metrics.json already exists; pass --overwrite or pick another folder")


def _parse_metrics(text: str) -> tuple[list[str], list[str]]:
    """``--metrics`` -> (metrics, reward names); unknown names are an error listing the choices."""
    from .rewards import list_rewards

    metrics = _metric_names(text)
    rewards = [m.split(":", 1)[1] for m in metrics if m.startswith("reward:")]
    unknown = [r for r in rewards if r not in list_rewards()]
    if unknown:
        raise ValueError(f"--metrics: unknown reward(s) {unknown}; rewards: {', '.join(list_rewards())} "
                         "(use reward:NAME)")
    return metrics, rewards


def run(args) -> dict:
    check_args(args)  # before importing torch: fail fast
    import torch

    from .data import gather_json, gather_rows, image_loader
    from .features import get_feature_network
    from .fid import FrechetInceptionDistance
    from .kid import kernel_inception_distance
    from .precision_recall import precision_recall
    from .reference import reference_stats
    from ..atomic import Batch
    from .report import image_grid_uri, pca_2d, render_report, svg_histograms, svg_scatter
    from .reward_metric import make_rewards, reward_options, reward_prompts, scores_jsonl, summarize

    if args.spec:
        return _run_spec(args)
    if getattr(args, "compare", None):
        from .compare import run_compare

        return run_compare(args)
    metrics, reward_names = _parse_metrics(args.metrics)
    need_net = any(m in metrics for m in FEATURE_METRICS)
    out = Path(args.out)
    reward_opts = reward_options(args.reward_opt)
    rewards = make_rewards(reward_names, reward_opts)
    extra = _per_image(metrics)  # judge, sharpness: scored beside the rewards, never rewards themselves
    rank, world = _maybe_init_distributed()
    device = _device(args.device)
    progress = not args.no_progress and rank == 0
    need_vectors = any(m in metrics for m in ("kid", "precision", "recall"))
    t0 = time.perf_counter()

    gen_loader, gen_id = image_loader(args.generated, args.batch_size, args.num_workers, args.limit,
                                      shard=(rank, world))
    prompts = reward_prompts({**rewards, **extra}, gen_loader.dataset.files, args) if rewards or extra else None
    excluded = gen_loader.dataset.left_out
    if excluded and progress:
        print(f"eval: left out {len(excluded)} file(s) of --generated, e.g. {excluded[0]['file']} "
              f"({excluded[0]['reason']}); see excluded_files in metrics.json", file=sys.stderr)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    fkw = {"weights": args.inception_weights} if args.features == "inception" and args.inception_weights else {}
    net = get_feature_network(args.features, args.protocol, **fkw).to(device) if need_net else None

    stats_gen = _PixelStats("saturation" in metrics, "contrast" in metrics)
    gen = _scan(gen_loader, net, device, stats_gen, progress, "generated", want_features=need_net,
                bad_images=args.bad_images, rewards={**rewards, **extra}, prompts=prompts)
    gen_feats, gen_grid, n_gen = gen.feats, gen.grid, gen.n
    skipped_images = [{**x, "set": "generated"} for x in gen.skipped]
    if world > 1:  # every process scored its shard: gather features, per-image statistics, scores
        gen_feats = gather_rows(gen_feats) if need_net else None
        stats_gen.values = {k: [gather_rows(torch.cat(v).to(device)).cpu()] for k, v in stats_gen.values.items()}
        gen.scores = {k: gather_rows(v.to(device)).cpu() for k, v in gen.scores.items()}
        n_gen = int(gather_rows(torch.tensor([n_gen], device=device)).sum())
        skipped_images = gather_json(skipped_images, device)
    t_gen = time.perf_counter() - t0

    result: dict = {}
    skipped: dict = {}
    ref = None
    ref_grid = None
    stats_ref = _PixelStats("saturation" in metrics, "contrast" in metrics)
    is_stats_file = bool(args.reference) and args.reference.endswith(".safetensors")
    if args.reference and not is_stats_file:
        # a cheap pass without the network: grid and pixel statistics of (up to 2000) reference images
        ref_loader, _ = image_loader(args.reference, args.batch_size, args.num_workers,
                                     min(args.reference_limit or 2000, 2000))
        ref_grid = _scan(ref_loader, None, device, stats_ref, False, "reference pixels", want_features=False,
                         bad_images=args.bad_images).grid
    t1 = time.perf_counter()
    if need_net:
        ref = reference_stats(args.reference, net, need_features=need_vectors, batch_size=args.batch_size,
                              num_workers=args.num_workers, limit=args.reference_limit,
                              use_cache=not args.no_cache, device=device, progress=progress,
                              bad_images=args.bad_images)
        skipped_images += [{**x, "set": "reference"} for x in ref.get("skipped", [])]
    t_ref = time.perf_counter() - t1

    protocol = dict(net.describe()) if net is not None else {}
    n_ref = int(ref["n"]) if ref is not None else 0
    if "fid" in metrics:
        if min(n_gen, n_ref) < 2:
            skipped["fid"] = f"needs at least 2 images per set (generated {n_gen}, reference {n_ref})"
        else:
            # features are already gathered from every process: no second sync in compute()
            fid = FrechetInceptionDistance(features=None, num_features=gen_feats.shape[1],
                                           sync_on_compute=False).to(device)
            fid.load_reference(ref["sum"].to(device) / n_ref, *_sigma_n(ref, device))
            fid.update(features=gen_feats, real=False)
            result["fid"] = float(fid.compute())
    if "kid" in metrics:
        ss = args.kid_subset_size or min(1000, n_gen, n_ref)
        if not 2 <= ss <= min(n_gen, n_ref):
            skipped["kid"] = (f"subset size {ss} must be in [2, min(generated {n_gen}, reference {n_ref})]; "
                              "add images or set --kid-subset-size")
        else:
            mean, std = kernel_inception_distance(gen_feats, ref["features"].to(device), subsets=args.kid_subsets,
                                                  subset_size=ss)
            result["kid"], result["kid_std"] = float(mean), float(std)
            protocol["kid"] = {"subsets": args.kid_subsets, "subset_size": ss, "kernel": "(x.y/D + 1)^3",
                               "estimator": "unbiased MMD^2", "seed": 2020}
    pr_wanted = [m for m in ("precision", "recall") if m in metrics]
    if pr_wanted:
        if min(n_gen, n_ref) <= args.k:
            for m in pr_wanted:
                skipped[m] = (f"k-NN manifolds need more than k={args.k} images per set (generated {n_gen}, "
                              f"reference {n_ref}); add images or lower --k")
        else:
            p, r = precision_recall(ref["features"].to(device), gen_feats, k=args.k)
            result.update({m: float(v) for m, v in (("precision", p), ("recall", r)) if m in metrics})
            protocol["precision_recall"] = {"k": args.k, "method": "Kynkaanniemi et al. 2019 k-NN manifolds"}
    pix_gen, pix_ref = stats_gen.cat(), stats_ref.cat()
    if "saturation" in metrics:
        if "saturation" not in pix_gen:
            skipped["saturation"] = "no generated image decoded"
        else:
            result["saturation"] = float(pix_gen["saturation"].mean())
            if "saturation" in pix_ref:
                result["reference_saturation"] = float(pix_ref["saturation"].mean())
        protocol["saturation"] = "mean HSV saturation (max-min)/max per pixel, averaged per image then over images"
    if "contrast" in metrics:
        if "contrast" not in pix_gen:
            skipped["contrast"] = "no generated image decoded"
        for k in ("contrast", "clip_black", "clip_white"):
            if k in pix_gen:
                result[k] = float(pix_gen[k].mean())
            if k in pix_ref:
                result[f"reference_{k}"] = float(pix_ref[k].mean())
        protocol["contrast"] = "std of gray intensity in [0,1]; clip_* = fraction of pixels within 1/255 of 0 or 1"
    summarize(rewards, {k: v for k, v in gen.scores.items() if k in rewards}, reward_opts, prompts, args.prompts,
              result, protocol, skipped)
    _summarize_per_image(extra, gen.scores, result, protocol, skipped)

    result["protocol"] = protocol
    result["n_generated"] = n_gen
    result["generated"] = str(Path(args.generated).resolve())
    if ref is not None:
        result["n_reference"] = n_ref
        result["reference"] = ref.get("dataset", args.reference)
        result["reference_cache"] = ref.get("cache")
    else:
        result["reference"] = args.reference
    if skipped:
        result["skipped"] = skipped
    if skipped_images:
        result["skipped_images"] = skipped_images
    if excluded:
        result["excluded_files"] = excluded
    result["device"] = str(device)
    result["seconds"] = {"generated": round(t_gen, 3), "reference": round(t_ref, 3),
                         "total": round(time.perf_counter() - t0, 3)}
    if n_gen:
        result["generated_images_per_second"] = round(n_gen / max(t_gen, 1e-9), 2)

    result["processes"] = world
    if rank != 0:
        return result
    # ---- report: metrics.json, scores.jsonl and report.html appear together or not at all
    grids = {}
    if gen_grid is not None:
        grids[f"generated ({args.generated})"] = image_grid_uri(gen_grid)
    if ref_grid is not None:
        grids[f"reference ({args.reference})"] = image_grid_uri(ref_grid)
    plots = []
    if gen_feats is not None and len(gen_feats) > 1 and ref is not None and "features" in ref:
        g2, r2 = pca_2d(gen_feats[:1500], ref["features"][:1500])
        plots.append(("Features, top-2 principal components: overlapping clouds = similar distributions",
                      svg_scatter({"reference": r2, "generated": g2}, "Feature PCA")))
    for key, label in (("mean_intensity", "mean intensity per image"), ("saturation", "HSV saturation per image"),
                       ("contrast", "gray contrast (std) per image")):
        if key in pix_gen and key in pix_ref:
            plots.append((label, svg_histograms({"reference": pix_ref[key], "generated": pix_gen[key]},
                                                label, key, lo=0.0)))
    for name, sc in gen.scores.items():
        if len(sc):
            plots.append((f"reward {name} per image", svg_histograms({"generated": sc}, f"reward {name}", name)))
    info = {k: v for k, v in protocol.items() if not isinstance(v, dict)}
    for k, v in protocol.items():
        if isinstance(v, dict):
            info[k] = json.dumps(v)
    info.update({"generated": result["generated"], "reference": result["reference"],
                 "n_generated": n_gen, "n_reference": result.get("n_reference", "-"), "device": str(device)})
    notes = ["FID/KID are biased upwards at small sample sizes; compare runs with equal image counts."]
    notes += [f"{m} not computed: {why}" for m, why in skipped.items()]
    notes += [f"skipped ({x['set']}) {x['file']}: {x['reason']}" for x in skipped_images[:20]]
    notes += [f"left out {x['file']}: {x['reason']}" for x in excluded[:20]]
    headline = {k: v for k, v in result.items() if isinstance(v, float) and not k.startswith("reference_")}
    report = render_report("diffplug eval", {**headline, **{k: v for k, v in result.items() if k not in headline}},
                           info, grids, plots, notes)
    with Batch() as batch:
        batch.write_json(out / "metrics.json", result)
        if gen.scores and world == 1:
            batch.write_text(out / "scores.jsonl", scores_jsonl(gen.files, gen.scores, prompts, rewards))
        batch.write_text(out / "report.html", report)
    if progress:
        print(json.dumps({k: v for k, v in result.items() if k != "protocol"}, indent=2))
    return result


def _run_spec(args) -> dict:
    from .spec import load_spec, run_spec

    spec = load_spec(args.spec)
    if args.reference:
        spec["reference"] = args.reference
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_spec(spec, out, _device(args.device), progress=not args.no_progress, base=Path(args.spec).parent)
    if not args.no_progress:
        for r in result["runs"]:
            print(json.dumps({k: v for k, v in r.items() if k != "options"}))
    return result


def _per_image(metrics: list[str]) -> dict:
    """``judge`` -> judge_logprob and judge_accuracy, ``sharpness``: callables ``(batch, prompts) -> (N,)``."""
    out = {}
    if "judge" in metrics:
        from .compare import judge_metric

        judge, last = judge_metric(), {}

        def column(key):
            def fn(im, p):  # one judge pass per batch for both columns
                if last.get("batch") is not im:
                    last.update(batch=im, scores=judge(im, p))
                return last["scores"][key]

            fn.needs_prompts = True
            return fn

        out["judge_logprob"], out["judge_accuracy"] = column("judge_logprob"), column("judge_accuracy")
    if "sharpness" in metrics:
        from .image_stats import sharpness

        out["sharpness"] = lambda im, p: sharpness(im)
        out["sharpness"].needs_prompts = False
    return out


def _summarize_per_image(extra: dict, scores: dict, result: dict, protocol: dict, skipped: dict) -> None:
    from .stats import mean_se

    for name in extra:
        sc = scores.get(name)
        if sc is None or not len(sc):
            skipped[name] = "no generated image decoded"
            continue
        m = mean_se(sc, name)
        result[name], result[f"{name}_stderr"] = m.mean, (m.se if m.n > 1 else None)
    if "judge_logprob" in extra:
        protocol["judge"] = ("diffplug.testbed.load_judge(): patch transformer trained on images the classifier "
                             "never saw (testbed/weights/judge.record.json); class = the one the prompt names")
    if "sharpness" in extra:
        protocol["sharpness"] = "variance of the 3x3 Laplacian of the brightest channel per image"


def _sigma_n(ref: dict, device) -> tuple:
    from .fid import stats_from_sums

    n = int(ref["n"])
    _, sigma = stats_from_sums(ref["sum"].to(device), ref["outer"].to(device), n)
    return sigma, n


def main(argv=None):
    """Stand-alone entry point: ``python -m diffplug.evals.cli --generated ...``."""
    parser = argparse.ArgumentParser(prog="diffplug")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    return run(args)


if __name__ == "__main__":
    main()
