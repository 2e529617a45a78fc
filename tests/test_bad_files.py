"""Every file a user hands diffplug is checked before anything is applied (README: "What bad files get").

One test per README table row (the id in the first column; ``test_every_readme_row_has_a_test`` keeps
the two in step). Each was seen failing on the code before ``diffplug/checked.py``."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffplug.checked import Spec, UserFileError, check_finite_weights, read_json, read_safetensors

README = Path(__file__).resolve().parents[1] / "README.md"
NAN, INF = float("nan"), float("inf")
ROWS: dict[str, str] = {}  # id -> test function name


def row(case: str):
    def mark(fn):
        ROWS[case] = fn.__name__
        return fn
    return mark


def _raises(call, *words):
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    for word in words:
        assert word in msg, (word, msg)
    return msg


# -- the loader itself ------------------------------------------------------------------------------------

POLICY = {"mean": Spec((2, 3), torch.float32), "std": Spec((2, 3), torch.float32, positive=True)}


def _file(tmp_path, tensors, name="f.safetensors", metadata=None):
    save_file(tensors, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


@row("file-missing")
def test_missing_file_or_folder(tmp_path):
    _raises(lambda: read_safetensors(tmp_path / "nope.safetensors", POLICY, what="a policy"), "nope.safetensors",
            "no such file", "a policy")
    _raises(lambda: read_safetensors(tmp_path, POLICY, what="a policy"), "is a folder")


@row("file-truncated")
def test_truncated_file(tmp_path):
    p = _file(tmp_path, {"mean": torch.zeros(2, 3), "std": torch.ones(2, 3)})
    data = p.read_bytes()
    for cut in (4, 20, len(data) - 3):
        p.write_bytes(data[:cut])
        _raises(lambda: read_safetensors(p, POLICY, what="a policy"), str(p), "truncated", "fix:")


@row("file-huge-header")
def test_huge_header(tmp_path):
    p = tmp_path / "f.safetensors"
    p.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    _raises(lambda: read_safetensors(p, POLICY, what="a policy"), str(p), "header", "limit")


@row("file-not-safetensors")
def test_not_safetensors(tmp_path):
    p = tmp_path / "f.safetensors"
    for data in (b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]", b"\x04\x00\x00\x00\x00\x00\x00\x00{x:1", b"PK\x03\x04" * 10):
        p.write_bytes(data)
        _raises(lambda: read_safetensors(p, POLICY, what="a policy"), str(p))


@row("file-keys")
def test_keys_exactly(tmp_path):
    p = _file(tmp_path, {"mean": torch.zeros(2, 3)})
    _raises(lambda: read_safetensors(p, POLICY, what="a policy"), "missing", "'std'")
    p = _file(tmp_path, {"mean": torch.zeros(2, 3), "std": torch.ones(2, 3), "extra": torch.ones(1)})
    _raises(lambda: read_safetensors(p, POLICY, what="a policy"), "unexpected", "'extra'")
    assert set(read_safetensors(p, POLICY, what="a policy", allow_extra=True)) == {"mean", "std"}


@row("file-shape")
def test_shapes_exactly_no_broadcasting(tmp_path):
    p = _file(tmp_path, {"mean": torch.zeros(1, 3), "std": torch.ones(2, 3)})  # (1, 3) would broadcast
    _raises(lambda: read_safetensors(p, POLICY, what="a policy"), "'mean'", "(1, 3)", "(2, 3)")
    pair = {"a.index": Spec(("n",), torch.int32), "a.values": Spec(("n",), torch.float32)}
    p = _file(tmp_path, {"a.index": torch.arange(3, dtype=torch.int32), "a.values": torch.zeros(4)})
    _raises(lambda: read_safetensors(p, pair, what="an adapter"), "a.values", "does not match")


@row("file-dtype")
def test_dtype(tmp_path):
    p = _file(tmp_path, {"mean": torch.zeros(2, 3, dtype=torch.float16), "std": torch.ones(2, 3)})
    _raises(lambda: read_safetensors(p, POLICY, what="a policy"), "'mean'", "float16", "float32")


@row("file-nonfinite")
def test_nonfinite_values(tmp_path):
    for bad in (NAN, INF, -INF):
        p = _file(tmp_path, {"mean": torch.tensor([[0, bad, 0], [0, 0, 0.0]]), "std": torch.ones(2, 3)})
        _raises(lambda: read_safetensors(p, POLICY, what="a policy"), "'mean'", "non-finite", "(0, 1)")


@row("file-range")
def test_value_ranges(tmp_path):
    p = _file(tmp_path, {"mean": torch.zeros(2, 3), "std": torch.full((2, 3), -1e6)})
    _raises(lambda: read_safetensors(p, POLICY, what="a policy"), "'std'", "> 0")
    idx = {"i": Spec((3,), torch.int32, low=0, high=10, increasing=True)}
    for values, word in (([-1, 2, 3], "below"), ([1, 2, 10], "below 10"), ([3, 2, 5], "increasing"), ([2, 2, 5], "increasing")):
        p = _file(tmp_path, {"i": torch.tensor(values, dtype=torch.int32)})
        _raises(lambda: read_safetensors(p, idx, what="indices"), "'i'", word)
    p = _file(tmp_path, {"i": torch.tensor([0, 4, 9], dtype=torch.int32)})
    assert read_safetensors(p, idx, what="indices")["i"].tolist() == [0, 4, 9]


@row("json-bad")
def test_json(tmp_path):
    p = tmp_path / "s.json"
    for text, word in (('{"a": 1', "not valid JSON"), ('{"a": NaN}', "NaN"), ("[1, 2]", "not a dict"), (b"\xff\xfe", "UTF-8")):
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        _raises(lambda: read_json(p, what="a settings file"), str(p), word, "a settings file")
    p.write_text('{"a": 1}')
    assert read_json(p, what="x") == {"a": 1}


@row("weights-nonfinite")
def test_weight_scan(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    check_finite_weights({"unet": net}, path=tmp_path, what="a model folder")
    net[1].running_var[1] = INF
    _raises(lambda: check_finite_weights({"unet": net}, path=tmp_path, what="a model folder"), str(tmp_path),
            "unet.1.running_var")
    net[1].running_var[1] = 1.0
    net[0].weight.data = torch.full((3, 3), 3e38)  # large but finite
    check_finite_weights(net, path=tmp_path, what="a model folder")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        half = torch.nn.Linear(64, 64).to(dtype)
        for bad in (NAN, INF, -INF):
            half.weight.data[5, 7] = bad
            _raises(lambda: check_finite_weights({"unet": half}, path=tmp_path, what="a model folder"), "unet.weight")
            half.weight.data[5, 7] = 0
        check_finite_weights({"unet": half}, path=tmp_path, what="a model folder")


def test_every_readme_row_has_a_test():
    text = README.read_text()
    section = text[text.index("## What bad files get"):]
    section = section[: section.find("\n## ", 4)]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M)
    assert rows and len(rows) == len(set(rows))
    assert set(rows) == set(ROWS)


def test_message_names_file_what_and_fix(tmp_path):
    err = UserFileError(tmp_path / "x", "is bad", what="a thing", fix="do this")
    assert str(err) == f"{tmp_path / 'x'}: is bad; it should be a thing; fix: do this" and isinstance(err, ValueError)
    assert json.loads(json.dumps(err.path)) == str(tmp_path / "x")


# -- SaRA adapters (finetune/sara.py) ---------------------------------------------------------------------


def _rewrite(path: Path, change) -> None:
    """Apply ``change(tensors)`` to a safetensors file, keeping its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture()
def sara_adapter(tmp_path):
    import copy

    from diffplug.finetune import sara

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    base = copy.deepcopy(net)
    with torch.no_grad():
        for p in sara.prepare(net, fraction=0.3):
            p.add_(0.5)
    sara.save(net, tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _sara_load_refused(base, folder, *words):
    from diffplug.finetune import sara

    before = {k: v.clone() for k, v in base.state_dict().items()}
    _raises(lambda: sara.load(base, folder), str(folder / sara.FILE), *words)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "a refused file changed the model"


@row("sara-nan")
def test_sara_load_nan_values(sara_adapter):
    base, folder = sara_adapter
    _rewrite(folder / "sara.safetensors", lambda t: t["2.weight.values"].__setitem__(0, NAN))
    _sara_load_refused(base, folder, "'2.weight.values'", "NaN")


@row("sara-index")
def test_sara_load_bad_indices(sara_adapter):
    base, folder = sara_adapter
    path = folder / "sara.safetensors"
    good = path.read_bytes()
    for value, word in ((-1, "below"), (32, "below 32"), (10**6, "below 32")):  # 2.weight has 4 x 8 = 32 entries
        path.write_bytes(good)
        _rewrite(path, lambda t: t["2.weight.index"].__setitem__(-1, value))
        _sara_load_refused(base, folder, "'2.weight.index'", word)
    path.write_bytes(good)
    _rewrite(path, lambda t: t.__setitem__("2.weight.values", t["2.weight.values"][:-1].clone()))
    _sara_load_refused(base, folder, "'2.weight.values'")
    path.write_bytes(good)
    _rewrite(path, lambda t: t.update({"9.weight.index": t["2.weight.index"].clone(), "9.weight.values": t["2.weight.values"].clone()}))
    _sara_load_refused(base, folder, "9.weight")


# -- training checkpoints (finetune/state.py, finetune/sara.py) ------------------------------------------------

SFT = ["sft", "--data", "testbed:food-drink", "--seed", "0", "--train_batch_size", "2", "--log_every", "1",
       "--tensorboard", "false", "--learning_rate", "1e-3", "--adapter", "sara", "--sara_progressive_step", "2",
       "--sara_rank_min_dim", "16", "--checkpoint_every", "2", "--max_steps", "5"]


def _finetune(out, *extra):
    from diffplug.cli import main

    return main(["finetune", *SFT, "--output_dir", str(out), *extra])


@pytest.fixture(scope="module")
def sara_run(tmp_path_factory):
    """An uninterrupted SaRA run, 5 steps, checkpoints at steps 2 and 4 (re-selection at step 2)."""
    out = tmp_path_factory.mktemp("sara") / "run"
    assert _finetune(out) == 0
    return out


def _sara_final(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "sara.safetensors"))


@row("resume-fallback-clean")
def test_resume_latest_falls_back_from_clean_state(sara_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-2", "checkpoint-4", "config.yaml"):
        (shutil.copytree if name.startswith("c") and "." not in name else shutil.copy)(sara_run / name, out / name)
    (out / "logs.jsonl").write_text("".join((sara_run / "logs.jsonl").read_text().splitlines(True)[:4]))
    bad = out / "checkpoint-4" / "sara.safetensors"

    def out_of_range(t):  # the last selected tensor's last trained entry points past its weight
        key = sorted(k for k in t if k.endswith(".active"))[-1]
        t[key][-1] = 10**6
    _rewrite(bad, out_of_range)
    assert _finetune(out, "--resume", "latest") == 0
    a, b = _sara_final(sara_run), _sara_final(out)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} final tensors differ from the uninterrupted run"
    said = capsys.readouterr().out
    assert f"cannot resume from checkpoint-4: {bad}" in said and "below" in said, said
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in said


@row("resume-nan")
def test_resume_nan_is_named_at_resume(sara_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "run" / "checkpoint-4"
    shutil.copytree(sara_run / "checkpoint-4", folder)
    key = sorted(load_file(str(folder / "trainable.safetensors")))[3]
    _rewrite(folder / "trainable.safetensors", lambda t: t[key].view(-1).__setitem__(0, NAN))
    assert _finetune(tmp_path / "run", "--resume", str(folder)) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and "Traceback" not in err, err
    for word in (str(folder / "trainable.safetensors"), repr(key), "NaN"):
        assert word in line[0], (word, line[0])
    # the optimiser's moments and the EMA-style trees are checked the same way
    from diffplug.finetune import state as run_state

    shutil.copytree(sara_run / "checkpoint-4", tmp_path / "opt")
    opt = tmp_path / "opt" / "optimizer.safetensors"
    key = sorted(k for k in load_file(str(opt)) if "exp_avg_sq" in k)[0]
    _rewrite(opt, lambda t: t[key].view(-1).__setitem__(0, INF))
    _raises(lambda: run_state.load_tree(tmp_path / "opt", "optimizer"), str(opt), repr(key), "inf")


# -- noise policies (samplers/noise_policy.py) ----------------------------------------------------------------


def _sample_cli(tmp_path, capsys, extra, monkeypatch=None):
    """`diffplug sample` on the tiny SD pipeline -> (exit status, the error line or None)."""
    from diffplug.cli import main

    if monkeypatch is not None:
        def no_loading(*a, **k):
            raise AssertionError("the model was loaded before the bad file was found")
        monkeypatch.setattr("diffplug.pipelines.registry.load_pipeline", no_loading)
    rc = main(["sample", "--model", "tiny-sd", "--prompt", "a cat", "--steps", "2", "--device", "cpu",
               "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("diffplug sample: error:")]
    assert len(lines) <= 1
    return rc, lines[0] if lines else None


@row("policy-values")
def test_noise_policy_values(tmp_path, capsys, monkeypatch):
    from diffplug.samplers.noise_policy import NoisePolicy

    shape = (1, 4, 16, 16)  # the tiny SD pipeline's latents
    cases = {"nan-mean": (torch.zeros(shape).index_fill_(1, torch.tensor([2]), NAN), torch.ones(shape), "'mean'"),
             "inf-std": (torch.zeros(shape), torch.full(shape, INF), "'std'"),
             "negative-std": (torch.zeros(shape), torch.full(shape, -1e6), "'std'"),
             "zero-std": (torch.zeros(shape), torch.zeros(shape), "'std'")}
    for name, (mean, std, word) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        NoisePolicy(mean, std, ["a cat"], {}).save(path)
        rc, line = _sample_cli(tmp_path, capsys, ["--noise-policy", str(path)], monkeypatch)
        assert rc == 2 and str(path) in line and word in line, (name, line)
        assert not (tmp_path / "out").exists()


@row("policy-shape")
def test_noise_policy_shape(tmp_path, capsys, monkeypatch):
    from diffplug.samplers.noise_policy import FORMAT

    path = tmp_path / "p.safetensors"
    meta = {"format": FORMAT, "prompts": json.dumps(["a cat"]), "latent_shape": json.dumps([4, 16, 16])}
    for mean, std, word in ((torch.zeros(1, 4, 16, 16), torch.ones(1), "'std' has shape (1,), expected (1, 4, 16, 16)"),
                            (torch.zeros(2, 4, 16, 16), torch.ones(2, 4, 16, 16), "expected (1, 4, 16, 16)"),
                            (torch.zeros(1, 4, 16, 16).half(), torch.ones(1, 4, 16, 16), "float16, not float32")):
        save_file({"mean": mean, "std": std}, str(path), metadata=meta)
        rc, line = _sample_cli(tmp_path, capsys, ["--noise-policy", str(path)], monkeypatch)
        assert rc == 2 and str(path) in line and word in line, line


# -- model folders (pipelines/registry.py: one scan after from_pretrained) --------------------------------------


@row("model-nan")
def test_model_folder_with_nan_weights(tmp_path, capsys):
    from diffplug.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    with torch.no_grad():
        pipe.unet.conv_out.weight[0, 0, 0, 0] = NAN
    pipe.save_pretrained(tmp_path / "model")
    rc, line = _sample_cli(tmp_path, capsys, ["--model", str(tmp_path / "model")])
    assert rc == 2 and line is not None, "a NaN UNet gave an image"
    for word in (str(tmp_path / "model"), "unet.conv_out.weight", "NaN"):
        assert word in line, (word, line)
    assert not (tmp_path / "out").exists()


# -- SPO preference models (finetune/spm.py) ----------------------------------------------------------------


@row("preference-model")
def test_preference_model_files(tmp_path):
    from diffplug.finetune.spm import StepAwarePreferenceModel, load_preference_model

    folder = tmp_path / "pm"
    StepAwarePreferenceModel.from_backbone("testbed").save(folder, reward="r", steps=1)
    good = (folder / "spm.safetensors").read_bytes()
    load_preference_model(str(folder), backbone="testbed")
    weights = folder / "spm.safetensors"
    key = sorted(k for k in _read(weights) if k.startswith("t_embedder"))[0]

    def bad(change, *words):
        weights.write_bytes(good)
        change()
        _raises(lambda: load_preference_model(str(folder), backbone="testbed"), *words)
    bad(lambda: weights.write_bytes(good[: len(good) // 2]), str(weights), "truncated")
    bad(lambda: weights.write_bytes((10**12).to_bytes(8, "little") + good[8:]), str(weights), "header")
    bad(lambda: _rewrite(weights, lambda t: t.__setitem__(key, t[key][:1].clone())), str(weights), repr(key), "shape")
    bad(lambda: _rewrite(weights, lambda t: t[key].view(-1).__setitem__(0, NAN)), str(weights), repr(key), "NaN")
    bad(lambda: (folder / "spm_config.json").write_text('{"backbone": "testbed", "freq_'), str(folder / "spm_config.json"),
        "JSON")


def _read(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# -- SPO's unfinished rollout in a checkpoint (finetune/spo.py) ------------------------------------------------


@row("spo-rollout")
def test_spo_rollout_queue(tmp_path):
    from diffplug.finetune.spo import SPO

    spo = SPO.__new__(SPO)  # only the queue's file methods are used
    spo.batch_logs, spo.stats = {"valid_pair_fraction": 0.5}, {"rollouts": 1, "valid": 3, "empty_rollouts": 0}
    spo.queue = [{**{k: torch.randn(n, 4, 8, 8) for k in ("x_t_w", "x_w", "x_t_l", "x_l")}, "t": torch.tensor([10, 500, 900][:n]),
                  "weight": torch.tensor(1.0 / n), "prompts": ["a"] * n} for n in (3, 2)]
    path = tmp_path / "spo_rollout_0.safetensors"
    spo._save_queue(path)
    good, queue = path.read_bytes(), spo.queue
    spo._load_queue(path)
    assert all(torch.equal(a["x_w"], b["x_w"]) for a, b in zip(queue, spo.queue))
    for change, words in ((lambda t: t["1.x_l"].view(-1).__setitem__(3, NAN), ["'1.x_l'", "NaN"]),
                          (lambda t: t.__setitem__("0.x_w", t["0.x_w"][:, :, :4].clone()), ["'0.x_w'", "shape"]),
                          (lambda t: t.__setitem__("1.weight", torch.tensor(-1.0)), ["'1.weight'", "below"]),
                          (lambda t: t.pop("0.t"), ["missing", "'0.t'"])):
        path.write_bytes(good)
        _rewrite(path, change)
        spo.queue = "untouched"
        _raises(lambda: spo._load_queue(path), str(path), *words)
        assert spo.queue == "untouched"


# -- FID Inception weights (evals/inception.py) ----------------------------------------------------------------


@row("inception-weights")
def test_inception_weights(tmp_path, monkeypatch):
    from diffplug.evals.inception import CACHE_NAME, InceptionV3FID, load_inception

    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in InceptionV3FID().state_dict().items()}, str(path))
    good = path.read_bytes()
    assert load_inception(path).source == str(path)
    key = "Mixed_7c.branch_pool.bn.running_var"
    for change, words in ((lambda: path.write_bytes(good[: len(good) - 100]), ["truncated"]),
                          (lambda: path.write_bytes((2**40).to_bytes(8, "little") + good[8:]), ["header"]),
                          (lambda: _rewrite(path, lambda t: t.__setitem__(key, t[key][:1].clone())), [repr(key), "shape"]),
                          (lambda: _rewrite(path, lambda t: t[key].__setitem__(0, NAN)), [repr(key), "NaN"]),
                          (lambda: _rewrite(path, lambda t: t.pop(key)), ["missing", repr(key)])):
        path.write_bytes(good)
        change()
        _raises(lambda: load_inception(path), str(path), *words)
    # a damaged cache names itself and how to rebuild it
    monkeypatch.setenv("DIFFPLUG_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "inception" / CACHE_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(good[:1000])
    _raises(lambda: load_inception(), str(cached), "truncated", f"delete {cached}")


# -- reference statistics (evals/reference.py) -----------------------------------------------------------------


@row("reference-stats")
def test_reference_statistics(tmp_path):
    from types import SimpleNamespace

    from diffplug.evals.reference import reference_stats

    net = SimpleNamespace(name="testnet", protocol="native")
    f = torch.randn(5, 3)
    path = tmp_path / "stats.safetensors"
    meta = {"diffplug_eval_stats": json.dumps({"dataset": "d", "feature_network": "testnet", "protocol": "native"})}
    save_file({"sum": f.double().sum(0), "outer": f.double().T @ f.double(), "n": torch.tensor(5), "features": f},
              str(path), metadata=meta)
    good = path.read_bytes()
    assert int(reference_stats(str(path), net, need_features=True)["n"]) == 5
    for change, words in ((lambda: path.write_bytes(good[:-7]), ["truncated"]),
                          (lambda: _rewrite(path, lambda t: t["outer"].__setitem__((1, 2), NAN)), ["'outer'", "NaN"]),
                          (lambda: _rewrite(path, lambda t: t.__setitem__("n", torch.tensor(0))), ["'n'", "below"]),
                          (lambda: _rewrite(path, lambda t: t.__setitem__("n", torch.tensor(4))), ["5 feature rows", "n = 4"]),
                          (lambda: _rewrite(path, lambda t: t.__setitem__("sum", t["sum"][:2].clone())), ["'sum'", "does not match"])):
        path.write_bytes(good)
        change()
        _raises(lambda: reference_stats(str(path), net, need_features=True), str(path), *words)


# -- reward weights (evals/rewards.py) ---------------------------------------------------------------------


@row("reward-weights")
def test_aesthetic_head(tmp_path):
    from diffplug.evals.rewards import AestheticMLP, get_reward

    path = tmp_path / "head.safetensors"
    save_file(AestheticMLP(16).state_dict(), str(path))
    good = path.read_bytes()
    for change, words in ((lambda: path.write_bytes(good[:-9]), ["truncated"]),
                          (lambda: _rewrite(path, lambda t: t["layers.4.weight"].__setitem__((0, 0), NAN)), ["'layers.4.weight'", "NaN"]),
                          (lambda: _rewrite(path, lambda t: t.__setitem__("layers.7.bias", torch.zeros(3))), ["'layers.7.bias'", "(3,)"]),
                          (lambda: _rewrite(path, lambda t: t.pop("layers.6.bias")), ["missing", "'layers.6.bias'"])):
        path.write_bytes(good)
        change()
        _raises(lambda: get_reward("aesthetic", path=str(path), clip_path=str(tmp_path)), str(path), *words)


# -- a sample folder's settings.json (evals/data.py) ---------------------------------------------------------


@row("settings-json")
def test_sample_settings_json(tmp_path):
    from diffplug.evals.data import sample_manifest

    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"images": [{"file": "000.png", "prompt": "a cat"}]}))
    assert sample_manifest(tmp_path) == [{"file": "000.png", "prompt": "a cat"}]
    text = f.read_text()
    for bad, word in ((text[: len(text) // 2], "not valid JSON"), ('{"images": "000.png"}', '"images"')):
        f.write_text(bad)
        _raises(lambda: sample_manifest(tmp_path), str(f), word, "remove it")
    f.write_text('{"something": "else"}')  # a JSON file of the user's own: the folder is scored as plain images
    assert sample_manifest(tmp_path) is None


def test_read_into_is_all_or_nothing(tmp_path):
    """``read_into`` (checkpoints; the --adapter loaders): a tied tensor may be stored once, anything
    else wrong leaves the module as it was."""
    from safetensors.torch import save_model

    from diffplug.checked import read_into

    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4))
    src[2].weight = src[1].weight  # tied: save_model writes it once
    save_model(src, str(tmp_path / "m.safetensors"))
    dst = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4))
    dst[2].weight = dst[1].weight
    read_into(dst, tmp_path / "m.safetensors", what="a model")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    _rewrite(tmp_path / "m.safetensors", lambda t: t["2.bias"].__setitem__(3, NAN))
    _raises(lambda: read_into(dst, tmp_path / "m.safetensors", what="a model", fix="do X"), "'2.bias'", "do X")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
