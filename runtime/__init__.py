"""Production runtime: the plan format, model adapters, and the hooks that replay a plan on a pipeline.

Depends on torch, diffusers, numpy and safetensors only (never on h5py, scikit-learn, matplotlib or click).

Example:
    >>> from dit_accel.runtime import apply_plan, load_plan
    >>> with apply_plan(pipe, load_plan("model.plan")):
    ...     video = pipe(prompt="a red circle moves left").frames
"""

from .adapters import ModelAdapter, fingerprint_model, get_adapter, register_adapter, supported_classes
from .errors import AdapterError, DitAccelError, PlanError
from .plan import COMPUTE, PRUNE, REUSE, ModelFingerprint, Plan, load_plan, save_plan
from .replay import PlanHandle, apply_plan

__all__ = [
    "AdapterError",
    "COMPUTE",
    "DitAccelError",
    "ModelAdapter",
    "ModelFingerprint",
    "PRUNE",
    "Plan",
    "PlanError",
    "PlanHandle",
    "REUSE",
    "apply_plan",
    "fingerprint_model",
    "get_adapter",
    "load_plan",
    "register_adapter",
    "save_plan",
    "supported_classes",
]
