"""The family x plugin matrix (issue 23 item 5): every guidance, scheduler, sampler and loop feature on
every pipeline family diffplug adapts, on the tiny offline pipelines (``diffplug.testing``).

Each cell's expected outcome is data (``EXPECTED``): ``RUNS`` (finite output, checked against a
reference where the column says what it should change) or ``refuses(Error, pattern)`` (the error,
raised before any denoising step, names the model or family and the reason). README's "Supported
families" table is rendered from the same data (``table()``); ``test_readme_table_is_in_step`` keeps
them equal. To change a cell, edit ``EXPECTED`` and run ``python tests/test_family_matrix.py`` (it
rewrites README's table).

Cells other engineers own, expected to flip as their work lands:
* ``EarlyExit`` on UNets, Z-Image and Qwen-Image (early exit beyond PixArt/Flux/SD3/Chroma: ``samplers/early_exit.py``);
* ``FKC+DCSolver`` (FKC refusing a scheduler whose update it would ignore: ``samplers/fkc.py``).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from diffplug.guidance import APG, CFG, AdaptiveGuidance, LinearAG
from diffplug.pipelines import family_of, from_pipe
from diffplug.pipelines.graphs import graph_blocker
from diffplug.samplers import (
    DCDPMSolverScheduler,
    DCSolverScheduler,
    EarlyExit,
    FastUniPCScheduler,
    FKCSampler,
    ProductGuidance,
    encode_condition,
)
from diffplug.testing import tiny_pipeline

FAMILIES = {  # row -> (tiny_pipeline name, diffusers classes)
    "sd": ("sd", "StableDiffusionPipeline"),
    "sdxl": ("sdxl", "StableDiffusionXLPipeline"),
    "sd3": ("sd3", "StableDiffusion3Pipeline"),
    "pixart": ("pixart", "PixArtSigmaPipeline, PixArtAlphaPipeline"),
    "flux": ("flux", "FluxPipeline"),
    "chroma": ("chroma", "ChromaPipeline"),
    "zimage": ("zimage", "ZImagePipeline"),
    "qwenimage": ("qwenimage", "QwenImagePipeline"),
}
GUIDANCE = ("CFG", "APG", "AdaptiveGuidance", "LinearAG", "ProductGuidance")
SCHEDULERS = ("DCSolver", "FastUniPC", "DCDPMSolver", "own scheduler")
COLUMNS = GUIDANCE + SCHEDULERS + ("FKC", "FKC+DCSolver", "EarlyExit", "noise policy", "CUDA graph")

RUNS = ("runs",)


def refuses(error: type, pattern: str) -> tuple:
    return ("refuses", error, pattern)


EXPECTED = {(row, col): RUNS for row in FAMILIES for col in COLUMNS}
EXPECTED.update({
    # FKC moves particles itself: a multistep scheduler's update would be ignored (samplers/fkc.py)
    **{(row, "FKC+DCSolver"): refuses(ValueError, r"FKCSampler cannot use DCSolverScheduler: .*would be ignored")
       for row in FAMILIES},
    # early exit needs a transformer with trunks (samplers/early_exit.py); flips as more land
    ("sd", "EarlyExit"): refuses(TypeError, r"EarlyExit wraps .*got UNet2DConditionModel"),
    ("sdxl", "EarlyExit"): refuses(TypeError, r"EarlyExit wraps .*got UNet2DConditionModel"),
    ("zimage", "EarlyExit"): refuses(TypeError, r"EarlyExit wraps .*got ZImageTransformer2DModel"),
    ("qwenimage", "EarlyExit"): refuses(TypeError, r"EarlyExit wraps .*got QwenImageTransformer2DModel"),
    # CUDA graphs: on this CPU the only blocker must be the device, except where the family's call forbids them
    ("zimage", "CUDA graph"): refuses(ValueError, r"ZImageTransformer2DModel takes per-sample lists"),
    ("qwenimage", "CUDA graph"): refuses(ValueError, r"QwenImageTransformer2DModel runs each pass with its own text"),
})

STEPS = 3
CALL = {  # per-family call arguments: small text lengths, no binning, Z-Image's stock default is 1024 px
    "pixart": dict(max_sequence_length=32, use_resolution_binning=False, clean_caption=False),
    "flux": dict(max_sequence_length=32),
    "chroma": dict(max_sequence_length=32),
    "zimage": dict(max_sequence_length=32, height=32, width=32),
}


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(row):
        if row not in cache:
            pipe = tiny_pipeline(FAMILIES[row][0])
            pipe.set_progress_bar_config(disable=True)
            cache[row] = pipe
        return cache[row]

    return get


def _run(pipe, row, guidance=None, sampler=None, images=1, latents=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the DC-Solver CPR box, Flux's empty-prompt note: asserted elsewhere
        out = from_pipe(pipe, guidance=guidance, sampler=sampler)(
            ["a cat"], negative_prompt=["blurry"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
            output_type="latent", num_images_per_prompt=images, latents=latents, **CALL.get(row, {}),
        )
    return out.images


class _Swapped:
    """``pipe.<attr>`` replaced for the duration of a ``with`` block."""

    def __init__(self, pipe, attr, make):
        self.pipe, self.attr, self.make = pipe, attr, make

    def __enter__(self):
        self.old = getattr(self.pipe, self.attr)
        setattr(self.pipe, self.attr, self.make(self.old))

    def __exit__(self, *exc):
        setattr(self.pipe, self.attr, self.old)


def _guidance(col, pipe, row):
    if col == "CFG":
        return CFG(4.0)
    if col == "APG":
        return APG(4.0)
    if col == "AdaptiveGuidance":
        return AdaptiveGuidance(4.0)
    if col == "LinearAG":  # coefficients are per schedule; these estimate steps 2 and 3 from the past passes
        return LinearAG(4.0, coefficients=[None] + [[1.0, 0.5, 0.5, 0.0]] * (STEPS - 1))
    second = {k: v for k, v in CALL.get(row, {}).items() if k in ("max_sequence_length", "clean_caption")}
    return ProductGuidance(encode_condition(pipe, "a dog", **second), 4.0)


SCHEDULER_CLASSES = {"DCSolver": DCSolverScheduler, "FastUniPC": FastUniPCScheduler, "DCDPMSolver": DCDPMSolverScheduler}


def cell(pipe, row, col, reference):
    """Run one cell; ``reference(name)`` gives the cached runs it is compared with. Returns the output."""
    if col in GUIDANCE:
        out = _run(pipe, row, _guidance(col, pipe, row))
        assert not torch.allclose(out, reference("unguided")), f"{col} must change the unguided output on {row}"
        return out
    if col in SCHEDULER_CLASSES:
        with _Swapped(pipe, "scheduler", lambda old: SCHEDULER_CLASSES[col].from_config(old.config)):
            out = _run(pipe, row, CFG(4.0))
        assert not torch.allclose(out, reference("own scheduler")), f"{col} must step differently from the family's own"
        return out
    if col == "own scheduler":
        return reference("own scheduler")
    if col in ("FKC", "FKC+DCSolver"):
        swap = (lambda old: DCSolverScheduler.from_config(old.config)) if col == "FKC+DCSolver" else (lambda old: old)
        with _Swapped(pipe, "scheduler", swap):
            return _run(pipe, row, CFG(4.0), FKCSampler(num_particles=2), images=2)
    if col == "EarlyExit":  # fresh heads at threshold 0: the wrapped model, bit for bit
        attr = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
        with _Swapped(pipe, attr, lambda old: EarlyExit(old, heads=None, threshold=0.0)):
            out = _run(pipe, row, CFG(4.0))
        assert torch.equal(out, reference("own scheduler"))
        return out
    if col == "noise policy":
        from diffplug.finetune.find import NoisePolicy

        shape = family_of(pipe).latent_shape(1, 32, 32)[1:]
        policy = NoisePolicy(torch.full((1, *shape), 0.5), torch.ones(1, *shape), ["a cat"], {})
        latents = policy.sample_initial_noise(["a cat"], generator=torch.Generator().manual_seed(0), pipe=pipe, height=32, width=32)
        out = _run(pipe, row, CFG(4.0), latents=latents)
        assert not torch.allclose(out, reference("own scheduler")), "the policy's mean must move the result"
        return out
    if col == "CUDA graph":
        reason = graph_blocker(family_of(pipe), CFG(4.0))
        if "not a CUDA device" not in reason:
            raise ValueError(reason)
        return None
    raise AssertionError(col)


@pytest.mark.parametrize("col", COLUMNS)
@pytest.mark.parametrize("row", list(FAMILIES))
def test_cell(pipes, row, col):
    pipe = pipes(row)
    cache = pipe.__dict__.setdefault("_matrix_refs", {})

    def reference(name):
        if name not in cache:
            cache[name] = _run(pipe, row, CFG(1.0) if name == "unguided" else CFG(4.0))
        return cache[name]

    expected = EXPECTED[(row, col)]
    if expected == RUNS:
        out = cell(pipe, row, col, reference)
        assert out is None or torch.isfinite(out).all(), f"{row} x {col}: non-finite output"
        return
    _, error, pattern = expected
    with pytest.raises(error, match=pattern):
        cell(pipe, row, col, reference)


# -- README's table ------------------------------------------------------------------------------------
def _mark(row, col) -> str:
    expected = EXPECTED[(row, col)]
    return "yes" if expected == RUNS else "no"


def table() -> str:
    """README's "Supported families" matrix, rendered from ``EXPECTED``."""
    header = ["family", "diffusers class", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, (_, classes) in FAMILIES.items():
        lines.append("| " + " | ".join([row, f"`{classes}`", *(_mark(row, c) for c in COLUMNS)]) + " |")
    return "\n".join(lines)


README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- family-matrix: generated by tests/test_family_matrix.py -->", "<!-- /family-matrix -->"


def test_readme_table_is_in_step():
    text = README.read_text()
    assert BEGIN in text and END in text, f"README.md lacks the {BEGIN} ... {END} block"
    inside = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert inside == table(), "README's family table differs from EXPECTED: run python tests/test_family_matrix.py"


def test_every_refusal_names_the_model_or_family():
    for (row, col), expected in EXPECTED.items():
        if expected != RUNS:
            assert re.search(r"[A-Z]\w+(Pipeline|Model|Scheduler|Sampler)", expected[2]), (row, col)


if __name__ == "__main__":  # rewrite README's table from EXPECTED
    text = README.read_text()
    if BEGIN not in text:
        sys.exit(f"README.md has no {BEGIN} marker; add the block where the table belongs")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    print(table())
