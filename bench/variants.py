"""What the bench compares: the un-accelerated baseline, plans (given or fitted) and peer caches, as variants.

A variant is one row of the report: a name, the curve it belongs to (`method`), its settings as plain data, and how
to switch it on around a generation (`activated`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dit_accel.planner.closed_loop import ClosedLoop
from dit_accel.planner.errors import PlannerError
from dit_accel.planner.methods import FitOptions, fit_profiles
from dit_accel.planner.profiles import ProfileSet
from dit_accel.runtime.adapters import get_adapter
from dit_accel.runtime.errors import PlanError
from dit_accel.runtime.plan import Plan, load_plan
from dit_accel.runtime.replay import apply_plan, check_plan_matches
from dit_accel.runtime.replay_table import remap_actions

from .peers import PEERS, peer_enabled, peer_settings

BASELINE = "baseline"
FIT_PRESETS = ("profilingdit", "adacache", "bwcache", "unicp")


@dataclass
class Variant:
    """One benchmarked configuration. `kind` is baseline, plan or peer; `hooked` counts a peer's diffusers hooks."""

    name: str
    method: str
    kind: str
    setting: dict[str, Any]
    plan: Plan | None = None
    hooked: int | None = None
    error: str | None = None
    plan_file: str | None = field(default=None, repr=False)


def baseline_variant() -> Variant:
    """The un-accelerated pipeline, every other row's reference."""
    return Variant(BASELINE, BASELINE, BASELINE, {})


@contextlib.contextmanager
def activated(variant: Variant, pipe: Any, transformer: torch.nn.Module) -> Iterator[None]:
    """Switch the variant on for the duration of the block (nothing for the baseline)."""
    if variant.kind == "plan":
        with apply_plan(pipe, variant.plan):
            yield
    elif variant.kind == "peer":
        with peer_enabled(transformer, variant.setting) as hooked:
            variant.hooked = hooked
            yield
    else:
        yield


def check_plan(plan: Plan, transformer: torch.nn.Module, steps: int, source: str) -> None:
    """Refuse, before anything runs, a plan for another model or one that cannot be remapped to `steps`."""
    try:
        check_plan_matches(plan, transformer, get_adapter(transformer))
        remap_actions(plan.actions, steps)
    except PlanError as exc:
        raise PlanError(f"{source}: {exc}") from None


def plan_variant(plan: Plan, name: str, setting: dict[str, Any], plan_file: str | None = None) -> Variant:
    """A plan's row: its curve is the planner method that made it (from its provenance)."""
    method = str(plan.provenance.get("method", "plan"))
    info = {
        **setting,
        "policy": plan.policy.get("kind"),
        "predicted_speedup": plan.predicted.get("speedup"),
        "fitted_steps": plan.num_inference_steps,
    }
    return Variant(name, method, "plan", info, plan=plan, plan_file=plan_file)


def file_plans(paths: Sequence[str]) -> list[Variant]:
    """Variants for `--plan` files (unreadable or invalid files raise PlanError with one line)."""
    return [plan_variant(load_plan(path), Path(path).name, {"source": str(path)}) for path in paths]


def fitted_plans(
    profiles: ProfileSet, budgets: Sequence[float], presets: Sequence[str], closed_loop: ClosedLoop | None = None
) -> tuple[list[Variant], dict[str, str]]:
    """`auto` at every budget (measured by `closed_loop` when given) and each preset at its paper defaults; a fit the
    planner refuses is reported, not fatal."""
    requests = [(f"auto @{b:g}x", "auto", b) for b in budgets] + [(p, p, None) for p in presets]
    source = "fitted from " + ", ".join(Path(s.path).name for s in profiles.sources)
    variants, refused = [], {}
    for name, method, budget in requests:
        try:
            loop = closed_loop if method == "auto" else None
            plan = fit_profiles(profiles, FitOptions(method=method, target_speedup=budget), loop)
        except PlannerError as exc:
            refused[name] = str(exc)
            continue
        slug = name.replace(" @", "-").replace(" ", "-")
        variants.append(
            plan_variant(plan, name, {"source": source, "target_speedup": budget}, plan_file=f"plans/{slug}.plan")
        )
    return variants, refused


def peer_variants(
    name: str,
    values: Sequence[float],
    transformer: torch.nn.Module,
    steps: int,
    mag_ratios: Sequence[float] | None,
    sweep: Sequence[Sequence[tuple[str, Any]]] = ((),),
) -> list[Variant]:
    """One variant per grid value of a peer and entry of its second-knob `sweep`."""
    knob = PEERS[name].knob
    variants = []
    for overrides in sweep:
        extra = "".join(f", {key}={value:g}" for key, value in overrides)
        for value in values:
            setting = peer_settings(name, value, transformer, steps, mag_ratios, overrides)
            variants.append(Variant(f"{name} {knob}={setting[knob]:g}{extra}", name, "peer", setting))
    return variants
