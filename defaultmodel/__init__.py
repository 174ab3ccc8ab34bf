"""The embedded default model: a tiny Wan text-to-video pipeline trained on toy shape videos.

``load_default_pipeline()`` loads the shipped weights from this package's ``weights/``
folder, offline, so the rest of the project has a real trained video DiT to profile, plan
and accelerate without downloading anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .pipeline import TinyVideoPipeline, TinyVideoPipelineOutput
from .text import TinyTextEncoder, WordTokenizer

WEIGHTS_DIR = Path(__file__).with_name("weights")

__all__ = [
    "WEIGHTS_DIR",
    "TinyTextEncoder",
    "TinyVideoPipeline",
    "TinyVideoPipelineOutput",
    "WordTokenizer",
    "load_default_pipeline",
]


def load_default_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TinyVideoPipeline:
    """The shipped default pipeline on ``device`` in ``dtype`` (no network, no path needed)."""
    if not (WEIGHTS_DIR / TinyVideoPipeline.config_name).is_file():
        raise FileNotFoundError(
            f"default model weights not found in {WEIGHTS_DIR}; reinstall the package or export them "
            "with `python -m dit_accel.defaultmodel.train --out artifacts/train --export-only`"
        )
    return TinyVideoPipeline.from_pretrained(WEIGHTS_DIR, torch_dtype=dtype).to(device)
