"""Offline rendering: a portrait and an audio file -> mp4 (25 fps) with the audio muxed.

    livehead render --image face.png --audio speech.wav --out talk.mp4 --seed 0

The offline path *is* the streaming path: a ``StreamSession`` is fed the whole file one window
of audio at a time, pulled after every push, and finished at the end of the input. So offline
output equals what a live stream of the same audio, seed and controls shows, frame for frame,
and memory stays bounded for any length (features, motion and frames are made, written and
dropped window by window; only the decoded 16 kHz audio is held, 3.8 MB a minute).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.session_api import SAMPLE_RATE, SAMPLES_PER_FRAME, Controls, OutputFrame
from engine.stream import Avatar, Engine, validate_controls
from engine.windowing import CONTROL_DIM, CONTROL_MASKS, ControlTrack, control_vectors


# --------------------------------------------------------------------------------------------
# Pose files
# --------------------------------------------------------------------------------------------
def read_pose_file(path: str | Path) -> np.ndarray:
    """A (T, 3) array of per-frame head pose (yaw, pitch, roll) in degrees, 25 fps, from .npy or
    text (.txt/.csv: one frame per line, whitespace or commas). Returns float32 (T, 3)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"pose file not found: {p}")
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            text = p.read_text().replace(",", " ")
            rows = [line.split() for line in text.splitlines() if line.strip()]
            arr = np.array(rows, dtype=np.float64) if rows else np.zeros((0, 3))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"{p}: not a readable pose file (.npy, or text with 3 numbers a line): {e}"
        ) from None
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] < 1:
        raise UserError(
            f"{p}: pose must be a (T, 3) array of yaw, pitch, roll in degrees, got shape "
            f"{tuple(arr.shape)}"
        )
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise UserError(f"{p}: pose values must be finite numbers")
    if np.abs(arr).max() > 90:
        raise UserError(f"{p}: pose angles must be within [-90, 90] degrees")
    return arr.astype(np.float32)


class PoseTrack(ControlTrack):
    """Per-frame pose from an array, plus fixed location/scale. Frame n uses row n; frames
    before 0 (the first window's padding) row 0, frames past the end the last row."""

    def __init__(self, pose_deg: np.ndarray, base: Controls | None = None) -> None:
        super().__init__()
        if pose_deg.ndim != 2 or pose_deg.shape[1] != 3 or pose_deg.shape[0] < 1:
            raise UserError(f"pose must be a (T, 3) array, got shape {pose_deg.shape}")
        self.pose = torch.from_numpy(np.ascontiguousarray(pose_deg, dtype=np.float32)) / 90.0
        values, mask = control_vectors(base)
        self.base_values, self.base_mask = values, mask

    def set(self, from_frame: int, controls: Controls | None, keep_from: int | None = None) -> None:
        raise UserError("this session's controls come from a pose file; they cannot change")

    def segment(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(lo, hi).clamp(0, self.pose.shape[0] - 1)
        values = self.base_values.expand(hi - lo, CONTROL_DIM).clone()
        mask = self.base_mask.expand(hi - lo, CONTROL_MASKS).clone()
        values[:, 2:5] = self.pose[idx]
        mask[:, 2] = 1.0
        return values, mask


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def render_frames(
    engine: Engine,
    avatar: Avatar,
    samples: np.ndarray,
    *,
    seed: int = 0,
    controls: Controls | ControlTrack | None = None,
) -> Iterator[OutputFrame]:
    """16 kHz mono float32 samples (N,) -> the ceil(N / 640) output frames, in order, each with
    its 640 input samples (the last zero-padded). A generator: nothing accumulates."""
    if samples.ndim != 1 or samples.size == 0:
        raise UserError("render needs a non-empty mono 16 kHz signal")
    session = engine.session(avatar, seed=seed, controls=controls, live=False)
    # One window's hop per push: at most one window per push, so the queue never overflows.
    chunk = engine.plan.window_frames * SAMPLES_PER_FRAME
    try:
        for pos in range(0, samples.size, chunk):
            session.push_audio(samples[pos : pos + chunk], SAMPLE_RATE)
            yield from session.pull()
        session.finish()
        yield from session.pull()
        if session.dropped_frames:
            raise RuntimeError(f"offline render dropped {session.dropped_frames} frames")
    finally:
        session.close()


def render_file(
    engine: Engine,
    audio: str | Path,
    out: str | Path,
    *,
    image: str | Path | None = None,
    seed: int = 0,
    controls: Controls | None = None,
    pose_file: str | Path | None = None,
    progress: bool = True,
) -> int:
    """Render ``audio`` (any format/rate ffmpeg reads) onto ``image`` (default: the bundled
    portrait) into ``out`` (mp4, 25 fps, the input audio muxed). Returns frames written."""
    from tqdm import tqdm

    from engine.audio import load_audio
    from engine.media import VideoWriter, decode_image

    if controls is not None:
        validate_controls(controls)
    track: Controls | ControlTrack | None = controls
    if pose_file is not None:
        if controls is not None and controls.pose_deg is not None:
            raise UserError("give the pose either as a pose file or as --pose-* angles, not both")
        track = PoseTrack(read_pose_file(pose_file), controls)
    avatar = (
        engine.default_avatar() if image is None else engine.prepare_avatar(decode_image(image))
    )
    samples = load_audio(audio)
    n_frames = -(-samples.size // SAMPLES_PER_FRAME)
    written = 0
    remaining = samples.size
    with (
        VideoWriter(out, fps=25, sample_rate=SAMPLE_RATE) as writer,
        tqdm(total=n_frames, unit="frame", desc="render", disable=not progress) as bar,
    ):
        for frame in render_frames(engine, avatar, samples, seed=seed, controls=track):
            writer.write_frame(frame.image)
            writer.write_audio(frame.audio[: max(0, min(SAMPLES_PER_FRAME, remaining))])
            remaining -= SAMPLES_PER_FRAME
            written += 1
            bar.update(1)
    return written
