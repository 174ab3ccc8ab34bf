"""dit_accel.profiler package."""
