"""`diffplug sample` end to end on a tiny offline pipeline."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from diffplug.cli import main
from diffplug.pipelines.registry import parse_options


def test_sample_writes_grid_images_and_settings(tmp_path):
    out = tmp_path / "run"
    args = ["sample", "--model", "tiny-sd", "--prompt", "a cat", "--prompt", "a dog", "--num-images", "2",
            "--steps", "3", "--seed", "7", "--guidance-scale", "4", "--scheduler", "dpm++", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "002.png", "003.png", "grid.png", "settings.json"]
    assert Image.open(out / "grid.png").size == (64, 64)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == ["a cat", "a dog"] and settings["seed"] == 7
    assert settings["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert settings["guidance"]["config"]["guidance_scale"] == 4
    assert settings["nfe_per_image"] == 6

    # same seed, same images; an existing run is never overwritten silently
    assert main(args) == 2
    again = tmp_path / "again"
    assert main(args[:-1] + [str(again)]) == 0
    assert (out / "000.png").read_bytes() == (again / "000.png").read_bytes()


def test_sample_on_flux_is_the_stock_single_pass_unless_a_guidance_is_given(tmp_path, capsys):
    """Flux: --guidance-scale is the guidance embedding (one pass per step, as FluxPipeline); --guidance adds
    the second pass; on a transformer without the embedding a scale is refused, never ignored."""
    base = ["sample", "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32"]
    assert main(base + ["--model", "tiny-flux", "--guidance-scale", "3", "--out", str(tmp_path / "stock")]) == 0
    settings = json.loads((tmp_path / "stock" / "settings.json").read_text())
    assert settings["guidance"] == {"name": "stock", "embedding_scale": 3.0} and settings["nfe_per_image"] == 2
    assert main(base + ["--model", "tiny-flux", "--guidance", "cfg", "--guidance-scale", "3", "--out", str(tmp_path / "cfg")]) == 0
    assert json.loads((tmp_path / "cfg" / "settings.json").read_text())["nfe_per_image"] == 4
    capsys.readouterr()
    assert main(base + ["--model", "tiny-flux-schnell", "--guidance-scale", "3", "--out", str(tmp_path / "x")]) == 2
    assert "guidance_embeds=False" in capsys.readouterr().err


def test_bad_input_is_named(tmp_path, capsys):
    assert main(["sample", "--model", "tiny-sd", "--out", str(tmp_path / "x")]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "y")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["eta"])
    assert parse_options(["eta=0.5", "space=x0", "stop=1"]) == {"eta": 0.5, "space": "x0", "stop": 1}


def test_module_entry_point_and_light_help():
    done = subprocess.run([sys.executable, "-m", "diffplug", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "sample" in done.stdout and "Exit status: 0 done; 2 error" in done.stdout
    # `diffplug --help` lists the commands without importing torch or diffusers
    code = "import sys; from diffplug.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_every_subcommand_registers():
    import argparse

    from diffplug.cli import available, build_parser

    parser = build_parser("*")
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in available():
        assert choices[name].add_help, f"{name}: its module did not register a real parser"


def test_sample_on_a_full_disk_names_the_file_and_leaves_the_folder_as_it_was(tmp_path, capsys, monkeypatch, disk_full_at):
    out = tmp_path / "run"
    args = ["sample", "--model", "tiny-sd", "--prompt", "a cat", "--num-images", "2", "--steps", "2", "--out", str(out)]
    disk_full_at("grid")
    assert main(args) == 2  # the exit status --help gives
    err = capsys.readouterr().err
    assert f"could not write {out / 'grid.png'}: No space left on device" in err and "Traceback" not in err
    assert not out.exists(), "no partial image, no images without their settings.json, no temporary file"
    # an earlier run replaced with --force stays whole when the new one cannot be written
    monkeypatch.undo()
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    disk_full_at("settings")
    assert main(args[:-4] + ["--num-images", "1", "--steps", "3", "--out", str(out), "--force"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sample_help_states_the_exit_status():
    from diffplug.cli import build_parser

    parser = build_parser("sample")
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["sample"]
    assert "Exit status: 0 written; 2 error, nothing written" in " ".join(sub.format_help().split())


def test_finetune_on_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, disk_full_at):
    out = tmp_path / "ft"
    argv = ["finetune", "sft", "--data", "testbed:food-drink", "--output_dir", str(out), "--train_batch_size", "2",
            "--max_steps", "2", "--checkpoint_every", "1", "--tensorboard", "false", "--log_every", "1"]
    disk_full_at(".tmp-checkpoint-2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and ".tmp-checkpoint-2" in err and "No space left" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    monkeypatch.undo()
    assert main(argv + ["--resume", "latest"]) == 0 and (out / "final").is_dir()


def test_finetune_final_weights_on_a_full_disk_name_the_folder_and_leave_no_partial_final(tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC with its own error type: the trainer names final/ and leaves no half folder."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, *a, **k):
        if ".tmp-final" in str(filename):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "ft"
    argv = ["finetune", "sft", "--data", "testbed:food-drink", "--output_dir", str(out), "--train_batch_size", "2",
            "--max_steps", "1", "--checkpoint_every", "0", "--tensorboard", "false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"could not write {out / 'final'}" in err and "StorageFull" in err and "Traceback" not in err
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()


@pytest.mark.parametrize("argv", [["sample", "--prompt", "a", "--steps", "0", "--out", "x"],
                                  ["sample", "--prompt", "a", "--guidance", "cgf", "--out", "x"],
                                  ["eval", "--generated", "no/such/dir", "--metrics", "saturation", "--out", "x"],
                                  ["eval", "--generated", ".", "--metrics", "fid,sharpness", "--out", "x"]])
def test_bad_arguments_are_refused_before_torch_is_imported(argv, tmp_path):
    code = ("import sys; from diffplug.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)
    assert "error" in done.stderr


def test_light_name_tables_match_the_registries():
    from diffplug.evals.cli import PROTOCOL_NAMES
    from diffplug.evals.resize import PROTOCOLS
    from diffplug.guidance import GUIDANCE
    from diffplug.pipelines.cli import GUIDANCE_NAMES, SAMPLER_NAMES
    from diffplug.samplers import SAMPLERS

    assert set(GUIDANCE_NAMES) == set(GUIDANCE) and set(SAMPLER_NAMES) == set(SAMPLERS)
    assert PROTOCOL_NAMES == PROTOCOLS


def test_sample_with_a_finetune_output_folder(tmp_path, capsys):
    """fine-tune, then sample with --adapter: the tuned model's images; another base model is refused (exit 2)."""
    run = tmp_path / "tune"
    assert main(["finetune", "sft", "--model", "tiny:sd", "--data", "testbed:food-drink", "--adapter", "lora",
                 "--max_steps", "2", "--train_batch_size", "2", "--learning_rate", "0.05", "--lora_init", "gaussian",
                 "--tensorboard", "false", "--resolution", "32", "--output_dir", str(run)]) == 0
    base = ["sample", "--model", "tiny-sd", "--prompt", "a cat", "--steps", "2", "--seed", "3"]
    assert main(base + ["--out", str(tmp_path / "base")]) == 0
    assert main(base + ["--adapter", str(run / "final"), "--out", str(tmp_path / "tuned")]) == 0
    settings = json.loads((tmp_path / "tuned" / "settings.json").read_text())
    assert settings["adapter"] == str(run / "final")
    assert (tmp_path / "base" / "000.png").read_bytes() != (tmp_path / "tuned" / "000.png").read_bytes()
    capsys.readouterr()
    assert main(["sample", "--model", "tiny-sd3", "--prompt", "a", "--steps", "1", "--adapter", str(run / "final"),
                 "--out", str(tmp_path / "other")]) == 2
    assert "adapter.json" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(base + ["--adapter", str(tmp_path), "--out", str(tmp_path / "none")]) == 2
