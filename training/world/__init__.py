"""The synthetic talking-head world: procedural faces speaking synthesized speech, with every
motion parameter known (see ../shared/design/SYNTHETIC_WORLD.md).

- ``identity``: ``Identity`` appearance sampled deterministically from (world seed, id).
  Identities ``0 .. cfg.identities - 1`` exist; the last ``cfg.heldout_identities`` are held out
  for evaluation and never used in training (``train_ids`` / ``heldout_ids``).
- ``motion``: ``MOTION_DTYPE`` per-frame ground truth (pose in degrees/90, nose position, face
  scale, mouth, blinks, brows, gaze), the audio-driven mouth track and clip motion synthesis.
- ``render``: the 2.5D renderer, ``render_frame`` / ``render_frames`` (any size, uint8 RGB).
- ``speech``: espeak-ng sentences with disjoint train / held-out pools.
- ``clip``: ``make_clip`` (aligned audio, motion, frames; cross-reenactment via ``motion_from``).
- ``io``: NAME.mp4 + NAME.npz files (imported separately; it needs PyAV).

Everything is a pure function of its seeds: the same (world seed, id, clip seed, arguments) give
the same clip bit for bit.
"""

from training.world.clip import Clip, clip_motion_only, make_clip, render_identity_batch
from training.world.identity import (
    Identity,
    get_identity,
    heldout_ids,
    sample_identity,
    train_ids,
)
from training.world.motion import (
    MOTION_DTYPE,
    MOTION_FIELDS,
    as_array,
    clip_motion,
    from_array,
    motion_row,
    mouth_track,
    neutral_motion,
    perturb_motion,
    place_like_a_clip,
    random_motion,
    random_motion_row,
)
from training.world.render import landmarks, render_frame, render_frames
from training.world.speech import synth_speech

__all__ = [
    "MOTION_DTYPE",
    "MOTION_FIELDS",
    "Clip",
    "Identity",
    "as_array",
    "clip_motion",
    "clip_motion_only",
    "from_array",
    "get_identity",
    "heldout_ids",
    "landmarks",
    "make_clip",
    "motion_row",
    "mouth_track",
    "neutral_motion",
    "perturb_motion",
    "place_like_a_clip",
    "random_motion",
    "random_motion_row",
    "render_frame",
    "render_frames",
    "render_identity_batch",
    "sample_identity",
    "synth_speech",
    "train_ids",
]
