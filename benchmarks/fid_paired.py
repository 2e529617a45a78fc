"""FID differences between the runs of ``diffplug eval --spec`` outputs, with paired bootstrap standard errors.

Every run of a spec starts image i from the same noise and prompt, so the runs are paired image by image.
This reads each run's saved images (``OUT/images/<method>/<param>=<value>``), featurises them with the
spec's own network and protocol (the FID it gives is checked against the run's ``metrics.json``), and
resamples the image indices ``--draws`` times, the same resample for every run
(``diffplug.evals.fid.paired_bootstrap``). Within each group of runs at one sweep value and one
guidance setting, each run's FID is compared with the run whose name contains ``--base``:

    python benchmarks/fid_paired.py runs/dc_solver_fid_flux_w5_nfe5 runs/dc_solver_fid_flux_w5_nfe10 \\
        --base DC-Solver --draws 100

Features: those the spec run kept (``OUT/features/*.safetensors``); for runs older than that, the saved
images are featurised again and kept there. Either way each run's FID is checked against metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def run_features(out: Path, record: dict, param: str, net, batch: int) -> torch.Tensor:
    """One run's features: those the spec run kept (``evals.spec.features_path``), else its saved images
    featurised again and kept there."""
    from safetensors.torch import load_file

    from diffplug import atomic
    from diffplug.evals.data import image_loader
    from diffplug.evals.reference import featurize
    from diffplug.evals.spec import features_path, images_path

    folder = images_path(out, record["method"], param, record[param])
    cache = features_path(out, record["method"], param, record[param])
    if cache.is_file():
        return load_file(str(cache))["features"].double()
    loader, _ = image_loader(str(folder), batch_size=batch, num_workers=0)
    feats = featurize(loader, net, "cpu", progress=False).float()
    if len(feats) != record["n"]:
        raise SystemExit(f"{folder}: {len(feats)} images, metrics.json says {record['n']}")
    cache.parent.mkdir(exist_ok=True)
    atomic.save_safetensors({"features": feats.contiguous()}, cache)
    return feats.double()


def main(argv=None) -> None:
    from diffplug.evals.features import get_feature_network
    from diffplug.evals.fid import frechet_distance, gaussian_stats, paired_bootstrap, stats_from_sums
    from diffplug.evals.reference import reference_stats

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outs", nargs="+", type=Path, help="diffplug eval --spec output folders (with metrics.json)")
    p.add_argument("--base", required=True, help="in each group, the run whose method name contains this")
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    rows = []
    for out in args.outs:
        result = json.loads((out / "metrics.json").read_text())
        spec, param = result["spec"], result["protocol"]["sweep"]
        net = get_feature_network(spec.get("features", "inception"), spec.get("protocol", "clean"))
        ref = reference_stats(spec["reference"], net, batch_size=args.batch, limit=spec.get("reference_limit"),
                              device="cpu", progress=False)
        reference = stats_from_sums(ref["sum"].double(), ref["outer"].double(), int(ref["n"]))
        groups: dict = {}
        for r in result["runs"]:
            groups.setdefault((r[param], json.dumps(r.get("options", {}), sort_keys=True)), []).append(r)
        for (value, _), records in groups.items():
            base = [r for r in records if args.base in r["method"]]
            if len(base) != 1:
                raise SystemExit(f"{out}: {param}={value}: --base {args.base!r} matches {len(base)} runs "
                                 f"({[r['method'] for r in records]}); it must match one")
            feats = {r["method"]: run_features(out, r, param, net, args.batch) for r in records}
            for r in records:  # the saved images give the run's own FID back
                again = float(frechet_distance(*reference, *gaussian_stats(feats[r["method"]])))
                if abs(again - r["fid"]) > 1e-3 * max(1.0, r["fid"]):
                    raise SystemExit(f"{out}: {r['method']} {param}={value}: FID from the saved images {again:.4f} "
                                     f"!= metrics.json {r['fid']:.4f}")
            draws = paired_bootstrap(reference, feats, args.draws, args.seed)
            b = draws[base[0]["method"]]
            for r in records:
                d = draws[r["method"]] - b
                rows.append((r["method"], param, value, r["fid"], float(draws[r["method"]].std()),
                             r["fid"] - base[0]["fid"], float(d.std()), r is base[0]))
    print(f"| method | setting | FID | bootstrap s.e. | FID − {args.base} (± paired bootstrap s.e.) |")
    print("|---|---|---:|---:|---|")
    for method, param, value, fid, se, diff, dse, is_base in rows:
        delta = "–" if is_base else f"{diff:+.2f} ± {dse:.2f} ({diff / dse:+.1f} s.e.)"
        print(f"| {method} | {param}={value} | {fid:.2f} | {se:.2f} | {delta} |")
    print(f"\n{args.draws} paired bootstrap draws (seed {args.seed}) of the image indices, the same for every run of a "
          f"group; reference fixed. {time.time() - start:.0f} s wall.")


if __name__ == "__main__":
    main()
