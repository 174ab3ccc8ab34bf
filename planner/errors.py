"""The planner's error type: every user mistake (bad profile, impossible budget, bad prompts file) is one of these."""

from dit_accel.harness.errors import DitAccelError


class PlannerError(DitAccelError):
    """A fit, inspect or validate request cannot be carried out; the message is one line naming what is wrong."""
