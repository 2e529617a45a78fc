"""samplers"""

from .dc_solver import DCDPMSolverScheduler, DCSolverScheduler  # DC-Solver (issue 6)
from .unipc import FastUniPCScheduler  # UniPC from precomputed linear rows (issue 20)
from .fkc import FKCOutput, FKCSampler, ProductGuidance, encode_condition  # Feynman-Kac correctors (issue 7)
from .early_exit import EarlyExit  # DeeDiff early exit for transformer denoisers (issue 18)

__all__ = ["DCSolverScheduler", "DCDPMSolverScheduler", "FastUniPCScheduler", "FKCSampler", "FKCOutput", "ProductGuidance",
           "encode_condition", "EarlyExit", "SAMPLERS", "get_sampler"]

# Samplers own the step for the whole batch (pipelines.loop.Sampler); name -> class, for the CLI.
SAMPLERS = {"fkc": FKCSampler}


def get_sampler(name: str, **options):
    """Build a registered sampler: ``get_sampler("fkc", num_particles=8, ess_threshold=0.5)``
    (``particles=`` is accepted for ``num_particles``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}")
    if "particles" in options:
        if "num_particles" in options:
            raise ValueError("give particles= or num_particles=, not both")
        options["num_particles"] = options.pop("particles")
    return SAMPLERS[name](**options)
