"""The export folder's format: file names, the manifest's identity and version, and how a manifest is checked.

Written by `export.exporter`, read by `export.driver`; defined only here. Standard library only, so the torch-free
driver can use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dit_accel.harness.errors import DitAccelError

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.bin"
MANIFEST_FORMAT = "dit-accel-onnx"
MANIFEST_VERSION = 1
SUPPORTED_VERSIONS = (MANIFEST_VERSION,)
CACHE_IN, CACHE_OUT, BLEND = "cache_in.", "cache_out.", "blend."


class ExportError(DitAccelError, ValueError):
    """An export cannot be written, or an export folder is missing, malformed, or fed inputs it cannot use."""


def is_export_folder(folder: str | Path) -> bool:
    """True when `folder` holds a manifest of this format (so replacing it replaces an earlier export)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, checked for format, version and step → graph consistency.

    Raises:
        ExportError: the manifest is missing, not JSON, of another format or version, or inconsistent.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} not found: is {folder} a folder written by 'dit-plan export-onnx'?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); re-export the plan") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{path} is not a dit-accel ONNX manifest")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise ExportError(
            f"{path} has manifest version {manifest.get('version')}; this driver reads {SUPPORTED_VERSIONS}"
        )
    graphs, steps = manifest.get("graphs"), manifest.get("steps")
    if not isinstance(graphs, list) or not isinstance(steps, list) or not steps:
        raise ExportError(f"{path} lists no graphs or steps")
    if any(not isinstance(s, dict) or not 0 <= s.get("graph", -1) < len(graphs) for s in steps):
        raise ExportError(f"{path} maps a step to a graph it does not list")
    return manifest
