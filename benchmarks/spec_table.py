"""Markdown table of a ``diffplug eval --spec`` run: one row per method, one column per (metric,
sweep value).

    python benchmarks/spec_table.py runs/dc_solver_fid/metrics.json --metrics fid kid clip
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def spec_table(result: dict, metrics: list[str]) -> str:
    param = result["protocol"]["sweep"]
    runs = result["runs"]
    values = sorted({r[param] for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    by = {(r["method"], r[param]): r for r in runs}
    head = ["method"] + [f"{m} ({param}={v:g})" for m in metrics for v in values] + ["seconds to generate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = []
        for m in metrics:
            for v in values:
                x = by.get((method, v), {}).get(m)
                cells.append("" if x is None else f"{x:.4g}")
        secs = " / ".join(f"{by[(method, v)]['generate_seconds']:.0f}" for v in values if (method, v) in by)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {secs} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics_json", type=Path)
    p.add_argument("--metrics", nargs="+", default=["fid", "kid", "clip"])
    args = p.parse_args(argv)
    result = json.loads(args.metrics_json.read_text())
    print(spec_table(result, args.metrics))
    proto = result["protocol"]
    print(f"\nImages per run: {result['runs'][0]['n']}; features: {proto.get('feature_network')} "
          f"({proto.get('resize_protocol')}); reference: {proto.get('reference')} ({proto.get('n_reference')} images); "
          f"device: {result['device']}.")


if __name__ == "__main__":
    main()
