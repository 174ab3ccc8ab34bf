"""Planner: reads profiles, fits acceleration plans (caching, pruning, adaptive policies), inspects and validates them.

Example:
    >>> from dit_accel.planner import FitOptions, fit_plan
    >>> plan = fit_plan(["wan.h5"], FitOptions(method="auto", target_speedup=2.0))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import PlannerError
    from .labels import BlockLabels, fit_labels
    from .methods import METHODS, PLANNER_VERSION, FitOptions, fit_plan, fit_profiles
    from .pca import PcaBases, fit_pca_bases
    from .predict import Predictor, predictor_from_plan
    from .profiles import ProfileSet, load_profiles
    from .solver import Budget, greedy_schedule, restore_schedule
    from .summary import plan_report, render_report
    from .validate import PipelineRunner, ValidationReport, tighten_plan, validate_plan

#: Public name → the module that defines it. Imported on first use (PEP 562), so that `dit-plan --help`, which
#: imports `dit_accel.planner.cli` and therefore this package, does not import torch through the fitting modules.
_SOURCES = {
    "PlannerError": "errors",
    "BlockLabels": "labels",
    "fit_labels": "labels",
    "METHODS": "methods",
    "PLANNER_VERSION": "methods",
    "FitOptions": "methods",
    "fit_plan": "methods",
    "fit_profiles": "methods",
    "PcaBases": "pca",
    "fit_pca_bases": "pca",
    "Predictor": "predict",
    "predictor_from_plan": "predict",
    "ProfileSet": "profiles",
    "load_profiles": "profiles",
    "Budget": "solver",
    "greedy_schedule": "solver",
    "restore_schedule": "solver",
    "plan_report": "summary",
    "render_report": "summary",
    "PipelineRunner": "validate",
    "ValidationReport": "validate",
    "tighten_plan": "validate",
    "validate_plan": "validate",
}

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


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return __getattr__("PLANNER_VERSION")
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
