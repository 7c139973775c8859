"""Video and audio I/O for the real-data pipeline, all through PyAV (no ffmpeg binary needed).

    info = probe(path)                        # raises BadInput for files we cannot use
    for j, frame in iter_frames(path, fps=25):  # source resampled to a 25 fps timeline
        ...
    audio = read_audio(path, sample_rate=16000)   # float32 mono, aligned to video frame 0
    write_clip(out.mp4, frames_rgb, audio, fps=25, sample_rate=16000)

Frame-rate conversion is nearest-timestamp, like ffmpeg's ``fps`` filter: output frame ``j``
shows the source frame whose presentation time is closest to ``j / fps`` (measured from the first
video frame). Working on timestamps rather than frame counts keeps variable-frame-rate phone
footage and odd rates (29.97, 22.13) in sync with the audio.

The audio timeline starts at the first *video* frame: sources whose audio stream starts earlier
or later than the video (a few tens of ms is common) are trimmed or zero-padded so that audio
sample ``n`` belongs to video frame ``n * fps / sample_rate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")


class BadInput(Exception):
    """An input file the pipeline skips; ``reason`` is a short key counted in the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float  # nominal source rate (average_rate); 0.0 when the container does not say
    duration_s: float  # 0.0 when unknown
    has_audio: bool


def probe(path: Path) -> VideoInfo:
    """Open ``path`` and read its stream headers; raises BadInput for unusable files."""
    if not path.is_file():
        raise BadInput("not_a_file", str(path))
    if path.stat().st_size == 0:
        raise BadInput("empty_file", str(path))
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInput("no_video_stream", str(path))
            v = container.streams.video[0]
            width, height = v.codec_context.width, v.codec_context.height
            if width <= 0 or height <= 0:
                raise BadInput("no_video_stream", f"{path} (video stream has no size)")
            fps = float(v.average_rate) if v.average_rate else 0.0
            if v.duration is not None and v.time_base is not None:
                duration_s = float(v.duration * v.time_base)
            elif container.duration is not None:
                duration_s = container.duration / av.time_base
            else:
                duration_s = 0.0
            return VideoInfo(path, width, height, fps, duration_s, bool(container.streams.audio))
    except BadInput:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        raise BadInput("unreadable", f"{path} ({type(e).__name__}: {e})") from e


def iter_frames(
    path: Path, fps: float = 25.0, max_frames: int | None = None
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield ``(j, frame)`` for the source resampled to ``fps``, starting at output frame 0.

    The same ``av.VideoFrame`` is yielded several times when the source is slower than ``fps``
    and some source frames are skipped when it is faster. Decode errors in the middle of a file
    end the iteration (a truncated download still gives its good prefix); an error before the
    first frame raises BadInput."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise BadInput("unreadable", f"{path} ({type(e).__name__}: {e})") from e
    with container:
        if not container.streams.video:
            raise BadInput("no_video_stream", str(path))
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: decoding 1080p is the cost of pass 1
        src_rate = float(stream.average_rate) if stream.average_rate else fps
        step = 1.0 / fps
        t0: float | None = None
        prev: av.VideoFrame | None = None
        prev_t = 0.0
        j = 0
        n_src = 0
        try:
            for frame in container.decode(stream):
                # Frames without a timestamp (rare, broken muxers) fall back to the nominal rate.
                t_abs = frame.time if frame.time is not None else n_src / src_rate
                n_src += 1
                if t0 is None:
                    t0 = t_abs
                t = t_abs - t0
                if prev is not None:
                    if t <= prev_t:  # non-monotonic timestamps: keep the earlier frame
                        continue
                    midpoint = 0.5 * (prev_t + t)
                    while j * step < midpoint:
                        yield j, prev
                        j += 1
                        if max_frames is not None and j >= max_frames:
                            return
                prev, prev_t = frame, t
        except av.FFmpegError as e:
            if prev is None:
                raise BadInput("unreadable", f"{path} ({type(e).__name__}: {e})") from e
        if prev is None:
            raise BadInput("no_frames", str(path))
        # The last source frame lasts one nominal frame period; show it for half of that on
        # either side, as for every other frame.
        end = prev_t + 0.5 / src_rate
        while j * step < end or j == 0:
            yield j, prev
            j += 1
            if max_frames is not None and j >= max_frames:
                return


def read_audio(path: Path, sample_rate: int = 16000) -> np.ndarray | None:
    """The first audio stream as float32 mono at ``sample_rate``, aligned to the first video
    frame (see the module docstring); None when there is no audio stream or it cannot be
    decoded."""
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError):
        return None
    with container:
        if not container.streams.audio:
            return None
        v_start = 0.0
        if container.streams.video:
            vs = container.streams.video[0]
            if vs.start_time is not None and vs.time_base is not None:
                v_start = float(vs.start_time * vs.time_base)
        a = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        first_t: float | None = None
        try:
            for frame in container.decode(a):
                if first_t is None and frame.time is not None:
                    first_t = frame.time
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError:
            if not chunks:
                return None  # keep a good prefix of a truncated file, like iter_frames
        if not chunks:
            return None
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    # Shift so that sample 0 is the time of the first video frame.
    offset = int(round(((first_t or 0.0) - v_start) * sample_rate))
    if offset > 0:
        audio = np.concatenate([np.zeros(offset, np.float32), audio])
    elif offset < 0:
        audio = audio[-offset:]
    return audio


def frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """uint8 (H, W, 3) RGB. OpenCV converts limited-range 4:2:0 about 3x faster than PyAV's
    swscale path (which dominates decoding a 256² clip); other formats go through swscale.
    Both use BT.601 coefficients."""
    if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
        return cv2.cvtColor(frame.to_ndarray(format="yuv420p"), cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="rgb24")


def write_clip(
    path: Path,
    frames: Sequence[np.ndarray],
    audio: np.ndarray | None,
    fps: int = 25,
    sample_rate: int = 16000,
    crf: int = 18,
) -> None:
    """Encode RGB frames (each uint8 (H, W, 3), H and W even) as H.264 yuv420p at ``fps``,
    with ``audio`` (float32 mono at ``sample_rate``) muxed as AAC when given.

    crf 18 is visually lossless for 256² faces; ``veryfast`` keeps encoding well below the cost
    of decoding the source on a 2-core machine."""
    h, w = frames[0].shape[:2]
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=Fraction(fps))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": str(crf), "preset": "veryfast"}
        a_stream = None
        if audio is not None:
            a_stream = out.add_stream("aac", rate=sample_rate, layout="mono")
            a_stream.bit_rate = 64000
        for i, rgb in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            vf.pts = i
            vf.time_base = Fraction(1, fps)
            out.mux(vs.encode(vf))
        out.mux(vs.encode(None))
        if a_stream is not None and audio is not None:
            # AAC wants fixed 1024-sample frames; PyAV re-frames for us when we hand it chunks.
            chunk = 1024
            pcm = np.ascontiguousarray(audio, dtype=np.float32)
            for start in range(0, len(pcm), chunk):
                part = pcm[start : start + chunk].reshape(1, -1)
                af = av.AudioFrame.from_ndarray(part, format="flt", layout="mono")
                af.sample_rate = sample_rate
                af.pts = start
                af.time_base = Fraction(1, sample_rate)
                out.mux(a_stream.encode(af))
            out.mux(a_stream.encode(None))
    tmp.replace(path)  # a crash mid-encode never leaves a half clip under the final name


def read_clip_frames(path: Path) -> np.ndarray:
    """All frames of a clip written by ``write_clip`` as uint8 (T, H, W, 3) RGB."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame_to_rgb(f) for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"no frames in {path}")
    return np.stack(frames)


def read_clip_audio(path: Path, num_samples: int, sample_rate: int = 16000) -> np.ndarray | None:
    """The audio track of a clip as float32 mono, trimmed or zero-padded to ``num_samples``
    (AAC frames round the length up to 1024 samples)."""
    audio = read_audio(path, sample_rate)
    if audio is None:
        return None
    if len(audio) >= num_samples:
        return audio[:num_samples]
    return np.concatenate([audio, np.zeros(num_samples - len(audio), np.float32)])
