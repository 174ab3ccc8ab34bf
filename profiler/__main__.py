"""`python -m profiler` is `dit-profile`."""

from .cli import main

main()
