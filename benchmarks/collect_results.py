"""Assemble benchmarks/RESULTS.md from the per-topic result files the benchmark scripts write.

    python benchmarks/collect_results.py

Each topic file names its script, command, device and date; this only concatenates them (headings
moved one level down) under a short index, so RESULTS.md never holds a number no script produced.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = [  # (file, title)
    ("loop_results.md", "The denoising loop"),
    ("gpu_results.md", "GPU run: NVIDIA H200, 2026-11-28"),
    ("testbed_results.md", "The testbed"),
    ("evals_results.md", "Evals"),
    ("guidance_results.md", "Guidance: APG, Adaptive Guidance, LinearAG"),
    ("dc_solver_results.md", "DC-Solver"),
    ("fkc_toy_results.md", "FKC against ground truth (toy)"),
    ("fkc_results.md", "FKC on the testbed UNet"),
    ("fkc_results_dit.md", "FKC on the testbed DiT"),
    ("finetune_results.md", "Fine-tuning: Diffusion-DPO and SPO"),
    ("preset_results.md", "DPO presets on prompt sets they were not tuned on"),
    ("find_results.md", "FIND: initial-noise policies"),
    ("finetune_flow_results.md", "Fine-tuning on the flow testbed: DPO, SPO and FIND"),
    ("sara_results.md", "SaRA vs LoRA vs full fine-tuning"),
    ("early_exit_results.md", "DeeDiff early exit on the testbed DiT"),
    ("early_exit_flux_results.md", "DeeDiff early exit on the flow testbed (Flux transformer, trained jointly)"),
    ("early_exit_flow_flops.md", "DeeDiff early exit on real-size flow transformers: cost of heads and UEMs"),
    ("testbed_lcm_results.md", "The few-step testbed model (LCM)"),
    ("pso_results.md", "PSO on the few-step testbed"),
    ("weight_scan_results.md", "Checked loading: the NaN scan of a loaded model"),
]

HEADER = """# Benchmark results

Every number below was produced by a script in `benchmarks/`; each section names its command,
device and date. This file is assembled by `python benchmarks/collect_results.py`.

**GPU and CPU.** The GPU figures are from one NVIDIA H200 on 2026-11-28 (torch 2.11.0+cu130, the
project at commit 79e169f): the loop's stock / eager / CUDA-graph timings, latent agreement, host
syncs and profile ("The denoising loop"), evals throughput ("Evals": 50,000-image FID in 6.87 s),
scheduler step and APG timings ("GPU run"). Every other figure, and every quality number, is from
the project's 2-core CPU machine with models trained on that CPU (the CPU sections say so).

**Testbed weights.** The testbed's UNet and DiT were fine-tuned again (round 4) on 2026-11-23
18:31-19:09 UTC with offset noise, so that sample brightness follows the prompt rather than the mean
that x_T carries (round 3 had centred the VAE's latents, which fixed Fashion-MNIST and left emoji too
dark). Measured on the round-4 weights (19:09-20:12 UTC, two benchmarks at a time, 1 thread each): the
testbed, guidance quality, DC-Solver (testbed MSE, CPR fit, FID, grid), FKC (UNet and DiT), fine-tuning
and the evals example sweep. Earlier and model-independent: loop equivalence and overhead, APG maths
timing, the FKC toy, DC-Solver's toy table and step timings, evals correctness and CPU rates. Round-3
tables are in git history at commit 8105e0c, round 2's at 46a52d4, round 1's at 70ffb49.

**2026-11-28 (CPU).** New this day, on the round-4 weights: fine-tuning re-run after SPO and the DPO
presets were rebuilt, FIND, SaRA, DeeDiff, the few-step (LCM) testbed model and PSO, the DC-Solver
defaults grid, Adaptive Guidance's defaults, APG's op count and the loop's host-sync counts. Up to
seven benchmarks and test runs shared the 2-core machine then: wall-clock figures of that day are
upper bounds (each section gives the load where it was noted); quality numbers do not depend on it.

**2026-12-07 (CPU).** New this day: PSO's offline rows re-judged with the released prior term and paired
s.e.; DeeDiff trained jointly with the backbone; the exit heads' cost on real-size Flux / SD3 shapes; the
NaN scan's cost; the flow-matching testbed's first training hours (testbed section). One statistic for every
table from now on (`diffplug.evals.stats`: gain ± paired s.e. as the headline, two-sample s.e. beside it);
sections measured before this day used the unpaired or base-only s.e. their own text names.

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
