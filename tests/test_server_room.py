"""The room's worker and pacer on their own (no HTTP): live catch-up, compute timing, resampling."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest

from engine.session_api import SAMPLE_RATE, SAMPLES_PER_FRAME
from server.room import Room, RoomSettings
from server.standin import StandInSession, placeholder_face

FACE = placeholder_face(64)


def pcm_frame(samples: np.ndarray, rate: int) -> av.AudioFrame:
    """(N,) float in [-1, 1] -> an s16 mono AudioFrame, as a WebRTC track or /ws delivers."""
    frame = av.AudioFrame.from_ndarray(
        (np.asarray(samples) * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono"
    )
    frame.sample_rate = rate
    return frame


def tone(seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return amp * np.sin(2 * np.pi * 220 * t)


class StallingSession(StandInSession):
    """A stand-in that now and then takes far longer than a frame inside push_audio (an engine
    that hiccups: a GC pause, a slow denoiser window)."""

    def __init__(self, every_s: float, stall_s: float) -> None:
        super().__init__(FACE, size=32, latency_frames=2)
        self.every_s, self.stall_s = every_s, stall_s
        self.last = time.monotonic()
        self.stalls = 0

    def push_audio(self, samples, sample_rate=SAMPLE_RATE, arrived=None):  # noqa: ANN001, ANN201
        now = time.monotonic()
        if now - self.last > self.every_s:
            time.sleep(self.stall_s)
            self.stalls += 1
            self.last = time.monotonic()
        super().push_audio(samples, sample_rate)


def test_live_microphone_latency_stays_bounded_through_stalls() -> None:
    """A real-time mic (20 ms frames at 48 kHz) into a room whose engine stalls 400 ms every
    ~0.65 s: each stall delays the clock, but the queued input (the latency) does not keep
    growing with every stall; the excess is dropped and counted."""
    settings = RoomSettings()

    async def scenario() -> tuple[Room, list[int], list[float]]:
        room = Room("mic", StallingSession(0.25, 0.4), settings, asyncio.get_running_loop())
        room.start()
        mic = tone(4.0, 48000)
        pending: list[int] = []
        t0 = time.monotonic()
        for i, pos in enumerate(range(0, len(mic), 960)):
            await asyncio.sleep(max(0.0, t0 + i * 0.02 - time.monotonic()))
            assert room.push_input(pcm_frame(mic[pos : pos + 960], 48000), "mic", live=True)
            pending.append(room._pending_samples)  # input taken by the worker, not yet pushed
        await asyncio.sleep(0.1)
        latency = list(room.stats.latency_s)
        await room.close()
        return room, pending, latency

    room, pending, latency = asyncio.run(scenario())
    assert room.session.stalls >= 4 and room.stats.stalls >= 3
    # Without catch-up the backlog grows by the part of each stall the playout buffer does not
    # absorb (~200 ms here), stall after stall: ~0.9 s queued by the end, and rising. With it,
    # it stays under the threshold (plus a mic frame or two taken but not yet checked).
    bound = settings.live_max_pending_samples + 960
    assert np.median(pending[-60:]) <= bound, (bound, pending[-60:])
    assert room.stats.catchups > 0 and room.stats.input_skipped_samples > 0
    # End to end (input arrival -> frame sent) stays bounded too: about the nominal delay plus
    # lead plus the catch-up threshold plus a stall, ~0.65 s here, not growing (without the
    # fix: ~1.4 s by the end).
    assert len(latency) > 20 and max(latency[-20:]) < 0.95, latency[-20:]


def test_catch_up_applies_only_to_live_input() -> None:
    """A voice agent may push a whole utterance at once (not live): it is queued and played at
    real time, nothing dropped. The same burst from a live source is trimmed at once."""

    async def scenario(live: bool) -> tuple[Room, int]:
        room = Room("r", StandInSession(FACE, size=32), RoomSettings(), asyncio.get_running_loop())
        room.start()
        assert room.push_input(pcm_frame(tone(1.0, 16000), 16000), "src", live=live)
        await asyncio.sleep(0.3)
        queued = room._queued_input_samples
        await room.close()
        return room, queued

    room, queued = asyncio.run(scenario(live=False))
    assert room.stats.input_skipped_samples == 0 and room.stats.catchups == 0
    assert queued > 0.4 * SAMPLE_RATE  # still waiting its turn: buffering is intended here
    room, queued = asyncio.run(scenario(live=True))
    assert room.stats.catchups >= 1 and room.stats.input_skipped_samples > 0.5 * SAMPLE_RATE
    assert queued <= room.settings.live_max_pending_samples


def test_compute_time_includes_the_push() -> None:
    """The engine computes inside push_audio as well as pull: the compute metric sees both."""

    class SlowPush(StandInSession):
        def push_audio(self, samples, sample_rate=SAMPLE_RATE, arrived=None):  # noqa: ANN001, ANN201
            time.sleep(0.04)
            super().push_audio(samples, sample_rate)

    loop = asyncio.new_event_loop()
    try:
        room = Room("c", SlowPush(FACE, size=32, latency_frames=1), RoomSettings(), loop)
        room.push_input(pcm_frame(np.zeros(2 * SAMPLES_PER_FRAME), 16000), "s")
        room._step()  # one worker iteration, on this thread
        loop.run_until_complete(asyncio.sleep(0.01))  # deliver what the worker posted
        frames = [room._ready.get_nowait() for _ in range(room._ready.qsize())]
    finally:
        loop.close()
    assert len(frames) == 2
    # 40 ms of push spread over the two frames it produced.
    assert all(f.compute_ms >= 18 for f in frames), [f.compute_ms for f in frames]


def test_resampler_tail_does_not_leak_across_interrupt_or_source_switch() -> None:
    loop = asyncio.new_event_loop()
    try:
        room = Room("i", StandInSession(FACE, size=32), RoomSettings(), loop)
        loud = np.full(960, 0.5)
        for _ in range(3):
            room.push_input(pcm_frame(loud, 48000), "a")
        room._take_input()
        room._do_interrupt()  # the filter still holds the last few loud samples
        room.push_input(pcm_frame(np.zeros(960), 48000), "a")
        room._take_input()
        after = np.concatenate([c[0] for c in room._pending])
        assert len(after) and np.abs(after).max() < 1e-3, np.abs(after).max()

        # A source switch: the old source's last samples play (drained), then the new one's.
        room._do_interrupt()
        for _ in range(3):
            room.push_input(pcm_frame(loud, 48000), "a")
        room.push_input(pcm_frame(np.zeros(960), 48000), "b")
        room._take_input()
        x = np.concatenate([c[0] for c in room._pending])
        assert int(np.sum(np.abs(x) > 0.25)) >= 3 * 960 // 3 - 4  # all of a's 60 ms, near enough
    finally:
        loop.close()


def test_input_reaches_the_session_with_the_time_it_was_due() -> None:
    """Each push carries when its audio could first go in: the media clock's schedule for its
    last sample (clock + lead reaching it), or its arrival at the room if that was later. A
    session's render deadline (server.render_deadline_ms) counts from there: a worker behind
    schedule skips images; a microphone whose audio comes in late is not held against it."""

    class Recording(StandInSession):
        def __init__(self) -> None:
            super().__init__(FACE, size=32)
            self.pushes: list[tuple[int, float | None]] = []

        def push_audio(self, samples, sample_rate=SAMPLE_RATE, arrived=None):  # noqa: ANN001, ANN201
            self.pushes.append((len(samples), arrived))
            super().push_audio(samples, sample_rate)

    loop = asyncio.new_event_loop()
    try:
        for live in (True, False):
            session = Recording()
            room = Room("a", session, RoomSettings(), loop)
            lead = room.settings.lead_samples
            # a second of audio queued at once: pushed up to clock + lead, the rest waits
            room.push_input(pcm_frame(tone(1.0, 16000), 16000), "s", live=live)
            t_in = time.monotonic()
            room._step()  # one worker iteration, on this thread
            assert session.pushes, live
            pushed = 0
            for n, arrived in session.pushes:
                pushed += n
                due = room.clock.wall_time(pushed - lead)
                assert arrived is not None and arrived == pytest.approx(max(due, t_in), abs=0.01)
            room.clock.delay(0.3)  # a stall: the schedule of what follows moves with it
            time.sleep(0.5)
            before = len(session.pushes)
            room._step()
            assert len(session.pushes) > before, live
            for n, arrived in session.pushes[before:]:
                pushed += n
                assert arrived == pytest.approx(room.clock.wall_time(pushed - lead), abs=0.01)
    finally:
        loop.close()


def test_input_that_comes_in_after_its_slot_counts_from_its_arrival() -> None:
    """The clock ran on without input (silence filled the gap): a chunk that comes in now was
    due before it arrived, and its arrival is what the session gets."""

    class Recording(StandInSession):
        def __init__(self) -> None:
            super().__init__(FACE, size=32)
            self.pushes: list[float | None] = []

        def push_audio(self, samples, sample_rate=SAMPLE_RATE, arrived=None):  # noqa: ANN001, ANN201
            self.pushes.append(arrived)
            super().push_audio(samples, sample_rate)

    loop = asyncio.new_event_loop()
    try:
        session = Recording()
        room = Room("late", session, RoomSettings(), loop)
        time.sleep(0.3)
        room._step()  # silence up to the clock, less the slack
        assert room.stats.silence_samples > 0 and not session.pushes
        room.push_input(pcm_frame(tone(0.02, 16000), 16000), "mic", live=True)
        t_in = time.monotonic()
        room._step()
    finally:
        loop.close()
    assert session.pushes
    assert room.clock.wall_time(room._pushed - room.settings.lead_samples) < t_in - 0.02
    assert all(a == pytest.approx(t_in, abs=0.01) for a in session.pushes), (session.pushes, t_in)


def test_silence_is_pushed_with_the_time_it_was_due() -> None:
    """With no input the room fills silence once the clock is ``silence_slack`` past it; the
    push carries its schedule (clock + lead reaching its last sample), not the moment of the
    push, so a render deadline counts the slack too."""

    class Recording(StandInSession):
        def __init__(self) -> None:
            super().__init__(FACE, size=32)
            self.silences: list[tuple[int, float | None]] = []

        def push_silence(self, n_samples, arrived=None):  # noqa: ANN001, ANN201
            self.silences.append((n_samples, arrived))
            super().push_silence(n_samples)

    loop = asyncio.new_event_loop()
    try:
        session = Recording()
        room = Room("q", session, RoomSettings(), loop)
        time.sleep(0.3)
        room._step()
    finally:
        loop.close()
    (n, arrived), *_ = session.silences
    assert arrived is not None
    assert arrived == pytest.approx(room.clock.wall_time(n - room.settings.lead_samples), abs=1e-6)
    assert arrived < time.monotonic() - 0.1  # slack + lead before the push


def test_a_session_without_arrival_times_still_works() -> None:
    """A Session written before push_audio/push_silence took ``arrived`` (the protocol's
    optional keyword) is called without it."""

    class Old(StandInSession):
        def push_audio(self, samples, sample_rate=SAMPLE_RATE):  # noqa: ANN001, ANN201
            super().push_audio(samples, sample_rate)

        def push_silence(self, n_samples):  # noqa: ANN001, ANN201
            super().push_silence(n_samples)

    loop = asyncio.new_event_loop()
    try:
        room = Room("o", Old(FACE, size=32, latency_frames=1), RoomSettings(), loop)
        room.push_input(pcm_frame(tone(0.08, 16000), 16000), "s")
        room._step()
        time.sleep(0.3)
        room._step()  # and silence
        loop.run_until_complete(asyncio.sleep(0.01))  # deliver what the worker posted
        assert room._ready.qsize() > 0 and room.stats.silence_samples > 0
    finally:
        loop.close()


def test_repeated_images_are_reported_to_the_operator(caplog: pytest.LogCaptureFixture) -> None:
    """Frames the engine repeated to keep real time are counted and logged (once per 10 s),
    with the share still rendered: an operator learns the cores are too slow for the model."""

    class Repeating(StandInSession):
        n = 0

        def pull(self):  # noqa: ANN202
            frames = super().pull()
            for f in frames:
                f.meta["dropped"] = self.n % 2 == 1  # every other frame repeated
                self.n += 1
            return frames

    loop = asyncio.new_event_loop()
    try:
        session = Repeating(FACE, size=32, latency_frames=1)
        room = Room("slow", session, RoomSettings(), loop)
        room.push_input(pcm_frame(np.zeros(12 * SAMPLES_PER_FRAME), 16000), "s")
        shifted = False
        with caplog.at_level("WARNING", logger="livehead.room"):
            for _ in range(60):  # the room pushes input as its clock allows
                room._step()
                if session.n >= 6 and not shifted:
                    room._repeat_since -= 10.0  # as if 10 s had passed: report on the next frame
                    shifted = True
                if session.n >= 10:
                    break
                time.sleep(0.02)
    finally:
        loop.close()
    assert room.stats.engine_dropped >= 3
    lines = [r.getMessage() for r in caplog.records if "repeating images" in r.getMessage()]
    assert len(lines) == 1, lines
    pct = float(lines[0].split("rendered_pct=")[1].split()[0])
    assert 30 <= pct <= 70, lines  # every other frame repeated
