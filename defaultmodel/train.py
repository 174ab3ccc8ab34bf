"""Train the default model with flow matching on procedurally generated videos.

``python -m dit_accel.defaultmodel.train --out artifacts/train --minutes 70`` trains for a wall-clock
budget and stops by itself; rerunning the same command resumes from ``<out>/latest.pt``
(weights, EMA weights, optimizer, step and every RNG state, written atomically every few
minutes and at the end). ``--export-only`` writes the latest checkpoint's EMA weights as a
pipeline folder (default: the package's ``weights/``) for :func:`dit_accel.defaultmodel.load_default_pipeline`.

How the current checkpoint was trained (batch 16, lr 5e-4 throughout; each phase resumed the last):

1. steps 0-6,180: no position channels, no direction head, ``--uniform-frac 0.3``. Colours,
   shapes, sizes and backgrounds were bound; direction words were not (loss ratio 1.000).
2. steps 6,180-6,900: position channels added (:func:`_widen_patch_embedding`),
   ``--uniform-frac 0.5``; 6,900-7,880: ``--uniform-min 0.7``. Still ratio 1.000.
3. steps 7,880-11,644: ``--direction-weight 0.1`` (:class:`DirectionHead`); the first direction
   signal appeared within 200 steps. The shipped weights are the EMA of step 11,644
   (evaluation on 64 held-out captions: foreground, background and direction all 100 %).

Training from scratch with today's defaults takes a different, untested path to a similar model.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_accel.harness.files import atomic_path

from .data import DIRECTIONS, TRAIN_SEED_MIN, make_batch
from .model import WAN_CONFIG, build_text_encoder, build_transformer, pixels_to_latents, with_positions
from .text import WordTokenizer

CHECKPOINT_NAME = "latest.pt"
LOG_NAME = "loss.csv"
PACKAGE_WEIGHTS = Path(__file__).with_name("weights")


class ThreadGovernor:
    """Chooses torch's CPU thread count from how busy the rest of the machine is.

    On a small shared machine, OpenMP threads that wait for a descheduled peer make a step
    several times slower (measured: 2 threads ~5x slower than 1 while another process ran),
    so training uses one thread while other processes need more than half a core and all
    ``max_threads`` otherwise. Without Linux ``/proc`` it keeps ``max_threads``.
    """

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self.threads = max_threads
        self.ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, int, int] | None:
        """(wall time, machine busy ticks, this process's ticks), or None without /proc."""
        try:
            cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in cpu[:8])
        return time.monotonic(), user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])

    def update(self) -> int:
        """Re-measure the other processes' CPU use since the last call and set the thread count."""
        now = self._sample()
        if now is None or self.last is None:
            return self.threads
        wall = now[0] - self.last[0]
        others = ((now[1] - self.last[1]) - (now[2] - self.last[2])) / self.ticks_per_s / max(wall, 1e-6)
        self.last = now
        threads = 1 if others > 0.5 else self.max_threads
        if threads != self.threads:
            print(f"other processes use {others:.1f} cores: training on {threads} thread(s)", flush=True)
            self.threads = threads
            torch.set_num_threads(threads)
        return threads


#: Class index of every direction label, for the direction head.
DIRECTION_INDEX = {name: i for i, name in enumerate(DIRECTIONS)}
#: Block whose output the direction head reads (two cross-attentions in).
DIRECTION_HEAD_BLOCK = 1


class DirectionHead(nn.Module):
    """Training-only linear classifier of the caption's motion direction from one block's mean token.

    Why: the denoiser learned colours, shapes and sizes but gave every direction word the same
    effect (the loss with a reversed direction equalled the true one to 3 decimals, 6,000+
    steps). Using a direction word pays off only where the model also places things by
    position and time, and placing them pays off only once the word is read, so neither
    starts. This head rewards carrying the direction into the video tokens on its own; it
    is not part of the exported model.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, len(DIRECTIONS))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Direction logits for ``[B, width]`` pooled block outputs."""
        return self.linear(pooled)


class Trainer:
    """Holds the models, EMA copies, optimizer and RNGs; one :meth:`step` is one update."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.args = args
        self.tokenizer = WordTokenizer.from_package()
        self.model = nn.ModuleDict(
            {"transformer": build_transformer(), "text_encoder": build_text_encoder(self.tokenizer)}
        )
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
        self.direction_head = DirectionHead(WAN_CONFIG["num_attention_heads"] * WAN_CONFIG["attention_head_dim"])
        self.head_optimizer = torch.optim.AdamW(self.direction_head.parameters(), lr=args.lr, betas=(0.9, 0.99))
        self.noise_rng = torch.Generator().manual_seed(args.seed)
        self.seed_rng = random.Random(args.seed)
        self.step_count = 0
        self.warmup_from = 0  # step at which the current optimizer state started

    def lr_at(self, step: int) -> float:
        """Linear warmup, then constant (EMA does the averaging)."""
        return self.args.lr * min(1.0, (step - self.warmup_from + 1) / self.args.warmup)

    def sample_sigmas(self, n: int) -> torch.Tensor:
        """Noise levels: logit-normal, mixed with uniform so the extremes are trained too."""
        logit_normal = torch.sigmoid(torch.randn(n, generator=self.noise_rng))
        uniform = self.args.uniform_min + (1 - self.args.uniform_min) * torch.rand(n, generator=self.noise_rng)
        pick_uniform = torch.rand(n, generator=self.noise_rng) < self.args.uniform_frac
        return torch.where(pick_uniform, uniform, logit_normal).clamp(1e-3, 1.0)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fresh batch of (latents, token ids, direction index or -1 where the caption was dropped)."""
        seeds = [self.seed_rng.randrange(TRAIN_SEED_MIN, 2**31) for _ in range(self.args.batch_size)]
        videos, captions, labels = make_batch(seeds)
        dropped = [self.seed_rng.random() < self.args.caption_dropout for _ in captions]
        captions = ["" if drop else c for c, drop in zip(captions, dropped)]
        directions = [-1 if drop else DIRECTION_INDEX[lab["direction"]] for lab, drop in zip(labels, dropped)]
        return pixels_to_latents(videos), self.tokenizer(captions), torch.tensor(directions)

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's velocity prediction and the tokens leaving block :data:`DIRECTION_HEAD_BLOCK` (bf16)."""
        transformer = self.model["transformer"]
        features: list[torch.Tensor] = []
        handle = transformer.blocks[DIRECTION_HEAD_BLOCK].register_forward_hook(lambda m, a, out: features.append(out))
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                text = self.model["text_encoder"](ids)
                pred = transformer(with_positions(x_t), sigma * 1000, text, return_dict=False)[0]
        finally:
            handle.remove()
        return pred, features[0]

    def step(self) -> float:
        """One optimisation step of the flow-matching loss (+ the direction head's); returns the flow loss."""
        x0, ids, directions = self.batch()
        noise = torch.randn(x0.shape, generator=self.noise_rng)
        sigma = self.sample_sigmas(x0.shape[0])
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        pred, features = self.predict(x_t, sigma, ids)
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        captioned = directions >= 0
        logits = self.direction_head(features.float().mean(dim=1)[captioned])
        head_loss = torch.nn.functional.cross_entropy(logits, directions[captioned]) if captioned.any() else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        (loss + self.args.direction_weight * head_loss).backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.optimizer.step()
        self.head_optimizer.step()
        self.update_ema()
        self.step_count += 1
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA with a warmup so early weights are not frozen in by a high decay."""
        decay = min(self.args.ema_decay, (1 + self.step_count) / (10 + self.step_count))
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1 - decay)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "direction_head": self.direction_head.state_dict(),
            "head_optimizer": self.head_optimizer.state_dict(),
            "step": self.step_count,
            "warmup_from": self.warmup_from,
            "noise_rng": self.noise_rng.get_state(),
            "seed_rng": self.seed_rng.getstate(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a checkpoint from before the position channels is widened."""
        widened = _widen_patch_embedding(state["model"], self.model) | _widen_patch_embedding(state["ema"], self.ema)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if widened:  # Adam's moments no longer match the weight's shape: restart them (warmup runs again)
            print("checkpoint predates the position channels: their weights start from a fresh init", flush=True)
            self.warmup_from = state["step"]
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            self.warmup_from = state.get("warmup_from", 0)
        if "direction_head" in state:  # checkpoints from before the head start it fresh
            self.direction_head.load_state_dict(state["direction_head"])
            self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.step_count = state["step"]
        self.noise_rng.set_state(state["noise_rng"])
        self.seed_rng.setstate(state["seed_rng"])
        torch.set_rng_state(state["torch_rng"])


def _widen_patch_embedding(state: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Widen a saved patch-embedding weight that has fewer input channels than ``model``'s.

    Lets training continue from a checkpoint written before the position channels existed:
    the saved channels keep their weights, the new ones take ``model``'s fresh initialisation.
    Zero weights would keep the old function exactly, but were measured to stay unused: after
    1,000 steps they had grown to 1 % of the other weights and the loss still did not depend
    on the direction word, because using positions pays only once the caption's direction
    is read too (and vice versa). Returns whether anything was widened.
    """
    key = "transformer.patch_embedding.weight"
    target = model.state_dict()[key]
    saved = state[key]
    if saved.shape == target.shape:
        return False
    padded = target.clone()
    padded[:, : saved.shape[1]] = saved
    state[key] = padded
    return True


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` via a temporary file so a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    """The latest checkpoint in ``out``, or None when training has not started."""
    path = out / CHECKPOINT_NAME
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def train(args: argparse.Namespace) -> None:
    """Run (or resume) training until the wall-clock budget or step limit is spent."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(args)
    state = load_checkpoint(out)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"resumed at step {trainer.step_count}", flush=True)
    log_path = out / LOG_NAME
    if not log_path.exists():
        log_path.write_text("step,loss,lr,elapsed_s\n")
    start = last_save = time.monotonic()
    losses: list[float] = []
    governor = ThreadGovernor(torch.get_num_threads())
    while time.monotonic() - start < args.minutes * 60 and trainer.step_count < args.max_steps:
        losses.append(trainer.step())
        if trainer.step_count % args.threads_every == 0:
            governor.update()
        if trainer.step_count % args.log_every == 0:
            line = (
                f"{trainer.step_count},{sum(losses) / len(losses):.5f},"
                f"{trainer.lr_at(trainer.step_count):.2e},{time.monotonic() - start:.1f}"
            )
            with log_path.open("a") as f:
                f.write(line + "\n")
            print(line, flush=True)
            losses.clear()
        if time.monotonic() - last_save > args.save_every_min * 60:
            save_atomic(trainer.state_dict(), out / CHECKPOINT_NAME)
            last_save = time.monotonic()
    save_atomic(trainer.state_dict(), out / CHECKPOINT_NAME)
    print(f"stopped at step {trainer.step_count} after {time.monotonic() - start:.0f}s", flush=True)


def export(out: Path, dest: Path) -> None:
    """Save the latest checkpoint's EMA weights as a pipeline folder at ``dest``."""
    from .pipeline import TinyVideoPipeline

    state = load_checkpoint(out)
    if state is None:
        raise FileNotFoundError(f"no checkpoint {out / CHECKPOINT_NAME}")
    pipe = TinyVideoPipeline.from_scratch()
    ema = nn.ModuleDict({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})
    ema.load_state_dict(state["ema"])
    pipe.save_pretrained(dest)
    for path in dest.rglob("*"):  # safetensors writes 0600 files; installed data must be readable
        if path.is_file():
            path.chmod(0o644)
    print(f"exported step {state['step']} EMA weights to {dest}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults are the shipped model's settings)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="artifacts/train", help="checkpoint and log folder")
    p.add_argument("--minutes", type=float, default=70.0, help="wall-clock budget of this run")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--uniform-frac", type=float, default=0.5, help="share of noise levels drawn uniformly")
    p.add_argument(
        "--uniform-min",
        type=float,
        default=0.7,
        help="lower end of the uniform noise levels; raise it to train more at high noise, where "
        "only the caption can say which way things move",
    )
    p.add_argument(
        "--direction-weight",
        type=float,
        default=0.1,
        help="weight of the training-only direction head's loss (0 from step 0 to about 7,800)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads-every", type=int, default=3, help="steps between thread-count checks")
    p.add_argument("--save-every-min", type=float, default=5.0)
    p.add_argument("--export-only", action="store_true", help="export EMA weights and exit")
    p.add_argument("--export-to", default=str(PACKAGE_WEIGHTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m dit_accel.defaultmodel.train``."""
    args = parse_args(argv)
    if args.export_only:
        export(Path(args.out), Path(args.export_to))
    else:
        train(args)


if __name__ == "__main__":
    main()
