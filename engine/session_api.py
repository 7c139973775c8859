"""The contract between the streaming engine and everything that serves it (server, bench).

Timeline: one media clock per session, counted in 16 kHz samples of *input* audio. Video frame n
covers input samples [n*640, (n+1)*640) (25 fps). The engine returns, for each frame, the image
and the 640 input samples it covers; a transport sends both with the same pts, so lips and sound
match by construction. Output leaves the engine ``latency`` behind the input; the engine never
drops or stretches audio.

Threading: ``push_audio``/``pull``/``interrupt``/``set_controls``/``set_avatar``/``close`` may be
called from any one thread (the server calls them from a worker thread, never the event loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640


@dataclass
class OutputFrame:
    """One video frame and the audio that plays with it.

    pts_samples: start of the frame on the session's 16 kHz sample timeline (n * 640).
    image: (H, W, 3) uint8 RGB.
    audio: (640,) float32 in [-1, 1], the input samples [pts_samples, pts_samples + 640).
    speech: True when the frame was driven by speech (False for idle/silence).
    """

    pts_samples: int
    image: np.ndarray
    audio: np.ndarray
    speech: bool = True
    meta: dict = field(default_factory=dict)  # per-stage timings etc., for metrics


@dataclass
class Controls:
    """Live controls; None means "let the model decide". Units as ARCHITECTURE.md:
    pose (yaw, pitch, roll) in degrees; location = x of the nose tip in [-1, 1];
    scale = relative face scale (1.0 = the avatar's own)."""

    pose_deg: tuple[float, float, float] | None = None
    location: float | None = None
    scale: float | None = None


class Session(Protocol):
    """A live session: audio in (any chunk size and sample rate), frames with pts out."""

    def push_audio(
        self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, arrived: float | None = None
    ) -> None:
        """Append audio. ``samples``: (N,) or (N, C) float32/float64 in [-1, 1] or int16.
        ``arrived``: when the audio was due (``time.monotonic()``: a live source's arrival, a
        room's clock schedule; default now): a live session's render deadline counts from then.
        Raises ``engine.errors.UserError`` on bad input (NaN/inf, wrong dtype, after close)."""

    def push_silence(self, n_samples: int, arrived: float | None = None) -> None:
        """Advance the clock with silence (what a transport does when no speech arrives);
        ``arrived`` as for ``push_audio``."""

    def pull(self) -> list[OutputFrame]:
        """Frames that are ready, in pts order (may be empty). Non-blocking."""

    def interrupt(self) -> int:
        """Barge-in: drop all queued audio, features, motion and frames. Returns the number of
        input samples that were emitted (played) before the interrupt."""

    def set_controls(self, controls: Controls) -> None: ...

    def set_avatar(self, image: np.ndarray) -> None:
        """Switch the portrait ((H, W, 3) uint8 RGB, any size); takes effect at the next window."""

    def close(self) -> None: ...

    @property
    def latency_samples(self) -> int:
        """Nominal delay from an input sample to the frame that shows it (window + look-ahead)."""
        ...
