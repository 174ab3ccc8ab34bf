"""`python -m dit_accel.defaultmodel.sample`: generate one video with the default model and write a GIF and a PNG
grid."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import load_default_pipeline
from .video_io import save_gif, save_png_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", default="a large red circle moves right on a black background")
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``dit-demo``."""
    args = parse_args(argv)
    pipe = load_default_pipeline()
    generator = torch.Generator().manual_seed(args.seed)
    frames = pipe(
        args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator
    ).frames[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gif, grid = save_gif(frames, out / "video.gif"), save_png_grid(frames, out / "frames.png")
    print(f"wrote {gif} and {grid}")


if __name__ == "__main__":
    main()
