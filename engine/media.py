"""Reading portraits and videos, writing mp4 with audio (PyAV). Every failure is a UserError."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UserError

MAX_IMAGE_PIXELS = 8192 * 8192


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, then resize to (size, size, 3) uint8 with antialiasing."""
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    crop = img[y0 : y0 + s, x0 : x0 + s]
    if s == size:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS))


def decode_image(data: bytes | Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Any common image format -> (H, W, 3) uint8 RGB (alpha composited on white)."""
    from PIL import Image, UnidentifiedImageError

    src = data if isinstance(data, bytes) else Path(data)
    if isinstance(src, Path) and not src.is_file():
        raise UserError(f"image not found: {src}")
    name = "image" if isinstance(src, bytes) else str(src)
    try:
        import io

        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as opened:
            im: Image.Image = opened
            if im.width * im.height > max_pixels:
                raise UserError(f"{name}: {im.width}x{im.height} is larger than allowed")
            if im.width < 16 or im.height < 16:
                raise UserError(f"{name}: {im.width}x{im.height} is too small for a portrait")
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image (PNG, JPEG, WebP, ... expected)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{name}: cannot decode the image ({e})") from None


def load_portrait(path: str | Path, size: int) -> np.ndarray:
    """A portrait file -> (size, size, 3) uint8, centre-cropped. Put the face in the middle."""
    return square_resize(decode_image(path), size)


def iter_video(path: str | Path, size: int | None = None) -> Iterator[np.ndarray]:
    """Decode frames as (H, W, 3) uint8 RGB (square-resized when ``size`` is given)."""
    import av

    path = Path(path)
    check_video_file(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"{path}: not a readable video ({e})") from None
    with container:
        if not container.streams.video:
            raise UserError(f"{path}: has no video stream")
        try:
            for frame in container.decode(video=0):
                img = frame.to_ndarray(format="rgb24")
                yield square_resize(img, size) if size else img
        except av.error.FFmpegError as e:
            raise UserError(f"{path}: video is corrupt ({e})") from None


def check_video_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the video file is empty")


def video_fps(path: str | Path) -> float:
    import av

    check_video_file(Path(path))
    try:
        with av.open(str(path)) as c:
            rate = c.streams.video[0].average_rate
            return float(rate) if rate else 25.0
    except (av.error.FFmpegError, OSError, IndexError) as e:
        raise UserError(f"{path}: not a readable video ({e})") from None


def read_audio_track(path: str | Path, sample_rate: int = 16000) -> np.ndarray | None:
    """The first audio stream as float32 mono at ``sample_rate``, or None if there is none."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                return None
            res = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in c.decode(audio=0):
                for f in res.resample(frame):
                    chunks.append(f.to_ndarray().reshape(-1))
            for f in res.resample(None):
                chunks.append(f.to_ndarray().reshape(-1))
    except (av.error.FFmpegError, OSError) as e:
        raise UserError(f"{path}: cannot read its audio ({e})") from None
    if not chunks:
        return None
    return np.concatenate(chunks).astype(np.float32)


class VideoWriter:
    """mp4 (H.264, yuv420p) at ``fps`` with optional mono audio muxed as AAC.

    Frames are (H, W, 3) uint8 RGB; audio float32 in [-1, 1] at ``sample_rate``. Writes to a
    temporary name and renames on close, so a failed render never leaves a half file behind."""

    def __init__(
        self, path: str | Path, fps: int = 25, sample_rate: int | None = 16000, crf: int = 20
    ):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.stem + ".partial" + self.path.suffix)
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        self.fps = fps
        self.v: Any = None
        self.crf = crf
        self.a: Any = None
        self.sample_rate = sample_rate or 0
        if sample_rate:
            self.a = self.container.add_stream("aac", rate=sample_rate)
            self.a.layout = "mono"
        self.n_frames = 0
        self.n_samples = 0

    def write_frame(self, img: np.ndarray) -> None:
        import av

        if self.v is None:
            h, w = img.shape[:2]
            self.v = self.container.add_stream("libx264", rate=self.fps)
            self.v.width, self.v.height = w - w % 2, h - h % 2
            self.v.pix_fmt = "yuv420p"
            self.v.options = {"crf": str(self.crf), "preset": "veryfast"}
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        frame.pts = self.n_frames
        frame.time_base = Fraction(1, self.fps)
        for pkt in self.v.encode(frame):
            self.container.mux(pkt)
        self.n_frames += 1

    def write_audio(self, samples: np.ndarray) -> None:
        import av

        if self.a is None or len(samples) == 0:
            return
        x = np.clip(samples.astype(np.float32), -1, 1).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self.n_samples
        frame.time_base = Fraction(1, self.sample_rate)
        for pkt in self.a.encode(frame):
            self.container.mux(pkt)
        self.n_samples += x.shape[1]

    def close(self) -> None:
        for s in (self.v, self.a):
            if s is not None:
                for pkt in s.encode(None):
                    self.container.mux(pkt)
        self.container.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        try:
            self.container.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
