"""`python -m dit_accel.profiler` is `dit-profile`."""

from .cli import main

main()
