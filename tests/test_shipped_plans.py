"""Plans shipped in plans/ load, match the default model, and replay on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dit_accel.defaultmodel import load_default_pipeline
from dit_accel.runtime import apply_plan, fingerprint_model, load_plan

pytestmark = pytest.mark.slow  # the default model end to end, exports or subprocesses

PLANS = sorted((Path(__file__).parent.parent / "plans").glob("*.plan"))
METHODS = {"auto", "profilingdit", "adacache", "bwcache", "unicp"}


def test_every_method_has_a_shipped_plan():
    assert {p.name.split("-")[1] for p in PLANS} == METHODS


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


@pytest.mark.parametrize("path", PLANS, ids=[p.name for p in PLANS])
def test_shipped_plan_loads_matches_and_replays(path, pipe):
    plan = load_plan(path)
    assert plan.model == fingerprint_model(pipe.transformer)
    assert plan.provenance["method"] == path.name.split("-")[1]
    with apply_plan(pipe, plan):
        # Half the fitted step count: the shortest run a plan may be remapped to, to keep the test fast.
        video = pipe(
            "a large red circle moves right on a blue background",
            num_inference_steps=plan.num_inference_steps // 2,
            output_type="np",
        ).frames
    assert np.isfinite(video).all()
