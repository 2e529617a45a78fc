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
    net[0].weight.data = torch.full((3, 3), 3e38)  # the fp32 sum overflows; the values are finite
    check_finite_weights(net, path=tmp_path, what="a model folder")


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
