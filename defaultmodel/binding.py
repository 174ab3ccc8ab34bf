"""Which kinds of caption words does the model use? A probe that needs no sampling.

``python -m dit_accel.defaultmodel.binding --n 32`` takes held-out videos, noises them to a few fixed
levels and measures the denoising loss twice: with the true caption and with one category of
words changed (the first object's colour, shape or size; the background; the direction of
motion, reversed). A model that reads a category predicts worse with the wrong word, so the
ratio ``changed / true`` is above 1; a ratio of 1.000 means the words of that category are
ignored. It costs a few transformer calls per video instead of a whole sampling run
(:mod:`dit_accel.defaultmodel.evaluate`), and shows whether training binds a category long before
generated videos get it right.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from typing import Any

import torch

from .data import BACKGROUND_COLOURS, DIRECTIONS, SHAPE_COLOURS, SHAPES, SIZES, caption_for, make_sample
from .model import pixels_to_latents

#: Noise levels probed: mid-way, and high where only the caption says where things go.
DEFAULT_SIGMAS = (0.5, 0.9, 0.97)


def _other(options: list[str], exclude: set[str], rng: random.Random) -> str:
    """A random option not in ``exclude``."""
    return rng.choice([o for o in options if o not in exclude])


def _change_first_object(
    key: str, options: list[str], avoid_every_object: bool
) -> Callable[[dict[str, Any], random.Random], str]:
    """A change that gives the first object another ``key`` from ``options``: not its own value, nor (when
    ``avoid_every_object``) any other object's, so a colour is never renamed into the other shape's."""

    def change(label: dict[str, Any], rng: random.Random) -> str:
        objects = [dict(o) for o in label["objects"]]
        avoid = {o[key] for o in (objects if avoid_every_object else objects[:1])}
        objects[0][key] = _other(options, avoid, rng)
        return caption_for(objects, label["background"], label["direction"])

    return change


def _change_background(label: dict[str, Any], rng: random.Random) -> str:
    background = _other(sorted(BACKGROUND_COLOURS), {label["background"]}, rng)
    return caption_for(label["objects"], background, label["direction"])


def _reverse_direction(label: dict[str, Any], _: random.Random) -> str:
    dx, dy = DIRECTIONS[label["direction"]]
    reverse = next(name for name, step in DIRECTIONS.items() if step == (-dx, -dy))
    return caption_for(label["objects"], label["background"], reverse)


#: Category -> how to change a caption's words of that category (direction: moving captions only).
CHANGES: dict[str, Callable[[dict[str, Any], random.Random], str]] = {
    "colour": _change_first_object("colour", sorted(SHAPE_COLOURS), avoid_every_object=True),
    "shape": _change_first_object("shape", list(SHAPES), avoid_every_object=False),
    "size": _change_first_object("size", sorted(SIZES), avoid_every_object=False),
    "background": _change_background,
    "direction": _reverse_direction,
}


def changed_captions(label: dict[str, Any], seed: int = 0) -> dict[str, str]:
    """One changed caption per category that applies to ``label`` (no direction for still videos)."""
    rng = random.Random(seed)
    categories = [c for c in CHANGES if c != "direction" or label["direction"] != "still"]
    return {category: CHANGES[category](label, rng) for category in categories}


@torch.no_grad()
def _loss(pipe: Any, x_t: torch.Tensor, sigma: float, target: torch.Tensor, captions: list[str]) -> float:
    """Flow-matching loss of the transformer's prediction for ``captions``."""
    embeds = pipe.encode_prompt(captions)
    timestep = torch.full((x_t.shape[0],), sigma * 1000.0)
    prediction = pipe.transformer(pipe.model_input(x_t), timestep, embeds, return_dict=False)[0]
    return float(((prediction.float() - target) ** 2).mean())


def binding_ratios(
    pipe: Any, n: int = 32, sigmas: tuple[float, ...] = DEFAULT_SIGMAS, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{category: {sigma: loss with changed words / loss with the true caption}}`` on held-out seeds ``0..n-1``.

    Each category is measured on the videos it applies to (direction: the moving ones); noise is drawn once per
    noise level from ``seed`` and shared by the true and the changed captions.
    """
    samples = [make_sample(s) for s in range(n)]
    x0 = pixels_to_latents(torch.stack([s.video for s in samples]))
    changed = [changed_captions(s.label, seed + i) for i, s in enumerate(samples)]
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, dict[str, float]] = {category: {} for category in CHANGES}
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator)
        x_t, target = (1 - sigma) * x0 + sigma * noise, noise - x0
        true_loss: dict[tuple[int, ...], float] = {}  # categories measured on the same videos share it
        for category in CHANGES:
            rows = [i for i, c in enumerate(changed) if category in c]
            if tuple(rows) not in true_loss:
                true_loss[tuple(rows)] = _loss(pipe, x_t[rows], sigma, target[rows], [samples[i].caption for i in rows])
            wrong = _loss(pipe, x_t[rows], sigma, target[rows], [changed[i][category] for i in rows])
            result[category][f"{sigma:g}"] = wrong / true_loss[tuple(rows)]
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m dit_accel.defaultmodel.binding``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="number of held-out videos (seeds 0..n-1)")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS), help="noise levels in (0, 1]")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    if not all(0.0 < s <= 1.0 for s in args.sigmas):
        p.error("--sigmas must lie in (0, 1]")

    from . import load_default_pipeline

    result = binding_ratios(load_default_pipeline(), args.n, tuple(args.sigmas))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("loss with the category's words changed / with the true caption (1.000 = words ignored)")
    print(f"{'category':12s}" + "".join(f"  sigma {s:<6g}" for s in args.sigmas))
    for category, ratios in result.items():
        print(f"{category:12s}" + "".join(f"  {ratios[f'{s:g}']:<12.3f}" for s in args.sigmas))


if __name__ == "__main__":
    main()
