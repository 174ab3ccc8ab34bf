"""dit-bench: side-by-side comparison of plans against diffusers' own caches."""
