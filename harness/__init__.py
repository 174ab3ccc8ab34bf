"""What every stage shares: errors, atomic files, prompt files, pipeline loading and seeded generation, fidelity
metrics, captions, and the command-line conventions.

Nothing here imports another stage: `runtime`, `profiler`, `planner`, `export` and `bench` import from here, never
the reverse. Modules are imported one by one (this file imports none of them), so the runtime can use
`harness.files` without pulling click or torch-heavy helpers.
"""
