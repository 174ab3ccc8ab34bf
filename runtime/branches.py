"""Per-CFG-branch state on top of diffusers' `StateManager`: the one place that reads its private attributes.

diffusers' pipelines name the branch of each transformer call with `transformer.cache_context("cond" | "uncond")`;
its `StateManager` keeps one state object per context name. Replay and the profiler both key their state this way,
so they compose with diffusers' own caches and offloading. `StateManager` has no public accessor for the current
context or its states, so `BranchStates` reads `_context`, `_state_cache`, `_state_cls`, `_init_args` and
`_init_kwargs` here and nowhere else; `tests/test_diffusers_seams.py` fails loudly if a diffusers release renames
them (the supported range is pinned in `pyproject.toml`).
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks.hooks import BaseState, StateManager

#: Branch name of calls made outside any cache context (a pipeline that does not name its branches).
DEFAULT_BRANCH = "default"


class StepState(BaseState):
    """What every per-branch state knows: the step being run, calls seen, and the branch's name."""

    def __init__(self) -> None:
        self.step = 0
        self.calls = 0
        self.branch = DEFAULT_BRANCH

    def reset(self) -> None:
        self.__init__()


class BranchStates(StateManager):
    """diffusers' `StateManager` with one state per branch, falling back to a default branch without a context."""

    def current_context(self) -> Any:
        """diffusers' current cache context (with `name`, and `step_index`/`num_inference_steps` when set) or None."""
        return self._context

    def branch_name(self) -> str:
        """Name of the branch now running (`cond`, `uncond`, `cond_uncond`, …; `default` outside a context)."""
        return self._context.name if self._context is not None else DEFAULT_BRANCH

    def get_state(self) -> Any:
        name = self.branch_name()
        state = self._state_cache.get(name)
        if state is None:
            state = self._state_cache[name] = self._state_cls(*self._init_args, **self._init_kwargs)
        return state

    def branches(self) -> dict[str, Any]:
        """Every branch's state, by branch name."""
        return dict(self._state_cache)

    def take(self) -> dict[str, Any]:
        """Hand over every branch's state and start afresh: no states, no current context."""
        states = self._state_cache
        self._state_cache = {}
        self._context = None
        return states
