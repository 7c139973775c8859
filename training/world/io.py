"""Writing and reading synthetic clips.

A clip ``NAME`` is two files:

- ``NAME.mp4``: H.264 video (yuv420p, 25 fps; mpeg4 where libx264 is missing) with the 16 kHz
  mono audio muxed as AAC, for people and for tools that read ordinary video.
- ``NAME.npz``: the exact data: ``motion`` (T,) MOTION_DTYPE ground truth, ``audio`` (T*640,)
  float32, ``identity_id``, ``text``, ``seed``, ``split``, ``fps``, ``sample_rate``. Lossy video
  coding never touches the ground truth.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import numpy as np

from training.world.clip import Clip
from training.world.motion import MOTION_DTYPE


def _video_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_mp4(
    path: str | Path, frames: np.ndarray, audio: np.ndarray, fps: int = 25, sample_rate: int = 16000
) -> None:
    """frames (T, H, W, 3) uint8 RGB (H, W even for yuv420p); audio (N,) float32 mono."""
    t, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        vs = cast(av.VideoStream, container.add_stream(_video_codec(), rate=fps))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if vs.codec_context.name == "libx264":
            vs.options = {"crf": "18", "preset": "veryfast"}
        else:
            vs.bit_rate = 4_000_000
        aus = cast(av.AudioStream, container.add_stream("aac", rate=sample_rate, layout="mono"))
        aus.time_base = Fraction(1, sample_rate)
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        # AAC wants fixed-size chunks; the encoder's resampler/fifo handles the framing.
        chunk = 1024
        pcm = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
        for start in range(0, len(pcm), chunk):
            piece = pcm[start : start + chunk][None, :]
            af = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
            af.sample_rate = sample_rate
            af.pts = start
            af.time_base = Fraction(1, sample_rate)
            for packet in aus.encode(af):
                container.mux(packet)
        for packet in aus.encode():
            container.mux(packet)


def write_clip(clip: Clip, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.mp4`` (needs rendered frames) and ``NAME.npz``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / f"{name}.npz"
    np.savez(
        npz,
        motion=clip.motion,
        audio=clip.audio.astype(np.float32),
        identity_id=np.int64(clip.identity_id),
        text=np.str_(clip.text),
        seed=np.int64(clip.seed),
        split=np.str_(clip.split),
        fps=np.int64(clip.fps),
        sample_rate=np.int64(clip.sample_rate),
    )
    mp4 = out_dir / f"{name}.mp4"
    if clip.frames is None:
        raise ValueError("clip has no frames (made with render=False)")
    write_mp4(mp4, clip.frames, clip.audio, clip.fps, clip.sample_rate)
    return mp4, npz


def read_frames(path: str | Path) -> np.ndarray:
    """Decode a video's frames; (T, H, W, 3) uint8 RGB."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


def read_clip(npz_path: str | Path, frames: bool = True) -> Clip:
    """Load a clip written by ``write_clip``; frames come from the .mp4 next to it (lossy)."""
    npz_path = Path(npz_path)
    with np.load(npz_path, allow_pickle=False) as z:
        motion = z["motion"]
        if motion.dtype != MOTION_DTYPE:
            raise ValueError(f"{npz_path}: motion has dtype {motion.dtype}, not MOTION_DTYPE")
        clip = Clip(
            frames=None,
            audio=z["audio"],
            motion=motion,
            identity_id=int(z["identity_id"]),
            text=str(z["text"]),
            seed=int(z["seed"]),
            split=str(z["split"]),
            fps=int(z["fps"]),
            sample_rate=int(z["sample_rate"]),
        )
    if frames:
        clip.frames = read_frames(npz_path.with_suffix(".mp4"))
    return clip
