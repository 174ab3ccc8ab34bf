"""Planner: reads profiles, fits acceleration plans (caching, pruning, adaptive policies), inspects and validates them.

Example:
    >>> from dit_accel.planner import FitOptions, fit_plan
    >>> plan = fit_plan(["wan.h5"], FitOptions(method="auto", target_speedup=2.0))
"""

from .errors import PlannerError
from .labels import BlockLabels, fit_labels
from .methods import METHODS, PLANNER_VERSION, FitOptions, fit_plan, fit_profiles
from .pca import PcaBases, fit_pca_bases
from .predict import Predictor, predictor_from_plan
from .profiles import ProfileSet, load_profiles
from .solver import Budget, greedy_schedule, restore_schedule
from .summary import plan_report, render_report
from .validate import PipelineRunner, ValidationReport, tighten_plan, validate_plan

__version__ = PLANNER_VERSION

__all__ = [
    "BlockLabels",
    "Budget",
    "FitOptions",
    "METHODS",
    "PLANNER_VERSION",
    "PcaBases",
    "PipelineRunner",
    "PlannerError",
    "Predictor",
    "ProfileSet",
    "ValidationReport",
    "fit_labels",
    "fit_pca_bases",
    "fit_plan",
    "fit_profiles",
    "greedy_schedule",
    "load_profiles",
    "plan_report",
    "predictor_from_plan",
    "render_report",
    "restore_schedule",
    "tighten_plan",
    "validate_plan",
]
