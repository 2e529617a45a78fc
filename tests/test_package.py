"""Packaging: the repo root builds into one `diffplug` package holding every subpackage."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("samplers", "guidance", "pipelines", "finetune", "evals", "testbed")


def test_subpackages_import_under_diffplug():
    import diffplug

    for name in SUBPACKAGES:
        module = __import__(f"diffplug.{name}", fromlist=["_"])
        assert Path(module.__file__).parent.name == name


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list tracked files")
def test_wheel_contains_every_subpackage(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("diffplug-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SUBPACKAGES:
        assert f"diffplug/{name}/__init__.py" in names, name
    assert "diffplug/pipelines/loop.py" in names and "diffplug/cli.py" in names
    assert "diffplug/samplers/dc_solver_cpr_sd21.json" in names  # data the code loads
    shipped = {n for n in names if n.startswith("diffplug/testbed/weights/")}
    tracked = {f"diffplug/{f}" for f in files if f.startswith("testbed/weights/") and not f.endswith(".md")}
    assert tracked <= shipped
    assert not any(n.startswith(("guidance/", "pipelines/", "tests/")) for n in names), "no top-level shadowing packages"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "diffplug = diffplug.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
