"""torch.compile with a plan: one graph per distinct action set, no recompilation, the output of eager replay.

Graphs are counted by a backend that runs each captured graph as it is (no code generation): what these tests
check is what Dynamo captures and guards on, and inductor would cost minutes per graph on a CPU.
`tests/test_runtime_advanced.py` compares the default (inductor) backend with eager.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from conftest import PIPELINES, run_pipeline
from test_runtime_advanced import static_plan
from tiny_models import run_steps, tiny_wan

from dit_accel.runtime import COMPUTE, REUSE, apply_plan
from dit_accel.runtime.replay_table import CompiledSchedule

pytestmark = pytest.mark.slow  # the default model end to end, exports or subprocesses

STEPS = [float(t) for t in np.linspace(950, 50, 12)]
BRANCHES = ("cond", "uncond")


class GraphCounter:
    """A `torch.compile` backend that counts the graphs Dynamo hands it and runs them as captured."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return graph.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Start and leave with no compiled code: every test compiles the same hook functions, which share caches."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def reuse_plan(model: torch.nn.Module, steps: int, reuse: str = "hold"):
    """Block 0 always computes; blocks 1-2 (one span) reuse in runs of two and one, so store steps recur."""
    actions = np.full((3, steps), COMPUTE, np.uint8)
    reused = [s for s in (3, 4, 6, 7, 9) if s < steps - 1]
    actions[1:, reused] = REUSE
    return static_plan(model, actions, spans=((0, 1), (1, 3)), policy={"kind": "static", "reuse": reuse})


def action_sets(plan, steps: int) -> int:
    return len(CompiledSchedule(plan, adaptive=False).action_sets(steps))


@pytest.mark.parametrize("reuse", ["hold", "extrapolate"])
def test_compiled_replay_builds_one_graph_per_action_set_and_never_recompiles(reuse):
    model = tiny_wan().eval()
    plan = reuse_plan(model, len(STEPS), reuse)
    sets = action_sets(plan, len(STEPS))
    assert sets < len(STEPS), "the plan repeats action sets, so one graph per step would show"
    with apply_plan(model, plan):
        eager = [run_steps(model, "wan", STEPS, branch) for branch in BRANCHES]
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend)
    with apply_plan(model, plan):
        first = [run_steps(compiled, "wan", STEPS, branch) for branch in BRANCHES]
        graphs = backend.graphs
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = [run_steps(compiled, "wan", STEPS, branch) for branch in BRANCHES]
    # Each new action set compiles its graph once (cond and uncond share it); with extrapolation, Dynamo may make a
    # slope symbolic and serve two action sets with one graph, hence <=.
    assert 1 < graphs <= sets
    assert backend.graphs == graphs, "the second generation compiled nothing"
    for outputs in (first, second):
        for out, expected in zip(outputs, eager, strict=True):
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_plan_applies_to_a_pipeline_whose_transformer_is_already_compiled():
    pipe = PIPELINES["wan"]()
    steps = 8
    plan = reuse_plan(pipe.transformer, steps)
    with apply_plan(pipe, plan):
        eager = run_pipeline(pipe, steps=steps)
    backend = GraphCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    with apply_plan(pipe, plan):
        first = run_pipeline(pipe, steps=steps)
        graphs = backend.graphs
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = run_pipeline(pipe, steps=steps)
    assert 1 < graphs <= action_sets(plan, steps)
    np.testing.assert_allclose(first, eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(second, eager, rtol=1e-6, atol=1e-6)
