"""Talking-head clips of the synthetic world: speech audio, per-frame motion and frames, aligned.

    clip = make_clip(cfg.world, identity_id=17, seconds=4.0, size=256, seed=3)
    clip.frames  # (T, 256, 256, 3) uint8, T = 100
    clip.audio   # (T * 640,) float32, 16 kHz: frame n shows samples [n*640, (n+1)*640)
    clip.motion  # (T,) MOTION_DTYPE ground truth (see training.world.motion)

A clip is a pure function of (world seed, identity id, clip seed, split, seconds, size): its
random streams come from ``SeedSequence([world_seed, CLIP_STREAM, identity_id, seed, split])``.
``motion_from=other`` draws this identity with another clip's motion and audio: the exact
ground truth of a cross-reenactment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import WorldConfig
from engine.errors import UserError
from training.world.identity import Identity, get_identity
from training.world.motion import SAMPLES_PER_FRAME, clip_motion, random_motion
from training.world.render import check_size, render_frames
from training.world.speech import synth_speech

CLIP_STREAM = 2  # SeedSequence tag for clips (identities use 1)
SPLITS = {"train": 0, "heldout": 1}
MAX_SECONDS = 600.0


@dataclass
class Clip:
    """One talking-head clip; audio and video are exactly aligned (640 samples per frame)."""

    frames: np.ndarray | None  # (T, H, W, 3) uint8 RGB, or None when not rendered
    audio: np.ndarray  # (T * 640,) float32 in [-1, 1], 16 kHz mono
    motion: np.ndarray  # (T,) MOTION_DTYPE
    identity_id: int
    text: str  # the sentences spoken (the last may be cut off by the clip's end)
    seed: int = 0
    split: str = "train"
    fps: int = 25
    sample_rate: int = 16000

    @property
    def num_frames(self) -> int:
        return len(self.motion)


def _check_world(cfg: WorldConfig) -> None:
    if cfg.fps != 25 or cfg.sample_rate != 16000:
        raise UserError(
            f"the synthetic world runs at 25 fps and 16 kHz (mouth tracks are calibrated for "
            f"that), got world.fps={cfg.fps}, world.sample_rate={cfg.sample_rate}"
        )


def clip_rngs(
    cfg: WorldConfig, identity_id: int, seed: int, split: str
) -> tuple[np.random.Generator, np.random.Generator]:
    """(speech rng, motion rng) of a clip; independent streams from one SeedSequence."""
    if split not in SPLITS:
        raise UserError(f"split must be 'train' or 'heldout', got {split!r}")
    if int(seed) < 0:
        raise UserError(f"clip seed must be >= 0, got {seed}")
    ss = np.random.SeedSequence([cfg.seed, CLIP_STREAM, int(identity_id), int(seed), SPLITS[split]])
    speech, motion = ss.spawn(2)
    return np.random.default_rng(speech), np.random.default_rng(motion)


def make_clip(
    cfg: WorldConfig,
    identity_id: int,
    seconds: float = 4.0,
    size: int = 256,
    seed: int = 0,
    split: str = "train",
    motion_from: Clip | None = None,
    render: bool = True,
) -> Clip:
    """Make (or, with ``motion_from``, re-render) one clip.

    seconds: duration; T = round(seconds * 25) frames and exactly T * 640 audio samples (the
    speech is padded with silence or cut). split: "train" or "heldout" speech (disjoint sentence
    pools). motion_from: use that clip's motion, audio and text for this identity (``seconds``,
    ``seed`` and ``split`` are then taken from it). render: False skips drawing frames
    (``frames`` is None), for audio/motion-only uses.
    """
    _check_world(cfg)
    size = check_size(size)
    identity = get_identity(cfg, identity_id)
    if motion_from is not None:
        frames = render_frames(identity, motion_from.motion, size) if render else None
        return Clip(
            frames=frames,
            audio=motion_from.audio,
            motion=motion_from.motion.copy(),
            identity_id=int(identity_id),
            text=motion_from.text,
            seed=motion_from.seed,
            split=motion_from.split,
        )
    seconds = float(seconds)
    if not 0 < seconds <= MAX_SECONDS or not np.isfinite(seconds):
        raise UserError(f"clip duration must be in (0, {MAX_SECONDS:g}] seconds, got {seconds}")
    num_frames = max(1, round(seconds * cfg.fps))
    speech_rng, motion_rng = clip_rngs(cfg, identity_id, seed, split)
    audio, text = synth_speech(speech_rng, num_frames / cfg.fps, split, cfg.sample_rate)
    n = num_frames * SAMPLES_PER_FRAME
    audio = np.pad(audio, (0, max(0, n - len(audio))))[:n].astype(np.float32)
    motion = clip_motion(motion_rng, audio, identity, cfg.sample_rate, cfg.fps)
    frames = render_frames(identity, motion, size) if render else None
    return Clip(frames, audio, motion, int(identity_id), text, int(seed), split)


def clip_motion_only(
    cfg: WorldConfig, identity_id: int, frames: int, rng: np.random.Generator
) -> np.ndarray:
    """Time-coherent motion of a ``frames``-long talking clip (speech-driven mouth, head walks,
    blinks...) without drawing it; both the speech and the motion come from ``rng``.

    Returns (frames,) MOTION_DTYPE. Use ``render_frames`` to draw it for any identity.
    """
    _check_world(cfg)
    if int(frames) < 1:
        raise UserError(f"frames must be at least 1, got {frames}")
    identity = get_identity(cfg, identity_id)
    speech_rng = np.random.default_rng(rng.integers(2**63))
    motion_rng = np.random.default_rng(rng.integers(2**63))
    audio, _ = synth_speech(speech_rng, frames / cfg.fps, "train", cfg.sample_rate)
    n = int(frames) * SAMPLES_PER_FRAME
    audio = np.pad(audio, (0, max(0, n - len(audio))))[:n].astype(np.float32)
    return clip_motion(motion_rng, audio, identity, cfg.sample_rate, cfg.fps)


def render_identity_batch(
    cfg: WorldConfig, identity_id: int, n: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, Identity]:
    """n frames of one identity in independent random poses/expressions over its fixed
    background (stage-1 training pairs need no time order).

    Returns (frames (n, size, size, 3) uint8, motion (n,) MOTION_DTYPE, identity).
    """
    identity = get_identity(cfg, identity_id)
    motion = random_motion(rng, n)
    return render_frames(identity, motion, size), motion, identity
