"""FKC against ground truth on the 1-D Gaussian-mixture toy of ``tests/test_fkc.py`` (CPU, ~minutes).

    python benchmarks/fkc_toy.py --out benchmarks/fkc_toy_results.md

For each target (CFG geometric mixture w = 3, product of two experts, annealing beta = 2): the
target's mean / std / mass right of the cut (quadrature), FKC's weighted particles (16 groups x 256
particles, several seeds) and the same sampler without weights (plain CFG / summed scores / scaled
score), at several numbers of DDIM steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from datetime import datetime, timezone
from pathlib import Path


from diffplug.guidance import CFG
from diffplug.samplers import FKCSampler, ProductGuidance

_spec = importlib.util.spec_from_file_location("fkc_toy_tests", Path(__file__).resolve().parents[1] / "tests" / "test_fkc.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def cases(n):
    product = ProductGuidance({"code": toy.code("p2", n)}, 1.0, 1.0, uncond=False)
    return [
        ("CFG w=3: q_c^3 q_u^-2", (toy.code("c", n), toy.code("u", n)), lambda: CFG(3.0), {}, {"c": 3.0, "u": -2.0}, 0.0, "plain CFG"),
        ("product q_1 q_2", (toy.code("p1", n), toy.code("u", n)), lambda: product, {}, {"p1": 1.0, "p2": 1.0}, 0.3, "summed scores"),
        ("annealing q^2", (toy.code("a", n), toy.code("u", n)), lambda: CFG(1.0), {"beta": 2.0}, {"a": 2.0}, 0.0, "scaled score"),
    ]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, nargs="+", default=[100, 400])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    n, K = toy.GROUPS * toy.K, toy.K
    lines = ["| target | steps | method | mean | std | mass right of cut |", "|---|---|---|---|---|---|"]
    fmt = lambda d: f"{d['mean']:.3f} | {d['std']:.3f} | {d['right']:.3f}"  # noqa: E731
    start = time.perf_counter()
    for name, conds, guidance, opts, exps, cut, plain_name in cases(n):
        truth = toy.target(exps, cut)
        lines.append(f"| {name} | - | **target** | {fmt(truth)} |")
        for steps in args.steps:
            plain = toy.particles(toy.run_toy(conds, guidance(), FKCSampler(K, correct=False, **opts), n, steps), cut=cut)
            lines.append(f"| {name} | {steps} | {plain_name} (no weights) | {fmt(plain)} |")
            for seed in range(args.seeds):
                sampler = FKCSampler(K, **opts)
                x = toy.run_toy(conds, guidance(), sampler, n, steps, seed=seed)
                lines.append(f"| {name} | {steps} | FKC, seed {seed} | {fmt(toy.particles(x, sampler.output.log_weights, cut))} |")
            print("\n".join(lines[-1 - args.seeds - 1:]), flush=True)
    report = "\n".join(
        [
            "# FKC vs ground truth: 1-D Gaussian-mixture toy",
            "",
            f"CPU, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {time.perf_counter() - start:.0f} s. "
            f"Command: `python benchmarks/fkc_toy.py {' '.join(argv or [])}`".rstrip(),
            f"{toy.GROUPS} SMC groups x {K} particles, ESS-triggered systematic resampling (threshold 0.5), "
            "no clamping; weighted statistics self-normalised per group. Model: exact noisy scores of the "
            "mixtures (tests/test_fkc.py), DDIM schedule of 1000 linear-beta steps, ancestral (eta = 1) moves.",
            "",
            *lines,
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
