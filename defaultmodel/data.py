"""Procedural captioned toy videos: coloured shapes moving over a plain background.

Every sample is a pure function of an integer seed, so training can stream an unbounded
data set while evaluation uses a seed range that training never touches
(:data:`TRAIN_SEED_MIN`). Videos are ``[3, 8, 32, 32]`` float tensors in ``[-1, 1]``; the
caption follows a small grammar whose words all live in ``vocab.json`` and the label dict
says what the caption says, so generated videos can be checked automatically.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

NUM_FRAMES = 8
HEIGHT = 32
WIDTH = 32

#: Seeds below this value are held out for evaluation; training draws seeds >= it.
TRAIN_SEED_MIN = 10_000

#: Shape colours and background colours are disjoint sets, so a shape never vanishes.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (160, 60, 200),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (130, 80, 30),
    "teal": (20, 110, 120),
}
#: Every named colour, used to classify generated pixels.
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**SHAPE_COLOURS, **BACKGROUND_COLOURS}

SHAPES = ("circle", "square", "triangle")
#: Half-extent in pixels of each size (circle radius, square half-side, triangle half-width).
SIZES: dict[str, float] = {"small": 5.0, "large": 8.0}
#: Unit step (dx, dy) per direction label; image y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
    "still": (0, 0),
}
#: Speed in pixels per frame along each moving axis.
SPEEDS = (1.5, 2.0, 2.5)
#: Probability that a video shows two shapes instead of one.
TWO_SHAPE_PROB = 0.25


@dataclass(frozen=True)
class ShapeSpec:
    """One object of a scene: what it looks like and where it starts (pixel centre)."""

    shape: str
    colour: str
    size: str
    x0: float
    y0: float


@dataclass(frozen=True)
class Sample:
    """A rendered video with its caption and the structured facts the caption states."""

    video: torch.Tensor
    caption: str
    label: dict[str, Any]


def _centre_range(size: str) -> tuple[float, float]:
    """Allowed centre coordinates: shapes may touch but barely leave the frame."""
    half = SIZES[size]
    return half - 2.0, WIDTH - 1 - (half - 2.0)


def _sample_start(rng: random.Random, size: str, vx: float, vy: float) -> tuple[float, float]:
    """Pick a start centre so the centre stays inside the allowed range for all frames."""
    lo, hi = _centre_range(size)
    travel_x, travel_y = vx * (NUM_FRAMES - 1), vy * (NUM_FRAMES - 1)
    x0 = rng.uniform(max(lo, lo - travel_x), min(hi, hi - travel_x))
    y0 = rng.uniform(max(lo, lo - travel_y), min(hi, hi - travel_y))
    return x0, y0


def _sample_scene(rng: random.Random) -> tuple[list[ShapeSpec], str, str, float]:
    """Draw objects, background, direction and speed; returns (objects, background, direction, speed)."""
    background = rng.choice(sorted(BACKGROUND_COLOURS))
    direction = rng.choice(list(DIRECTIONS))
    speed = 0.0 if direction == "still" else rng.choice(SPEEDS)
    vx, vy = (d * speed for d in DIRECTIONS[direction])
    count = 2 if rng.random() < TWO_SHAPE_PROB else 1
    colours = rng.sample(sorted(SHAPE_COLOURS), count)
    objects: list[ShapeSpec] = []
    for colour in colours:
        shape, size = rng.choice(SHAPES), rng.choice(sorted(SIZES))
        for _ in range(50):
            x0, y0 = _sample_start(rng, size, vx, vy)
            if all(_apart(x0, y0, size, other) for other in objects):
                break
        else:
            continue  # no free spot: keep the scene with fewer objects
        objects.append(ShapeSpec(shape, colour, size, x0, y0))
    return objects, background, direction, speed


def _apart(x0: float, y0: float, size: str, other: ShapeSpec) -> bool:
    """True when two objects moving with the same velocity never overlap."""
    gap = SIZES[size] * math.sqrt(2) + SIZES[other.size] * math.sqrt(2) + 1.0
    return math.hypot(x0 - other.x0, y0 - other.y0) >= gap


def _coverage(spec: ShapeSpec, cx: float, cy: float) -> torch.Tensor:
    """Anti-aliased [H, W] coverage in [0, 1] of one shape centred at (cx, cy)."""
    ys = torch.arange(HEIGHT, dtype=torch.float32).view(-1, 1) - cy
    xs = torch.arange(WIDTH, dtype=torch.float32).view(1, -1) - cx
    half = SIZES[spec.size]
    if spec.shape == "circle":
        dist = torch.sqrt(xs**2 + ys**2) - half
    elif spec.shape == "square":
        dist = torch.maximum(xs.abs(), ys.abs()) - half
    else:  # upward triangle: apex at (0, -half), base from (-half, half) to (half, half)
        slope = 1.0 / math.sqrt(5.0)  # normalises the side edges (rise 2*half over run half)
        left = (-2.0 * xs - ys - half) * slope
        right = (2.0 * xs - ys - half) * slope
        dist = torch.maximum(torch.maximum(left, right), ys - half)
    return (0.5 - dist).clamp(0.0, 1.0)


def _render(objects: list[ShapeSpec], background: str, direction: str, speed: float) -> torch.Tensor:
    """Draw all frames; returns [3, F, H, W] in [-1, 1]."""
    bg = torch.tensor(BACKGROUND_COLOURS[background], dtype=torch.float32) / 127.5 - 1.0
    video = bg.view(3, 1, 1, 1).expand(3, NUM_FRAMES, HEIGHT, WIDTH).clone()
    dx, dy = DIRECTIONS[direction]
    for spec in objects:
        rgb = torch.tensor(SHAPE_COLOURS[spec.colour], dtype=torch.float32) / 127.5 - 1.0
        for f in range(NUM_FRAMES):
            alpha = _coverage(spec, spec.x0 + dx * speed * f, spec.y0 + dy * speed * f)
            video[:, f] = video[:, f] * (1 - alpha) + rgb.view(3, 1, 1) * alpha
    return video


def _phrase(obj: dict[str, str]) -> str:
    """Noun phrase of one label object, e.g. 'a small red circle'."""
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def caption_for(objects: list[dict[str, str]], background: str, direction: str) -> str:
    """Caption from the grammar for label objects (``{"shape", "colour", "size"}``); verbs agree in number."""
    subject = " and ".join(_phrase(o) for o in objects)
    plural = len(objects) > 1
    if direction == "still":
        verb = "stand still" if plural else "stands still"
    else:
        words = direction.split("-")
        verb = ("move " if plural else "moves ") + " ".join(words)
    return f"{subject} {verb} on a {background} background"


def make_sample(seed: int) -> Sample:
    """Render the video for ``seed``: same seed, same tensor, caption and label."""
    rng = random.Random(seed)
    objects, background, direction, speed = _sample_scene(rng)
    video = _render(objects, background, direction, speed)
    first = objects[0]
    label: dict[str, Any] = {
        "shape": first.shape,
        "colour": first.colour,
        "size": first.size,
        "background": background,
        "direction": direction,
        "speed": speed,
        "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size} for o in objects],
    }
    return Sample(video=video, caption=caption_for(label["objects"], background, direction), label=label)


def make_batch(seeds: list[int]) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Stack samples for ``seeds``: ([B, 3, F, H, W] videos, captions, labels)."""
    samples = [make_sample(s) for s in seeds]
    return (
        torch.stack([s.video for s in samples]),
        [s.caption for s in samples],
        [s.label for s in samples],
    )
