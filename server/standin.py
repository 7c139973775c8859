"""A stand-in session: the engine's Session contract with no model behind it.

The server, the clients and their tests are built against ``engine.session_api.Session``; until
the real engine lands, this class plays its part. It buffers input audio and, for every complete
640-sample frame, emits an ``OutputFrame`` ``latency_frames`` frames later whose image is the
avatar with a dark mouth ellipse whose height follows that frame's loudness, so a test can see
audio-driven video without a model. Controls move, zoom and rotate the portrait so a test can see
that they arrive too.

    session = StandInSession(placeholder_face(), size=256)
    session.push_audio(pcm_48k, 48000)
    frames = session.pull()
"""

from __future__ import annotations

import math
import threading
import time
from math import gcd

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from engine.errors import UserError
from engine.session_api import SAMPLE_RATE, SAMPLES_PER_FRAME, Controls, OutputFrame

# Where the mouth sits in a portrait, as fractions of the (square) image; the placeholder face is
# drawn to match and a centred real portrait is close enough for a stand-in.
MOUTH_CENTER_XY = (0.5, 0.72)
MOUTH_HALF_WIDTH = 0.10
MOUTH_MIN_HALF_HEIGHT = 0.006
MOUTH_MAX_HALF_HEIGHT = 0.07
LOUD_RMS = 0.1  # the RMS (of [-1, 1] audio) that opens the mouth fully
SPEECH_RMS = 0.01  # frames quieter than this are "idle"


def placeholder_face(size: int = 512) -> np.ndarray:
    """A simple cartoon face, (size, size, 3) uint8 RGB: the avatar when none is given.

    Drawn at 2x and downsampled for smooth edges; the mouth is a thin line at MOUTH_CENTER_XY so
    the stand-in's audio-driven ellipse lands on it."""
    s = 2 * size
    img = Image.new("RGB", (s, s))
    # Vertical background gradient: blue-grey at the top to darker at the bottom.
    ramp = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    top, bottom = np.array([92, 112, 140], np.float32), np.array([38, 46, 62], np.float32)
    bg = (top * (1 - ramp) + bottom * ramp).repeat(s, axis=1).astype(np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)

    def box(cx: float, cy: float, rx: float, ry: float) -> tuple[int, int, int, int]:
        return (int((cx - rx) * s), int((cy - ry) * s), int((cx + rx) * s), int((cy + ry) * s))

    d.rectangle(box(0.5, 0.98, 0.30, 0.12), fill=(70, 80, 120))  # shoulders
    d.rectangle(box(0.5, 0.86, 0.08, 0.08), fill=(214, 170, 140))  # neck
    d.ellipse(box(0.5, 0.36, 0.29, 0.26), fill=(60, 40, 30))  # hair (behind the face)
    d.ellipse(box(0.5, 0.52, 0.25, 0.31), fill=(232, 190, 160))  # face
    d.ellipse(box(0.245, 0.53, 0.035, 0.06), fill=(220, 176, 146))  # ears
    d.ellipse(box(0.755, 0.53, 0.035, 0.06), fill=(220, 176, 146))
    d.chord(box(0.5, 0.33, 0.26, 0.14), 180, 360, fill=(60, 40, 30))  # fringe
    for ex in (0.40, 0.60):
        d.ellipse(box(ex, 0.49, 0.050, 0.028), fill=(250, 250, 250))  # eye whites
        d.ellipse(box(ex, 0.49, 0.022, 0.024), fill=(60, 90, 60))  # iris
        d.ellipse(box(ex, 0.49, 0.010, 0.011), fill=(10, 10, 10))  # pupil
        d.line(
            [box(ex, 0.425, 0.05, 0)[:2], box(ex, 0.425, 0.05, 0)[2:]],
            fill=(50, 35, 25),
            width=max(1, s // 90),
        )  # brows
    d.polygon(
        [(0.5 * s, 0.52 * s), (0.47 * s, 0.63 * s), (0.53 * s, 0.63 * s)], fill=(214, 160, 130)
    )  # nose
    mx, my = MOUTH_CENTER_XY
    d.line(
        [(int((mx - 0.08) * s), int(my * s)), (int((mx + 0.08) * s), int(my * s))],
        fill=(150, 70, 70),
        width=max(1, s // 110),
    )  # closed mouth
    img = img.filter(ImageFilter.GaussianBlur(radius=s / 512))
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8).copy()


def _as_mono_float(samples: np.ndarray) -> np.ndarray:
    """(N,) or (N, C) int16 / float32 / float64 -> (N,) float32 in [-1, 1]; raises UserError."""
    if not isinstance(samples, np.ndarray):
        raise UserError(f"audio must be a numpy array, got {type(samples).__name__}")
    if samples.dtype == np.int16:
        x = samples.astype(np.float32) / 32768.0
    elif samples.dtype in (np.float32, np.float64):
        if not np.all(np.isfinite(samples)):
            raise UserError("audio contains NaN or inf")
        x = samples.astype(np.float32, copy=False)
    else:
        raise UserError(f"audio dtype must be int16, float32 or float64, got {samples.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)  # (N, C) -> (N,)
    elif x.ndim != 1:
        raise UserError(f"audio must have shape (N,) or (N, C), got {samples.shape}")
    return np.clip(x, -1.0, 1.0)


class StandInSession:
    """``engine.session_api.Session`` without a model: the avatar plus an audio-driven mouth.

    avatar_rgb: (H, W, 3) uint8 RGB portrait, any size (resized to ``size`` x ``size``).
    latency_frames: frame n is emitted once input covers samples [0, (n + latency_frames) * 640),
        i.e. a nominal latency of ``latency_frames * 640`` samples from a frame's first sample.
    compute_ms: simulated compute time per emitted frame (sleeps in ``pull``), for tests of a
        slow engine.
    """

    def __init__(
        self,
        avatar_rgb: np.ndarray,
        size: int = 256,
        latency_frames: int = 3,
        compute_ms: float = 0.0,
    ) -> None:
        if size < 16 or size % 2:
            raise UserError(f"stand-in size must be an even number >= 16, got {size}")
        if latency_frames < 1:
            raise UserError(f"latency_frames must be >= 1, got {latency_frames}")
        self.size = size
        self.latency_frames = latency_frames
        self.compute_ms = compute_ms
        self._lock = threading.Lock()  # the contract allows "any one thread"; cheap insurance
        self._buffer = np.zeros(0, np.float32)  # input not yet emitted; starts at self._emitted
        self._emitted = 0  # samples of the timeline already emitted as frames
        self._closed = False
        self._controls = Controls()
        self._avatar = self._prepare_avatar(avatar_rgb)
        self._base: np.ndarray | None = None  # avatar with controls applied (cached)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self._grid = (xx, yy)

    # -- Session protocol --------------------------------------------------------------------
    @property
    def latency_samples(self) -> int:
        return self.latency_frames * SAMPLES_PER_FRAME

    def push_audio(
        self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, arrived: float | None = None
    ) -> None:
        del arrived  # the stand-in renders nothing, so it never falls behind
        x = _as_mono_float(samples)
        if not isinstance(sample_rate, int | np.integer) or not 4000 <= sample_rate <= 192000:
            raise UserError(f"sample_rate must be an integer in [4000, 192000], got {sample_rate}")
        if sample_rate != SAMPLE_RATE and len(x):
            from scipy.signal import resample_poly  # imported here: only non-16 kHz input needs it

            g = gcd(int(sample_rate), SAMPLE_RATE)
            x = resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)
        with self._lock:
            self._check_open()
            self._buffer = np.concatenate([self._buffer, x])

    def push_silence(self, n_samples: int, arrived: float | None = None) -> None:
        del arrived
        if n_samples < 0:
            raise UserError(f"n_samples must be >= 0, got {n_samples}")
        with self._lock:
            self._check_open()
            self._buffer = np.concatenate([self._buffer, np.zeros(int(n_samples), np.float32)])

    def pull(self) -> list[OutputFrame]:
        with self._lock:
            self._check_open()
            n_ready = max(0, len(self._buffer) // SAMPLES_PER_FRAME - self.latency_frames + 1)
            n_ready = min(n_ready, len(self._buffer) // SAMPLES_PER_FRAME)
            out = []
            for _ in range(n_ready):
                t0 = time.perf_counter()
                audio = self._buffer[:SAMPLES_PER_FRAME].copy()
                self._buffer = self._buffer[SAMPLES_PER_FRAME:]
                rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float32))))
                image = self._render(rms)
                if self.compute_ms:
                    time.sleep(self.compute_ms / 1000)
                meta = {"rms": rms, "compute_ms": (time.perf_counter() - t0) * 1000}
                out.append(OutputFrame(self._emitted, image, audio, rms >= SPEECH_RMS, meta))
                self._emitted += SAMPLES_PER_FRAME
            return out

    def interrupt(self) -> int:
        with self._lock:
            # Barge-in: everything not yet emitted is forgotten; the timeline goes on from here.
            self._buffer = np.zeros(0, np.float32)
            return self._emitted

    def set_controls(self, controls: Controls) -> None:
        with self._lock:
            self._controls = controls
            self._base = None

    def set_avatar(self, image: np.ndarray) -> None:
        avatar = self._prepare_avatar(image)
        with self._lock:
            self._avatar = avatar
            self._base = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._buffer = np.zeros(0, np.float32)

    # -- internals -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise UserError("session is closed")

    def _prepare_avatar(self, image: np.ndarray) -> np.ndarray:
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or (image.shape[2] != 3)
        ):
            shape = getattr(image, "shape", None)
            raise UserError(f"avatar must be an (H, W, 3) uint8 RGB array, got {shape}")
        img = Image.fromarray(image)
        # Centre-crop to a square so the face keeps its aspect ratio, then resize once.
        w, h = img.size
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        return np.asarray(
            img.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.uint8
        )

    def _base_image(self) -> np.ndarray:
        """The avatar with the current controls applied (recomputed only when they change)."""
        if self._base is not None:
            return self._base
        c, img = self._controls, Image.fromarray(self._avatar)
        if c.scale is not None and c.scale > 0 and abs(c.scale - 1.0) > 1e-3:
            # Zoom about the centre: crop (scale > 1) or pad (scale < 1), then back to size.
            side = self.size / c.scale
            off = (self.size - side) / 2
            img = img.transform(
                img.size,
                Image.Transform.EXTENT,
                (off, off, off + side, off + side),
                Image.Resampling.BILINEAR,
                fillcolor=(0, 0, 0),
            )
        if c.pose_deg is not None:
            yaw, _pitch, roll = c.pose_deg
            # Roll rotates; yaw shifts a little (a stand-in for turning the head).
            img = img.rotate(roll, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
            img = img.transform(
                img.size,
                Image.Transform.AFFINE,
                (1, 0, -yaw / 90 * self.size / 8, 0, 1, 0),
                Image.Resampling.BILINEAR,
            )
        base = np.asarray(img, dtype=np.uint8)
        if c.location is not None:
            base = np.roll(base, int(round(c.location * self.size / 4)), axis=1)
        self._base = base
        return base

    def _render(self, rms: float) -> np.ndarray:
        """(size, size, 3) uint8: the base image with a mouth ellipse opened by ``rms``."""
        image = self._base_image().copy()
        loud = min(1.0, rms / LOUD_RMS)
        ry = (
            MOUTH_MIN_HALF_HEIGHT
            + (MOUTH_MAX_HALF_HEIGHT - MOUTH_MIN_HALF_HEIGHT) * math.sqrt(loud)
        ) * self.size
        rx = MOUTH_HALF_WIDTH * self.size
        cx, cy = MOUTH_CENTER_XY[0] * self.size, MOUTH_CENTER_XY[1] * self.size
        if self._controls.location is not None:
            cx += round(self._controls.location * self.size / 4)
        # Only the ellipse's bounding box is touched: this is per frame.
        x0, x1 = max(0, int(cx - rx) - 1), min(self.size, int(cx + rx) + 2)
        y0, y1 = max(0, int(cy - ry) - 1), min(self.size, int(cy + ry) + 2)
        xx, yy = self._grid[0][y0:y1, x0:x1], self._grid[1][y0:y1, x0:x1]
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / max(ry, 0.5)) ** 2 <= 1.0
        image[y0:y1, x0:x1][inside] = (70, 20, 25)
        return image
