"""Bad input gets a clear error naming the argument, never a silent change (README: "What bad input gets").

One case per README table row; ``test_every_readme_row_has_a_case`` keeps the two in step."""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffplug.cli import main
from diffplug.guidance import APG, CFG, AdaptiveGuidance
from diffplug.pipelines import from_pipe
from diffplug.testing import tiny_pipeline

README = Path(__file__).resolve().parents[1] / "README.md"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def run():
    pipe = tiny_pipeline("sd")  # 32x32 images, VAE factor 2, latents (B, 4, 16, 16)
    pipe.set_progress_bar_config(disable=True)
    return from_pipe(pipe)


# id -> (call(run), words the error must contain)
API = {
    "scale-nan": ([lambda r: r("a cat", guidance_scale=NAN), lambda r: r("a cat", guidance_scale=INF)], ["guidance_scale", "finite"]),
    "scale-huge": ([lambda r: r("a cat", guidance_scale=1e30)], ["guidance_scale", "[-10000, 10000]"]),
    "guidance-nan": ([lambda r: CFG(NAN), lambda r: APG(guidance_scale=NAN), lambda r: AdaptiveGuidance(INF),
                      lambda r: from_pipe(r.pipe, guidance=CFG(3.0))("a cat", guidance_scale=NAN)], ["guidance_scale"]),
    "steps-negative": ([lambda r: r("a cat", num_inference_steps=-3)], ["num_inference_steps", "positive integer"]),
    "steps-zero": ([lambda r: r("a cat", num_inference_steps=0)], ["num_inference_steps"]),
    "steps-float": ([lambda r: r("a cat", num_inference_steps=2.5), lambda r: r("a cat", num_inference_steps=True)],
                    ["num_inference_steps"]),
    "size-odd": ([lambda r: r("a cat", height=33)], ["height=33", "32 or 34"]),
    "size-zero": ([lambda r: r("a cat", width=0)], ["width", "positive integer"]),
    "latents-shape": ([lambda r: r("a cat", latents=torch.zeros(1, 4, 8, 8)),
                       lambda r: r(["a cat", "a dog"], latents=torch.zeros(1, 4, 16, 16))], ["latents", "needs"]),
    "unknown-kwarg": ([lambda r: r("a cat", foo=1)], ["foo", "clip_skip"]),
    "stock-kwarg": ([lambda r: r("a cat", guidance_rescale=0.7)], ["guidance_rescale", "CFG("]),
    "output-type": ([lambda r: r("a cat", output_type="numpy")], ["output_type", "np"]),
    "prompt-empty": ([lambda r: r([])], ["prompt", "empty list"]),
    "prompt-type": ([lambda r: r(123), lambda r: r(["a cat", None])], ["prompt", "string"]),
    "latents-numpy": ([lambda r: r("a cat", latents=np.zeros((1, 4, 16, 16), np.float32))],
                      ["latents must be a torch.Tensor", "torch.from_numpy"]),
    "latents-nan": ([lambda r: r("a cat", latents=torch.full((1, 4, 16, 16), NAN)),
                     lambda r: r("a cat", latents=torch.zeros(1, 4, 16, 16).index_fill_(3, torch.tensor([5]), INF))],
                    ["latents hold", "non-finite"]),
    "final-nonfinite": ([lambda r: _with_nan_weight(r, lambda: r("a cat", num_inference_steps=2))],
                        ["denoised latents hold", "non-finite", "no image was decoded"]),
    "apg-momentum": ([lambda r: APG(momentum=5), lambda r: APG(momentum=-1.0)], ["momentum", "(-1, 1)"]),
    "guidance-object": ([lambda r: from_pipe(r.pipe, guidance=object()), lambda r: from_pipe(r.pipe, guidance="cfg")],
                        ["not a guidance object", "CFG(7.5)"]),
}


def _with_nan_weight(run, call):
    """``call()`` with one UNet weight set to NaN (a broken checkpoint), restored afterwards."""
    weight = run.pipe.unet.conv_out.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0, 0] = NAN
    try:
        return call()
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("case", list(API))
def test_api_bad_input(run, case):
    calls, words = API[case]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call(run)
        for word in words:
            assert word in str(err.value), (case, str(err.value))


def test_valid_input_still_runs(run):
    out = run(["a cat", "a dog"], num_inference_steps=2, height=34, width=32, latents=torch.zeros(2, 4, 17, 16),
              output_type="np", guidance_scale=-2.0)
    assert out.images.shape == (2, 34, 32, 3) and out.nfe == 4


# id -> (argv after `sample --model tiny-sd --prompt a --steps 2`, words in the error, fails before the model loads)
CLI = {
    "cli-scale-nan": (["--guidance-scale", "nan"], ["--guidance-scale", "finite"], True),
    "cli-steps-zero": (["--steps", "0"], ["--steps", "positive integer"], True),
    "cli-size-odd": (["--height", "33"], ["--height=33", "32 or 34"], False),
    "cli-opt-unknown": (["--scheduler-opt", "foo=1"], ["foo", "beta_start"], False),
    "cli-opt-type": (["--scheduler", "unipc", "--scheduler-opt", "beta_start=abc"], ["beta_start='abc'", "float"], False),
    "cli-sampler-opt": (["--particles", "4"], ["--particles", "--sampler"], True),
    "cli-out-unwritable": (["--out", "{tmp}/a-file/out"], ["--out", "cannot write"], True),
    "cli-out-taken": (["--out", "{tmp}/taken"], ["already holds a run", "--force"], True),
    "cli-model-missing": (["--model", "./no/such/dir"], ["no such folder"], False),
    "cli-model-pickle": (["--model", "{tmp}/pickled"], ["safetensors"], False),
    "cli-device-foo": (["--device", "foo"], ["--device", "cpu"], True),
    "cli-device-cuda": (["--device", "cuda"], ["no CUDA GPU", "--device cpu"], True),
    "cli-scheduler-flow": (["--scheduler", "flow-euler"], ["FlowMatchEulerDiscreteScheduler", "flow-matching",
                                                           "--scheduler ddim"], False),
    "cli-lcm-negative": (["--model", "testbed-lcm", "--negative-prompt", "blurry"], ["negative_prompt", "guidance-distilled"],
                         False),
    "cli-lcm-stop": (["--model", "testbed-lcm", "--guidance-opt", "stop=0.5"], ["stop=0.5", "guidance-distilled"], False),
    "cli-lcm-rescale": (["--model", "testbed-lcm", "--guidance-opt", "guidance_rescale=0.7"],
                        ["guidance_rescale=0.7", "guidance-distilled"], False),
}


@pytest.mark.parametrize("case", list(CLI))
def test_cli_bad_input(case, tmp_path, capsys, monkeypatch):
    extra, words, before_loading = CLI[case]
    if case == "cli-device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "grid.png").write_bytes(b"earlier run")
    if case == "cli-model-pickle":
        tiny_pipeline("sd").save_pretrained(tmp_path / "pickled", safe_serialization=False)
    if before_loading:
        def no_loading(*a, **k):
            raise AssertionError("the model was loaded before the bad input was found")
        monkeypatch.setattr("diffplug.pipelines.registry.load_pipeline", no_loading)
    argv = ["sample", "--model", "tiny-sd", "--prompt", "a", "--steps", "2", "--out", str(tmp_path / "out")]
    argv += [a.format(tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("diffplug sample: error:")]
    assert len(line) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in line[0], (case, line[0])
    assert (tmp_path / "taken" / "grid.png").read_bytes() == b"earlier run"
    assert not (tmp_path / "out").exists(), "a failed run leaves no output folder"


# id -> (argv after `finetune`, words in the error); every case fails before any model loads
FINETUNE = {
    "ft-prompts-missing": (["find", "--reward", "testbed", "--prompts", "{tmp}/missing.txt"],
                           ["prompts", "missing.txt", "does not exist"]),
    "ft-pso-prompts-missing": (["pso", "--mode", "online", "--reward", "testbed", "--prompts", "{tmp}/missing.txt"],
                               ["prompts", "missing.txt", "does not exist"]),
    "ft-data-missing": (["dpo", "--data", "{tmp}/pairs.jsonl"], ["data", "pairs.jsonl", "does not exist"]),
    "ft-unread-data": (["pso", "--mode", "online", "--reward", "testbed", "--data", "testbed:emoji-heldout"],
                       ["data:", "mode=online", "does not read"]),
    "ft-unread-reward": (["pso", "--mode", "offline", "--data", "testbed:emoji-heldout", "--reward", "testbed"],
                         ["reward:", "mode=offline", "does not read"]),
    "ft-prompt-and-prompts": (["find", "--reward", "testbed", "--prompt", "a photo of a bag", "--prompts", "a,b"],
                              ["prompt, prompts", "one of them"]),
    "ft-adapter-unread": (["deediff", "--adapter", "sara"], ["adapter:", "`deediff` does not read"]),
}


@pytest.mark.parametrize("case", list(FINETUNE))
def test_finetune_bad_input(case, tmp_path, capsys, monkeypatch):
    extra, words = FINETUNE[case]

    def no_training(*a, **k):
        raise AssertionError("the trainer (and its model) started before the bad input was found")

    monkeypatch.setattr("diffplug.finetune.trainer.Trainer", no_training)
    argv = ["finetune", *[a.format(tmp=tmp_path) for a in extra], "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("diffplug finetune")]
    assert len(line) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in line[0], (case, line[0])
    assert "use_lora" not in line[0]
    assert not (tmp_path / "out").exists()


def test_finetune_reads_table_is_in_readme_and_help(capsys):
    from diffplug.finetune.cli import READS

    text = README.read_text()
    section = text[text.index("| method | mode | reads |"):]
    section = section[: section.index("\n\n")]
    rows = [tuple(c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|")))
            for line in section.splitlines()[2:]]
    assert rows == [(m, mode or "-", ", ".join(reads)) for (m, mode), reads in READS.items()]
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for (m, mode), reads in READS.items():
        assert f"{m} {mode or '-'} {', '.join(reads)}" in help_text
    assert "Exit status: 0" in help_text


def test_force_replaces_the_earlier_run_only(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("000.png", "001.png", "002.png", "grid.png", "settings.json", "notes.txt"):
        (out / name).write_text("earlier")
    argv = ["sample", "--model", "tiny-sd", "--prompt", "a", "--steps", "2", "--num-images", "2", "--out", str(out)]
    assert main(argv) == 2 and (out / "000.png").read_text() == "earlier"
    capsys.readouterr()
    assert main(argv + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png", "notes.txt", "settings.json"]
    assert (out / "notes.txt").read_text() == "earlier"
    captured = capsys.readouterr()
    assert "replaced an earlier run's 5 files" in captured.out
    assert "2 images, 2 steps" in captured.err, "the sampling progress bar is shown"


def test_scheduler_opt_without_scheduler_applies_to_the_models_own(tmp_path):
    import json

    out = tmp_path / "run"
    assert main(["sample", "--model", "tiny-sd", "--prompt", "a", "--steps", "2", "--scheduler-opt", "eta=0.5",
                 "--out", str(out)]) == 2  # DDIM's eta is a step argument, not a config key: refused
    assert main(["sample", "--model", "tiny-sd", "--prompt", "a", "--steps", "2", "--scheduler-opt", "beta_end=0.02",
                 "--out", str(out)]) == 0
    assert json.loads((out / "settings.json").read_text())["scheduler"]["config"]["beta_end"] == 0.02


def test_testbed_warning_filter_is_narrow():
    import diffplug.testbed  # noqa: F401  (installs the filter)

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(handler)
    try:
        logger.warning("Expected types for text_encoder: (<class 'CLIPTextModel'>,), got <class 'BertModel'>.")
        logger.warning("Expected types for unet: (<class 'UNet2DConditionModel'>,), got <class 'Foo'>.")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage()[:22] for r in seen] == ["Expected types for une"]


def test_every_readme_row_has_a_case():
    text = README.read_text()
    section = text[text.index("## What bad input gets"):]
    section = section[: section.find("\n## ", 4)]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M)
    assert rows and len(rows) == len(set(rows))
    assert set(rows) == set(API) | set(CLI) | set(FINETUNE)
