"""Assemble benchmarks/RESULTS.md from the per-topic result files the benchmark scripts write.

    python benchmarks/collect_results.py

Each topic file names its script, command, device and date; this only concatenates them (headings
moved one level down) under a short index, so RESULTS.md never holds a number no script produced.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = [  # (file, title)
    ("loop_results.md", "The denoising loop"),
    ("testbed_results.md", "The testbed"),
    ("evals_results.md", "Evals"),
    ("guidance_results.md", "Guidance: APG, Adaptive Guidance, LinearAG"),
    ("dc_solver_results.md", "DC-Solver"),
    ("fkc_toy_results.md", "FKC against ground truth (toy)"),
    ("fkc_results.md", "FKC on the testbed UNet"),
    ("fkc_results_dit.md", "FKC on the testbed DiT"),
    ("finetune_results.md", "Fine-tuning: Diffusion-DPO and SPO"),
]

HEADER = """# Benchmark results

Every number below was produced by a script in `benchmarks/`; each section names its command,
device and date. This file is assembled by `python benchmarks/collect_results.py`.

**No GPU is lent to this task**: all figures are from the project's 2-core CPU machine, with models
trained on that CPU. The GPU benchmarks (`loop_gpu.py`, `evals_speed.py --device cuda`,
`dc_solver_speed.py --device cuda`, `guidance_apg_timing.py --device cuda`) are written and not run.

**Testbed weights.** The testbed was retrained (round 2) on 2026-11-23 13:25-14:39 UTC. Measured on the
round-2 weights: the testbed, guidance quality, DC-Solver (testbed MSE, CPR fit, FID), FKC (UNet and
DiT), fine-tuning and the evals example sweep; loop overhead, DC-Solver step timings and evals CPU rates
were re-measured at 15:23-15:26 UTC without the earlier load. From round 1 (model-independent or toy):
loop equivalence, APG maths timing, the FKC toy, DC-Solver's toy table, evals correctness. Round-1
tables of the re-measured sections are in git history (commit 70ffb49).

"""


def main():
    parts = [HEADER, "## Contents\n"]
    parts += [f"- [{title}](#{title.lower().replace(' ', '-').replace(':', '').replace(',', '')})" for _, title in TOPICS]
    for name, title in TOPICS:
        text = (HERE / name).read_text().strip()
        lines = text.splitlines()
        if lines and lines[0].startswith("# "):
            lines = lines[1:]
        body = "\n".join("#" + line if line.startswith("#") else line for line in lines).strip()
        parts.append(f"\n## {title}\n\n_From `benchmarks/{name}`._\n\n{body}\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
