"""Error classes of the runtime: every user mistake surfaces as one of these, with a one-line message."""

from dit_accel.harness.errors import DitAccelError

__all__ = ["AdapterError", "DitAccelError", "PlanError"]


class PlanError(DitAccelError):
    """A `.plan` file or a `Plan` object is malformed, unsafe, or does not fit the model it is applied to."""


class AdapterError(DitAccelError):
    """The transformer has no model adapter, or does not match the adapter's description."""
