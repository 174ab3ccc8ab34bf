"""The bench's error type: a bad option, file or model surfaces as one line and a non-zero exit."""

from dit_accel.harness.errors import DitAccelError


class BenchError(DitAccelError):
    """A benchmark request cannot be carried out; the message is one line naming what is wrong."""
