"""samplers"""

from .dc_solver import DCDPMSolverScheduler, DCSolverScheduler  # DC-Solver (issue 6)
