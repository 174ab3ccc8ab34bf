"""The root of the project's own errors."""


class DitAccelError(Exception):
    """Base class of the project's own errors; the CLIs print its message on one line and exit non-zero."""
