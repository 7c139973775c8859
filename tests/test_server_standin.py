"""The stand-in session honours the engine's Session contract."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import UserError
from engine.session_api import SAMPLES_PER_FRAME, Controls
from server.standin import StandInSession, placeholder_face
from tests.test_server_support import mouth_openness


def make(**kw) -> StandInSession:  # noqa: ANN003
    return StandInSession(placeholder_face(128), size=64, **kw)


def test_frames_follow_input_after_nominal_latency() -> None:
    s = make(latency_frames=3)
    assert s.latency_samples == 3 * SAMPLES_PER_FRAME
    s.push_audio(np.zeros(2 * SAMPLES_PER_FRAME + 639, np.float32))
    assert s.pull() == []  # input does not yet cover frame 0 + look-ahead
    s.push_audio(np.zeros(1, np.float32))
    (f,) = s.pull()
    assert f.pts_samples == 0 and f.image.shape == (64, 64, 3) and f.image.dtype == np.uint8
    assert f.audio.shape == (SAMPLES_PER_FRAME,) and f.audio.dtype == np.float32
    s.push_silence(10 * SAMPLES_PER_FRAME)
    frames = s.pull()
    assert [x.pts_samples for x in frames] == [n * SAMPLES_PER_FRAME for n in range(1, 11)]


def test_chunking_does_not_change_output() -> None:
    """Streaming parity: any chunking of the same input gives the same frames."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20 * SAMPLES_PER_FRAME) * 0.1).astype(np.float32)
    whole, parts = make(), make()
    whole.push_audio(x)
    a = whole.pull()
    b = []
    for chunk in np.array_split(x, 37):
        parts.push_audio(chunk)
        b += parts.pull()
    assert [f.pts_samples for f in a] == [f.pts_samples for f in b]
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.image, fb.image)
        np.testing.assert_array_equal(fa.audio, fb.audio)


def test_mouth_follows_loudness_and_audio_is_returned() -> None:
    s = make(latency_frames=1)
    quiet = np.zeros(SAMPLES_PER_FRAME, np.float32)
    loud = (0.3 * np.sin(np.arange(SAMPLES_PER_FRAME) / 5)).astype(np.float32)
    s.push_audio(np.concatenate([quiet, loud]))
    f_quiet, f_loud = s.pull()
    assert mouth_openness(f_loud.image) > 3 * mouth_openness(f_quiet.image) + 0.05
    assert f_loud.speech and not f_quiet.speech
    np.testing.assert_allclose(f_loud.audio, loud, atol=1e-6)


def test_int16_stereo_and_other_rates_are_accepted() -> None:
    s = make(latency_frames=1)
    s.push_audio(np.zeros((4800, 2), np.int16), 48000)  # 100 ms at 48 kHz -> 1600 at 16 kHz
    assert len(s.pull()) == 2
    s.push_audio(np.zeros(800, np.float64), 8000)  # +1600: 320 left over + 1600 = 3 frames
    assert len(s.pull()) == 3


@pytest.mark.parametrize(
    "bad",
    [
        np.array([0.0, np.nan], np.float32),
        np.array([np.inf], np.float64),
        np.zeros(10, np.int32),
        np.zeros((2, 2, 2), np.float32),
    ],
)
def test_bad_audio_is_refused(bad: np.ndarray) -> None:
    with pytest.raises(UserError):
        make().push_audio(bad)


def test_bad_rate_and_closed_session_are_refused() -> None:
    s = make()
    with pytest.raises(UserError):
        s.push_audio(np.zeros(10, np.float32), 0)
    s.close()
    with pytest.raises(UserError, match="closed"):
        s.push_audio(np.zeros(10, np.float32))


def test_interrupt_drops_queued_audio_and_reports_emitted() -> None:
    s = make(latency_frames=3)
    s.push_silence(10 * SAMPLES_PER_FRAME)
    assert len(s.pull()) == 8
    s.push_silence(5 * SAMPLES_PER_FRAME)
    assert s.interrupt() == 8 * SAMPLES_PER_FRAME
    assert s.pull() == []
    s.push_silence(3 * SAMPLES_PER_FRAME)
    (f,) = s.pull()
    assert f.pts_samples == 8 * SAMPLES_PER_FRAME  # the timeline goes on from the interrupt


def test_controls_and_avatar_change_the_image() -> None:
    s = make(latency_frames=1)
    s.push_silence(SAMPLES_PER_FRAME)
    (base,) = s.pull()
    s.set_controls(Controls(pose_deg=(10.0, 0.0, 15.0), location=0.5, scale=1.3))
    s.push_silence(SAMPLES_PER_FRAME)
    (moved,) = s.pull()
    assert np.abs(moved.image.astype(int) - base.image).mean() > 5
    s.set_avatar(np.full((100, 80, 3), 200, np.uint8))
    s.set_controls(Controls())
    s.push_silence(SAMPLES_PER_FRAME)
    (other,) = s.pull()
    assert other.image[:10, :10].mean() == pytest.approx(200, abs=1)
    with pytest.raises(UserError):
        s.set_avatar(np.zeros((10, 10), np.uint8))


def test_placeholder_face_is_a_face() -> None:
    face = placeholder_face(256)
    assert face.shape == (256, 256, 3) and face.dtype == np.uint8
    skin = np.all(np.abs(face.astype(int) - (232, 190, 160)) < 25, axis=-1)
    assert 0.1 < skin.mean() < 0.5
