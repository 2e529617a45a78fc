"""``diffplug eval``: score a folder of generated images against a reference.

    diffplug eval --generated DIR --reference DIR|fashion-mnist:test|stats.safetensors \\
        --metrics fid,kid,precision,recall[,saturation,contrast] --out OUT

writes ``OUT/metrics.json`` (every number, plus ``protocol``: feature network, weights, resize
protocol, KID and precision/recall settings) and ``OUT/report.html`` (image grids, a PCA view of the
features, per-image histograms). Reference features are cached (see ``diffplug.evals.reference``).
PNG decoding runs in DataLoader worker processes while the network runs on the device.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ALL_METRICS = ("fid", "kid", "precision", "recall", "saturation", "contrast")
GRID_N = 32


def register(subparsers) -> argparse.ArgumentParser:
    from .resize import PROTOCOLS

    p = subparsers.add_parser(
        "eval", help="FID/KID/precision/recall (and pixel statistics) of generated images",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", help="folder of generated images (png/jpg/webp, recursive)")
    p.add_argument("--spec", help="generation spec (YAML/JSON): generate a sweep, then score it "
                                  "(see diffplug.evals.spec); replaces --generated")
    p.add_argument("--reference",
                   help="folder of real images, 'fashion-mnist:test' / 'fashion-mnist:train', a testbed set "
                        "('testbed:emoji:test'), or a cached statistics .safetensors file")
    p.add_argument("--metrics", default="fid,kid,precision,recall",
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder for metrics.json and report.html")
    p.add_argument("--features", default="inception",
                   help="feature network: inception (default), testbed, clip:<dir>, dinov2:<dir>")
    p.add_argument("--protocol", default="clean", choices=PROTOCOLS, help="Inception resize protocol")
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
    """The ``diffplug eval`` entry: run and return the exit status (0)."""
    run(args)
    return 0


def _maybe_init_distributed() -> tuple[int, int]:
    """Under ``torchrun``/``accelerate launch`` (WORLD_SIZE > 1): join the process group so each
    process scores a shard and the features are gathered. NCCL on GPUs, gloo on CPU."""
    import os

    import torch.distributed as dist

    from .data import dist_info

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_info()


def _device(name: str) -> torch.device:
    import os

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

    def add(self, batch: torch.Tensor) -> None:
        from .image_stats import gray_contrast, saturation

        vals = {"mean_intensity": batch.float().mean(dim=(1, 2, 3)) / 255}
        if self.want_sat:
            vals["saturation"] = saturation(batch)
        if self.want_contrast:
            vals.update(gray_contrast(batch))
        for k, v in vals.items():
            self.values.setdefault(k, []).append(v.cpu())

    def cat(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self.values.items()}


def _scan(loader, feature_net, device, stats: _PixelStats | None, progress: bool, desc: str, want_features=True):
    """One pass: features (on device), pixel statistics, the first GRID_N images for the grid."""
    from tqdm.auto import tqdm

    from .data import iterate_batches

    feats, grid = [], []
    with tqdm(total=len(loader.dataset), desc=desc, unit="img", disable=not progress) as bar:
        for batch in iterate_batches(loader):
            if sum(len(g) for g in grid) < GRID_N and (not grid or batch.shape[1:] == grid[0].shape[1:]):
                grid.append(batch[:GRID_N])
            if stats is not None:
                stats.add(batch)
            if want_features:
                feats.append(feature_net(batch.to(device, non_blocking=True)).float())
            bar.update(len(batch))
    grid_t = torch.cat(grid)[:GRID_N] if grid else None
    return (torch.cat(feats) if feats else None), grid_t


def run(args) -> dict:
    from .data import gather_rows, image_loader
    from .features import get_feature_network
    from .fid import FrechetInceptionDistance
    from .kid import kernel_inception_distance
    from .precision_recall import precision_recall
    from .reference import reference_stats
    from .report import image_grid_uri, pca_2d, svg_histograms, svg_scatter, write_report

    if args.spec:
        return _run_spec(args)
    if not args.generated or not args.reference:
        raise ValueError("give --generated DIR and --reference DIR|fashion-mnist:test, or --spec FILE")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in ALL_METRICS]
    if bad:
        raise ValueError(f"--metrics: unknown {bad}; choose from {','.join(ALL_METRICS)}")
    out = Path(args.out)
    if (out / "metrics.json").exists() and not args.overwrite:
        raise FileExistsError(f"--out {out}: metrics.json already exists; pass --overwrite or pick another folder")
    rank, world = _maybe_init_distributed()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    device = _device(args.device)
    progress = not args.no_progress and rank == 0
    need_net = any(m in metrics for m in ("fid", "kid", "precision", "recall"))
    need_vectors = any(m in metrics for m in ("kid", "precision", "recall"))
    t0 = time.perf_counter()

    fkw = {"weights": args.inception_weights} if args.features == "inception" and args.inception_weights else {}
    net = get_feature_network(args.features, args.protocol, **fkw).to(device) if need_net else None

    gen_loader, gen_id = image_loader(args.generated, args.batch_size, args.num_workers, args.limit,
                                      shard=(rank, world))
    stats_gen = _PixelStats("saturation" in metrics, "contrast" in metrics)
    gen_feats, gen_grid = _scan(gen_loader, net, device, stats_gen, progress, "generated", want_features=need_net)
    if world > 1:  # every process scored its shard: gather features and per-image statistics
        gen_feats = gather_rows(gen_feats) if gen_feats is not None else None
        stats_gen.values = {k: [gather_rows(torch.cat(v).to(device)).cpu()] for k, v in stats_gen.values.items()}
    t_gen = time.perf_counter() - t0
    n_gen = len(gen_feats) if gen_feats is not None else len(gen_loader.dataset) * world

    result: dict = {}
    ref = None
    ref_grid = None
    stats_ref = _PixelStats("saturation" in metrics, "contrast" in metrics)
    is_stats_file = args.reference.endswith(".safetensors")
    if not is_stats_file:
        # a cheap pass without the network: grid and pixel statistics of (up to 2000) reference images
        ref_loader, _ = image_loader(args.reference, args.batch_size, args.num_workers,
                                     min(args.reference_limit or 2000, 2000))
        _, ref_grid = _scan(ref_loader, None, device, stats_ref, False, "reference pixels", want_features=False)
    t1 = time.perf_counter()
    if need_net:
        ref = reference_stats(args.reference, net, need_features=need_vectors, batch_size=args.batch_size,
                              num_workers=args.num_workers, limit=args.reference_limit,
                              use_cache=not args.no_cache, device=device, progress=progress)
    t_ref = time.perf_counter() - t1

    protocol = dict(net.describe()) if net is not None else {}
    if "fid" in metrics:
        # features are already gathered from every process: no second sync in compute()
        fid = FrechetInceptionDistance(features=None, num_features=gen_feats.shape[1],
                                       sync_on_compute=False).to(device)
        fid.load_reference(ref["sum"].to(device) / int(ref["n"]),
                           *_sigma_n(ref, device))
        fid.update(features=gen_feats, real=False)
        result["fid"] = float(fid.compute())
    if need_vectors:
        real = ref["features"].to(device)
    if "kid" in metrics:
        ss = args.kid_subset_size or min(1000, n_gen, len(real))
        mean, std = kernel_inception_distance(gen_feats, real, subsets=args.kid_subsets, subset_size=ss)
        result["kid"], result["kid_std"] = float(mean), float(std)
        protocol["kid"] = {"subsets": args.kid_subsets, "subset_size": ss, "kernel": "(x.y/D + 1)^3",
                           "estimator": "unbiased MMD^2", "seed": 2020}
    if "precision" in metrics or "recall" in metrics:
        p, r = precision_recall(real, gen_feats, k=args.k)
        if "precision" in metrics:
            result["precision"] = float(p)
        if "recall" in metrics:
            result["recall"] = float(r)
        protocol["precision_recall"] = {"k": args.k, "method": "Kynkaanniemi et al. 2019 k-NN manifolds"}
    pix_gen, pix_ref = stats_gen.cat(), stats_ref.cat()
    if "saturation" in metrics:
        result["saturation"] = float(pix_gen["saturation"].mean())
        if "saturation" in pix_ref:
            result["reference_saturation"] = float(pix_ref["saturation"].mean())
        protocol["saturation"] = "mean HSV saturation (max-min)/max per pixel, averaged per image then over images"
    if "contrast" in metrics:
        for k in ("contrast", "clip_black", "clip_white"):
            result[k] = float(pix_gen[k].mean())
            if k in pix_ref:
                result[f"reference_{k}"] = float(pix_ref[k].mean())
        protocol["contrast"] = "std of gray intensity in [0,1]; clip_* = fraction of pixels within 1/255 of 0 or 1"

    result["protocol"] = protocol
    result["n_generated"] = n_gen
    result["generated"] = str(Path(args.generated).resolve())
    if ref is not None:
        result["n_reference"] = int(ref["n"])
        result["reference"] = ref.get("dataset", args.reference)
        result["reference_cache"] = ref.get("cache")
    else:
        result["reference"] = args.reference
    result["device"] = str(device)
    result["seconds"] = {"generated": round(t_gen, 3), "reference": round(t_ref, 3),
                         "total": round(time.perf_counter() - t0, 3)}
    if n_gen:
        result["generated_images_per_second"] = round(n_gen / max(t_gen, 1e-9), 2)

    result["processes"] = world
    if rank != 0:
        return result
    with open(out / "metrics.json", "w") as f:
        json.dump(result, f, indent=2)

    # ---- report
    grids = {}
    if gen_grid is not None:
        grids[f"generated ({args.generated})"] = image_grid_uri(gen_grid)
    if ref_grid is not None:
        grids[f"reference ({args.reference})"] = image_grid_uri(ref_grid)
    plots = []
    if gen_feats is not None and ref is not None and "features" in ref:
        g2, r2 = pca_2d(gen_feats[:1500], ref["features"][:1500])
        plots.append(("Features, top-2 principal components: overlapping clouds = similar distributions",
                      svg_scatter({"reference": r2, "generated": g2}, "Feature PCA")))
    for key, label in (("mean_intensity", "mean intensity per image"), ("saturation", "HSV saturation per image"),
                       ("contrast", "gray contrast (std) per image")):
        if key in pix_gen and key in pix_ref:
            plots.append((label, svg_histograms({"reference": pix_ref[key], "generated": pix_gen[key]},
                                                label, key, lo=0.0)))
    info = {k: v for k, v in protocol.items() if not isinstance(v, dict)}
    for k, v in protocol.items():
        if isinstance(v, dict):
            info[k] = json.dumps(v)
    info.update({"generated": result["generated"], "reference": result["reference"],
                 "n_generated": n_gen, "n_reference": result.get("n_reference", "-"), "device": str(device)})
    notes = ["FID/KID are biased upwards at small sample sizes; compare runs with equal image counts."]
    headline = {k: v for k, v in result.items() if isinstance(v, float) and not k.startswith("reference_")}
    write_report(out / "report.html", "diffplug eval", {**headline, **{k: v for k, v in result.items()
                                                                       if k not in headline}},
                 info, grids, plots, notes)
    if progress:
        print(json.dumps({k: v for k, v in result.items() if k != "protocol"}, indent=2))
    return result


def _run_spec(args) -> dict:
    from .spec import load_spec, run_spec

    spec = load_spec(args.spec)
    if args.reference:
        spec["reference"] = args.reference
    out = Path(args.out)
    if (out / "metrics.json").exists() and not args.overwrite:
        raise FileExistsError(f"--out {out}: metrics.json already exists; pass --overwrite or pick another folder")
    out.mkdir(parents=True, exist_ok=True)
    result = run_spec(spec, out, _device(args.device), progress=not args.no_progress, base=Path(args.spec).parent)
    if not args.no_progress:
        for r in result["runs"]:
            print(json.dumps({k: v for k, v in r.items() if k != "options"}))
    return result


def _sigma_n(ref: dict, device) -> tuple[torch.Tensor, int]:
    from .fid import stats_from_sums

    n = int(ref["n"])
    _, sigma = stats_from_sums(ref["sum"].to(device), ref["outer"].to(device), n)
    return sigma, n


def main(argv=None):
    """Stand-alone entry point: ``python -m diffplug.evals.cli --generated ...``."""
    parser = argparse.ArgumentParser(prog="diffplug")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["eval", *(argv if argv is not None else __import__("sys").argv[1:])])
    return run(args)


if __name__ == "__main__":
    main()
