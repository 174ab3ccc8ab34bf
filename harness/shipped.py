"""The plans shipped with the package (`plans/*.plan`: fitted on the embedded default model), wherever it is installed.

In a checkout (and an editable install) they are the repository's `plans/` folder; in a wheel, `pyproject.toml`
packs that folder as `dit_accel/plans/`. Both sit one level above this package's folder, so one rule finds them.

Example:
    >>> from dit_accel.runtime import apply_plan, load_plan
    >>> plan = load_plan(shipped_plan("default-auto-2x"))
"""

from __future__ import annotations

from pathlib import Path

from .errors import DitAccelError

#: The folder that holds the shipped plans (repository checkout or installed wheel).
PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"


def shipped_plans() -> list[Path]:
    """Every shipped `.plan` file, sorted by name."""
    return sorted(PLANS_DIR.glob("*.plan"))


def shipped_plan(name: str) -> Path:
    """The shipped plan called `name` (with or without `.plan`), e.g. `default-auto-2x`."""
    path = PLANS_DIR / (name if name.endswith(".plan") else f"{name}.plan")
    if not path.is_file():
        known = ", ".join(p.stem for p in shipped_plans()) or "none"
        raise DitAccelError(f"no shipped plan {name!r} (shipped: {known})")
    return path
