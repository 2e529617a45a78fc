"""README's Python blocks run as written (on the testbed: no download)."""

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "testbed/README.md")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


CASES = [(name, i, code) for name in READMES for i, code in enumerate(python_blocks(ROOT / name))]


def test_the_readme_has_its_ten_lines():
    assert any("from_pipe" in code for name, _, code in CASES if name == "README.md")


@pytest.mark.parametrize("name, index, code", CASES, ids=[f"{n}:{i}" for n, i, _ in CASES])
def test_python_block_runs(name, index, code, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    namespace = {"__name__": f"readme_{index}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"{name} block {index}", "exec"), namespace)
    if "images" in namespace:  # what the block promises: images came back
        assert len(namespace["images"]) >= 1
