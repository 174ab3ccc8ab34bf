"""diffusers internals this project relies on, checked where they are read (runtime/branches.py).

If a diffusers release renames `StateManager`'s private attributes or changes how `cache_context` reaches stateful
hooks, these tests fail with a message naming the seam, before any replay or profile silently mixes CFG branches.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from dit_accel.runtime.branches import DEFAULT_BRANCH, BranchStates, StepState

PRIVATE_ATTRIBUTES = ("_context", "_state_cache", "_state_cls", "_init_args", "_init_kwargs")


def test_state_manager_still_has_the_private_attributes_branch_states_reads() -> None:
    manager = StateManager(StepState)
    missing = [name for name in PRIVATE_ATTRIBUTES if not hasattr(manager, name)]
    assert not missing, f"diffusers' StateManager lost {missing}; update runtime/branches.py and the diffusers pin"


class _RecordingHook(ModelHook):
    _is_stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.branches = BranchStates(StepState)
        self.seen: list[str] = []

    def pre_forward(self, module, *args, **kwargs):
        state = self.branches.get_state()
        state.calls += 1
        self.seen.append(self.branches.branch_name())
        return args, kwargs


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def test_cache_context_reaches_branch_states_and_keys_one_state_per_branch() -> None:
    from diffusers.models.cache_utils import CacheMixin

    class Model(_Tiny, CacheMixin):
        pass

    model = Model()
    hook = _RecordingHook()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, "recording")
    model(torch.zeros(1))
    for name in ("cond", "uncond", "cond"):
        with model.cache_context(name):
            model(torch.zeros(1))
    assert hook.seen == [DEFAULT_BRANCH, "cond", "uncond", "cond"]
    assert {name: state.calls for name, state in hook.branches.branches().items()} == {
        DEFAULT_BRANCH: 1,
        "cond": 2,
        "uncond": 1,
    }
    assert hook.branches.current_context() is None
    taken = hook.branches.take()
    assert set(taken) == {DEFAULT_BRANCH, "cond", "uncond"} and hook.branches.branches() == {}
