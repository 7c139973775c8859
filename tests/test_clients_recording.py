"""The mic client's recorder (``clients.rtc.AvRecording``) with fake sender-report clocks: where
each received video frame lands in the file against the audio, for each way reports can come."""

from __future__ import annotations

import numpy as np

from clients.rtc import AvRecording

AUDIO_RATE, VIDEO_RATE = 48000, 90000


class FakeClock:
    """A remote stream's sender reports: sender time = ``t0`` + pts / rate (+ ``jitter(pts)``)."""

    def __init__(self, rate: int, t0: float | None, jitter=lambda pts: 0.0) -> None:  # noqa: ANN001
        self.rate, self.t0, self.jitter = rate, t0, jitter

    @property
    def ready(self) -> bool:
        return self.t0 is not None

    def sender_time(self, pts: int) -> float | None:
        return None if self.t0 is None else self.t0 + pts / self.rate + self.jitter(pts)


class FakeRecorder:
    """``Mp4Recorder``'s interface: counts audio samples, keeps each video frame's time."""

    def __init__(self) -> None:
        self.samples = 0
        self.times: list[float] = []
        self.closed = False

    def audio(self, pcm: np.ndarray) -> None:
        self.samples += len(pcm)

    def video(self, rgb: np.ndarray, t_s: float) -> None:
        self.times.append(t_s)

    def close(self) -> None:
        self.closed = True


def record(clocks: dict, video_first_pts: int = 0, frames: int = 50) -> FakeRecorder:
    """Interleave 20 ms audio frames (pts from 0) and 40 ms video frames (pts from
    ``video_first_pts``) as they arrive over the wire, then close."""
    rec = FakeRecorder()
    av_rec = AvRecording(rec, clocks)  # type: ignore[arg-type]
    pcm = np.zeros(960, np.int16)
    rgb = np.zeros((4, 4, 3), np.uint8)
    for k in range(frames):
        av_rec.audio(2 * k * 960, pcm)
        av_rec.audio((2 * k + 1) * 960, pcm)
        av_rec.video(video_first_pts + k * 3600, rgb)
    av_rec.close()
    return rec


def test_a_common_start_places_video_by_its_own_timestamps() -> None:
    # Reports put both first frames at one instant, but video's move by up to 30 ms from
    # frame to frame (aiortc's own stamps under load): the recording ignores that jitter.
    # The reports are there before the first video frame (session 20's recorder then never
    # took the common start and placed every frame by the jittering reports).
    clocks = {
        "audio": FakeClock(AUDIO_RATE, 100.0),
        "video": FakeClock(VIDEO_RATE, 100.0, jitter=lambda pts: 0.03 * ((pts // 3600) % 2)),
    }
    rec = record(clocks)
    assert rec.closed and rec.samples == 100 * 960
    np.testing.assert_allclose(rec.times, np.arange(50) * 0.04, atol=1e-9)


def test_a_lost_first_frame_places_video_by_sender_time() -> None:
    # Video's first frame is 0.5 s after audio's by the reports (a keyframe wait, lost
    # frames): each frame goes where the reports say, relative to the first audio sample.
    clocks = {"audio": FakeClock(AUDIO_RATE, 100.0), "video": FakeClock(VIDEO_RATE, 100.5)}
    rec = record(clocks)
    np.testing.assert_allclose(rec.times, 0.5 + np.arange(50) * 0.04, atol=1e-9)


def test_no_sender_reports_falls_back_to_first_frames() -> None:
    # Reports never arrive: after MAX_HELD frames the first frames are taken as one start.
    clocks = {"audio": FakeClock(AUDIO_RATE, None), "video": FakeClock(VIDEO_RATE, None)}
    rec = record(clocks, video_first_pts=123456, frames=120)
    assert rec.samples == 240 * 960 and len(rec.times) == 120
    np.testing.assert_allclose(rec.times, np.arange(120) * 0.04, atol=1e-9)
