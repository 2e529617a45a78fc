"""benchmarks/testbed_flux.py --scheduler: a solver swapped into the stock FluxPipeline call on the flow
testbed, scored beside FlowMatchEuler on the same seeds, and the pipeline's own scheduler given back."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_solver_rows_pair_with_euler_on_the_same_seeds(capsys):
    import testbed_flux

    testbed_flux.main(["--scheduler", "dc-solver", "--images", "10", "--steps", "3", "--scales", "5", "--batch", "10"])
    out = capsys.readouterr().out
    assert "<!-- testbed_flux.py --scheduler dc-solver: begin -->" in out
    row = re.search(r"^\| 3 \| 5 \| 10 \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \+- ([\d.]+) \|", out, re.M)
    assert row, out
    ours, euler, gain, se = map(float, row.groups())
    assert gain == pytest.approx(ours - euler, abs=1e-3)
    assert 0 <= se <= 0.5 and 0 <= ours <= 1 and 0 <= euler <= 1


def test_solver_section_gives_the_stock_scheduler_back():
    import testbed_flux
    from diffplug import testbed

    pipe = testbed.load("flux")
    pipe.set_progress_bar_config(disable=True)
    before = type(pipe.scheduler)
    args = testbed_flux.argparse.Namespace(scheduler="unipc", images=10, steps=[2], scales=[3.0], seed=0, batch=10)
    testbed_flux.solver_section(pipe, testbed.load_classifier(), args)
    assert type(pipe.scheduler) is before


def test_fid_and_scheduler_together_is_an_error(capsys):
    import testbed_flux

    with pytest.raises(SystemExit):
        testbed_flux.main(["--fid", "10", "--scheduler", "unipc"])
    assert "--fid and --scheduler" in capsys.readouterr().err
