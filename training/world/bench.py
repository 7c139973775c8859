"""Renderer speed on one core: ``python -m training.world.bench [--sizes 256 128 64]``.

Draws batches of random poses for many identities (backgrounds and rigs are cached per identity,
as in a data loader that keeps drawing the same people) and prints frames/s per size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from training.world.identity import sample_identity
from training.world.motion import random_motion
from training.world.render import render_frames


def bench(size: int, identities: int = 40, frames_per_identity: int = 16) -> float:
    """Frames per second of ``render_frames`` at ``size``, caches warm."""
    rng = np.random.default_rng(0)
    idns = [sample_identity(0, i) for i in range(identities)]
    motions = [random_motion(rng, frames_per_identity) for _ in idns]
    for idn in idns:  # warm the per-identity caches (rig, background)
        render_frames(idn, motions[0][:1], size)
    t0 = time.perf_counter()
    for idn, m in zip(idns, motions):
        render_frames(idn, m, size)
    return identities * frames_per_identity / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 128, 64])
    p.add_argument("--repeats", type=int, default=3, help="best of N runs (shared machines)")
    args = p.parse_args()
    for size in args.sizes:
        fps = max(bench(size) for _ in range(args.repeats))
        print(f"{size:4d}x{size:<4d} {fps:7.0f} frames/s (one core)")


if __name__ == "__main__":
    main()
