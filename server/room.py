"""A room: one session, its worker thread, its pacer, and everyone who receives it.

    input (mic frames, WebSocket PCM)          event loop
        -> Room.push_input ------------------> [thread-safe queue]
    worker thread (one per room)                 |
        resample to 16 kHz, push up to the clock, fill silence, session.pull(),
        encode once (VP8 + Opus for WebRTC, JPEG for WebSocket) -> ReadyFrame
    pacer (asyncio task)                         |
        sleep until the frame's slot on the media clock, then hand the same packets to every
        subscriber: WebRTC tracks (aiortc sends on recv) and WebSocket connections.

Timing rules (STREAMING.md): one ``MediaClock`` per room, in 16 kHz samples. Frame pts P is sent
when the clock reaches P + ``delay_samples`` (the engine's nominal latency plus a small playout
buffer). Input is pushed into the session only up to the clock plus a short lead, so a voice
agent that pushes ten seconds of speech at once queues it here (where ``clear`` drops it), not as
rendered frames. When no input arrives, silence keeps the clock moving. A late frame holds both
tracks (the clock waits, the viewer keeps the last picture) because audio is never dropped or
stretched; a frame that is already late when it is pulled has its video dropped before encoding
(its audio still plays) so the worker catches up. Output pts are a contiguous counter: after an
interrupt the timeline jumps, the transport's pts do not.

Live input (a microphone over WebRTC/WHIP, ``push_input(..., live=True)``) keeps arriving in real
time while the clock waits for a late frame, so each stall would add its length to the latency
for good. For such a source bounded latency wins: once its queued input passes lead + playout +
slack (``live_max_pending_samples``), the oldest excess is dropped (down to ``lead``) and counted
(``stats.input_skipped_samples``). The frames already rendered keep their slots, so nothing is
sent late or in a burst and no rendering is wasted. Input that is not live (a voice agent's TTS
over the WebSocket, which may push faster than real time) is queued, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import av
import numpy as np
from PIL import Image

from engine.config import Config
from engine.errors import UserError
from engine.session_api import SAMPLE_RATE, SAMPLES_PER_FRAME, Controls, OutputFrame, Session
from server.media import (
    AUDIO_TIME_BASE,
    OPUS_FRAME_SAMPLES,
    VIDEO_TIME_BASE,
    MediaClock,
    OpusEncoder,
    PacketTrack,
    Vp8Encoder,
    int16_pcm,
    video_pts,
)

log = logging.getLogger("livehead.room")
T = TypeVar("T")

FRAME_S = SAMPLES_PER_FRAME / SAMPLE_RATE  # 0.04 s
STALL_TOLERANCE_S = 0.005  # a frame this late is "on time": asyncio timers are ~1 ms coarse
KEYFRAME_MIN_INTERVAL_S = 0.5  # PLIs from many viewers must not turn every frame into a keyframe


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Does ``fn`` accept keyword ``name`` (by name or through ``**kwargs``)?"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def kv(**fields: Any) -> str:
    """key=value log formatting (values with spaces are quoted)."""
    out = []
    for k, v in fields.items():
        s = f"{v:.4g}" if isinstance(v, float) else str(v)
        out.append(f'{k}="{s}"' if " " in s or not s else f"{k}={s}")
    return " ".join(out)


@dataclass(frozen=True)
class RoomSettings:
    """Per-room timing and encoding knobs, resolved from the config."""

    playout_samples: int = 3 * SAMPLES_PER_FRAME
    lead_samples: int = 2 * SAMPLES_PER_FRAME
    silence_slack_samples: int = 960  # 60 ms
    max_input_samples: int = 30 * SAMPLE_RATE
    # Live sources: queued input beyond this is dropped, down to live_catchup_to_samples.
    live_max_pending_samples: int = (2 + 3) * SAMPLES_PER_FRAME + 960
    live_catchup_to_samples: int = 2 * SAMPLES_PER_FRAME
    max_ready_frames: int = 8
    video_bitrate: int = 1_000_000
    keyframe_interval: int = 50
    jpeg_quality: int = 80
    track_queue: int = 8
    ws_queue_frames: int = 50
    tick_s: float = 0.01

    @classmethod
    def from_config(cls, cfg: Config) -> RoomSettings:
        s = cfg.server
        return cls(
            playout_samples=s.playout_frames * SAMPLES_PER_FRAME,
            lead_samples=s.input_lead_frames * SAMPLES_PER_FRAME,
            silence_slack_samples=s.silence_slack_ms * SAMPLE_RATE // 1000,
            max_input_samples=int(s.max_input_buffer_s * SAMPLE_RATE),
            live_max_pending_samples=(s.input_lead_frames + s.playout_frames) * SAMPLES_PER_FRAME
            + s.live_catchup_slack_ms * SAMPLE_RATE // 1000,
            live_catchup_to_samples=s.input_lead_frames * SAMPLES_PER_FRAME,
            # The pacer's queue holds lead + playout frames in steady state; beyond that plus
            # the configured video queue, video is dropped before encoding.
            max_ready_frames=s.input_lead_frames + s.playout_frames + cfg.stream.video_queue_frames,
            video_bitrate=s.video_bitrate,
            keyframe_interval=s.keyframe_interval_frames,
            jpeg_quality=s.jpeg_quality,
            ws_queue_frames=s.ws_queue_frames,
        )


@dataclass
class ReadyFrame:
    """One output frame, encoded once, waiting for its slot. Built by the worker."""

    pts: int  # session timeline (16 kHz samples)
    width: int
    height: int
    pcm: bytes  # 640 x s16le mono, 16 kHz
    speech: bool
    video: av.Packet | None  # VP8, None when dropped or no WebRTC subscriber
    audio: list[av.Packet]  # two 20 ms Opus packets (empty without WebRTC subscribers)
    jpeg: bytes | None  # None when dropped or no WebSocket subscriber
    compute_ms: float  # engine wall time (push_audio/push_silence + pull) per frame, measured here
    stages_ms: dict[str, float]  # the engine's own per-stage timings (meta keys "*_ms")
    t_ready: float


@dataclass
class SentFrame:
    """What the pacer tells subscribers about a frame it releases."""

    frame: ReadyFrame
    out_pts: int  # contiguous output timeline (16 kHz samples)
    played_samples: int  # presenter speech played so far (16 kHz), through this frame


@dataclass
class _Segment:
    start: int
    end: int
    speech: bool
    t_arrival: float


class RtpSubscriber:
    """A WebRTC peer's outgoing tracks. Audio waits for the video's first keyframe, so a new
    viewer's tracks start within one frame of each other."""

    def __init__(self, room: Room, video: bool = True, audio: bool = True) -> None:
        self.video = (
            PacketTrack("video", room.settings.track_queue, room.request_keyframe)
            if video
            else None
        )
        self.audio = PacketTrack("audio", room.settings.track_queue) if audio else None
        self._audio_on = self.video is None

    def deliver_video(self, video: av.Packet | None) -> None:
        if self.video is not None and video is not None:
            self.video.put(video)
            if not self._audio_on and self.video.synced:
                self._audio_on = True

    def deliver_audio(self, audio: list[av.Packet]) -> None:
        if self.audio is not None and self._audio_on:
            for p in audio:
                self.audio.put(p)

    def stop(self) -> None:
        for t in (self.video, self.audio):
            if t is not None:
                t.stop()


class WsSubscriber:
    """A WebSocket connection's outgoing frames: a bounded queue drained by its handler."""

    def __init__(self, max_queue: int) -> None:
        self.queue: asyncio.Queue[SentFrame | None] = asyncio.Queue()
        self.max_queue = max_queue
        self.dropped = 0

    def deliver(self, sent: SentFrame) -> None:
        if self.queue.qsize() >= self.max_queue:
            self.queue.get_nowait()  # a client this slow loses its oldest frame, not memory
            self.dropped += 1
        self.queue.put_nowait(sent)

    def stop(self) -> None:
        self.queue.put_nowait(None)


@dataclass
class RoomStats:
    """Counters and recent samples for /metrics (read on the event loop)."""

    created: float = field(default_factory=time.monotonic)
    frames_sent: int = 0
    frames_encoded: int = 0  # VP8 encodes: once per frame however many viewers
    video_dropped: int = 0
    engine_dropped: int = 0  # frames the engine itself marked dropped (meta["dropped"])
    engine_fast: int = 0  # frames the engine drew by its draft exit (meta["fast"])
    frames_flushed: int = 0  # discarded by interrupts
    stalls: int = 0
    stall_seconds: float = 0.0
    input_dropped_samples: int = 0
    input_skipped_samples: int = 0  # live input dropped to catch up after stalls (16 kHz)
    catchups: int = 0
    silence_samples: int = 0
    first_frame_s: float | None = None
    latency_s: deque = field(default_factory=lambda: deque(maxlen=500))
    compute_ms: deque = field(default_factory=lambda: deque(maxlen=500))
    stages_ms: dict[str, deque] = field(default_factory=dict)
    send_times: deque = field(default_factory=lambda: deque(maxlen=51))

    def fps(self) -> float:
        t = self.send_times
        if len(t) < 2 or time.monotonic() - t[-1] > 1.0:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])


class Room:
    """One live session and its fan-out. Create on the event loop, then ``start()``."""

    def __init__(
        self,
        name: str,
        session: Session,
        settings: RoomSettings,
        loop: asyncio.AbstractEventLoop,
        on_failed: Callable[[Room, BaseException], None] | None = None,
    ) -> None:
        self.name = name
        self.session = session
        self.settings = settings
        self.clock = MediaClock()
        self.delay_samples = int(session.latency_samples) + settings.playout_samples
        self.stats = RoomStats()
        self._loop = loop
        self._on_failed = on_failed
        # event loop -> worker
        self._inputs: queue.SimpleQueue[tuple[str, av.AudioFrame, float, bool]] = (
            queue.SimpleQueue()
        )
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._queued_input_samples = 0  # approximate, 16 kHz; guards max_input_samples
        # worker -> event loop
        self._ready: asyncio.Queue[ReadyFrame] = asyncio.Queue()
        # shared between worker and pacer (under _lock)
        self._lock = threading.Lock()
        self._next_pts = 0  # session pts of the next frame the pacer will send
        self._discard_below = 0
        self._segments: deque[_Segment] = deque()
        self._played_speech = 0
        self._ready_depth = 0
        self._keyframe_requested = True
        self._want_rtp = False
        self._want_ws = False
        # worker-only state
        self._pending: deque[list] = deque()  # [float32 16 kHz chunk, t_arrival]
        self._pending_samples = 0
        self._pushed = 0
        self._speech_end = 0
        self._flush_requested = False
        self._flush_callbacks: list[Callable[[int], None]] = []
        self._resampler: av.AudioResampler | None = None
        self._resampler_source = ""
        self._live = False  # the latest input came from a live (real-time) source
        self._compute_ms = 0.0  # engine time not yet attributed to an emitted frame
        self._last_catchup_log = 0.0
        # A Session written before push_audio/push_silence took ``arrived`` still works (its
        # windows are then timed from the push).
        self._timed_pushes = all(
            _takes_keyword(getattr(session, m), "arrived") for m in ("push_audio", "push_silence")
        )
        # the current 10 s window of the repeat warning: its start, frames, engine_dropped then
        self._repeat_since = time.monotonic()
        self._repeat_frames = 0
        self._repeat_base = 0
        self._vp8 = Vp8Encoder(settings.video_bitrate, settings.keyframe_interval)
        self._opus = OpusEncoder()
        self._last_keyframe = 0.0
        # event-loop-only state
        self._out_pts = 0
        self._media_origin_unix: float | None = None  # time.time() of output media time 0
        self._rtp: set[RtpSubscriber] = set()
        self._ws: set[WsSubscriber] = set()
        self._flush_waiters: list[tuple[int, Callable[[int], None]]] = []
        self._pacer: asyncio.Task | None = None
        self._close_task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name=f"livehead-room-{name}", daemon=True)
        self.closed = False
        self.failed: BaseException | None = None
        self.size = (0, 0)

    # ---------------------------------------------------------------------------------------
    # Event-loop API
    # ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._pacer = self._loop.create_task(self._pace(), name=f"livehead-pacer-{self.name}")
        self._pacer.add_done_callback(self._pacer_done)

    def push_input(self, frame: av.AudioFrame, source: str, live: bool = False) -> bool:
        """Queue input audio (any rate, s16/flt, mono/stereo). False when the buffer is full.

        live: the source produces audio in real time (a microphone): when output stalls, its
        oldest queued input is dropped to keep latency bounded. Not live (a TTS pipeline that
        may push faster than real time): input is queued up to ``max_input_samples``."""
        n16 = frame.samples * SAMPLE_RATE // max(1, frame.sample_rate)
        if self._queued_input_samples + n16 > self.settings.max_input_samples:
            self.stats.input_dropped_samples += n16
            return False
        with self._lock:
            self._queued_input_samples += n16
        self._inputs.put((source, frame, time.monotonic(), live))
        self._wake.set()
        return True

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread (between frames) and return its result."""
        if self.closed:
            raise UserError(f"room '{self.name}' is closed")
        fut: asyncio.Future = self._loop.create_future()
        self._commands.put((fn, fut))
        self._wake.set()
        if not self._thread.is_alive():
            self._fail_commands()  # the worker is gone (failed): nobody else will answer
        return await fut

    async def interrupt(self) -> int:
        """Barge-in: drop queued input and frames; returns presenter samples played (16 kHz)."""
        return await self.call(self._do_interrupt)

    async def set_controls(self, controls: Controls) -> None:
        await self.call(lambda: self.session.set_controls(controls))

    async def set_avatar(self, rgb: np.ndarray) -> None:
        await self.call(lambda: self.session.set_avatar(rgb))

    async def request_flush(self) -> int:
        """Resolve once every presenter sample queued so far has been sent; returns the played
        count (16 kHz) at that point. An interrupt resolves it early."""
        fut: asyncio.Future = self._loop.create_future()

        def done(played: int) -> None:
            if not fut.done():
                fut.set_result(played)

        def mark() -> None:
            self._take_input()
            self._drain_resampler()  # its filter holds the last few samples back
            self._flush_requested = True
            self._flush_callbacks.append(done)

        await self.call(mark)
        return await fut

    def media_unix_time(self, seconds: float) -> float | None:
        """The ``time.time()`` instant of output media time ``seconds`` (pts / clock rate):
        fixed when the first frame goes out, one line for audio and video alike, so RTCP
        sender reports built on it (``report_media_time``) describe one timeline. A stall does
        not move it: later packets are simply late. None before the first frame."""
        origin = self._media_origin_unix
        return None if origin is None else origin + seconds

    def add_rtp(self, sub: RtpSubscriber) -> None:
        self._rtp.add(sub)
        self._want_rtp = True
        self.request_keyframe(force=True)

    def remove_rtp(self, sub: RtpSubscriber) -> None:
        self._rtp.discard(sub)
        sub.stop()
        self._want_rtp = bool(self._rtp)

    def add_ws(self, sub: WsSubscriber) -> None:
        self._ws.add(sub)
        self._want_ws = True

    def remove_ws(self, sub: WsSubscriber) -> None:
        self._ws.discard(sub)
        sub.stop()
        self._want_ws = bool(self._ws)

    def request_keyframe(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_keyframe > KEYFRAME_MIN_INTERVAL_S:
            self._last_keyframe = now
            self._keyframe_requested = True

    @property
    def queue_depth(self) -> int:
        return self._ready_depth

    @property
    def input_queued_ms(self) -> float:
        return self._queued_input_samples * 1000 / SAMPLE_RATE

    @property
    def subscribers(self) -> tuple[int, int]:
        return len(self._rtp), len(self._ws)

    async def close(self) -> None:
        """Stop the pacer and the worker, close the session, end every subscriber's stream."""
        if self.closed:
            return
        self.closed = True
        self._stopping.set()
        self._wake.set()
        if self._pacer is not None:
            self._pacer.cancel()
            # A pacer that failed has been logged (and failed the room) by _pacer_done.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pacer
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 10)
        for sub in list(self._rtp):
            self.remove_rtp(sub)
        for ws in list(self._ws):
            self.remove_ws(ws)
        # Whoever waits for a flush learns that nothing more will be played.
        for cb in [cb for _, cb in self._flush_waiters] + self._flush_callbacks:
            cb(self._played_speech)
        self._flush_waiters.clear()
        self._flush_callbacks.clear()

    # ---------------------------------------------------------------------------------------
    # Worker thread
    # ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.wait(self.settings.tick_s)
                self._wake.clear()
                self._step()
        except Exception as e:  # the session or an encoder broke: the room cannot go on
            log.exception("room worker failed %s", kv(room=self.name))
            self.failed = e
            if self._on_failed is not None:
                self._loop.call_soon_threadsafe(self._on_failed, self, e)
        finally:
            self._fail_commands()
            try:
                self.session.close()
            except Exception:
                log.exception("session close failed %s", kv(room=self.name))

    def _step(self) -> None:
        """One worker iteration: commands, input, feed the session, emit what it rendered."""
        self._run_commands()
        self._take_input()
        # The engine computes inside push_audio/push_silence as well as in pull: time both, and
        # spread it over the frames that come out (a push may render nothing yet).
        t0 = time.perf_counter()
        self._feed()
        frames = self.session.pull()
        self._compute_ms += (time.perf_counter() - t0) * 1000
        if frames:
            per_frame, self._compute_ms = self._compute_ms / len(frames), 0.0
            for f in frames:
                self._emit(f, per_frame)

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        # RuntimeError: the loop is closed (process shutdown), nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except Exception as e:
                self._post(_set_exception, fut, e)
            else:
                self._post(_set_result, fut, result)

    def _fail_commands(self) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            self._post(_set_exception, fut, UserError(f"room '{self.name}' is closed"))

    def _take_input(self) -> None:
        """Inputs -> 16 kHz mono float32 chunks in ``_pending`` (resampling is stateful, per
        source, so chunk edges leave no artefacts)."""
        while True:
            try:
                source, frame, t_arrival, live = self._inputs.get_nowait()
            except queue.Empty:
                return
            n16 = frame.samples * SAMPLE_RATE // max(1, frame.sample_rate)
            with self._lock:
                self._queued_input_samples -= n16
            if source != self._resampler_source:
                # A new source: the old one's last samples (held in the filter) still play.
                self._drain_resampler()
            if self._resampler is None:
                self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                self._resampler_source = source
            self._live = live
            frame.pts = None  # the resampler must not "fix" gaps between chunks with silence
            for out in self._resampler.resample(frame):
                x = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                if len(x):
                    self._pending.append([x, t_arrival])
                    self._pending_samples += len(x)
                    with self._lock:
                        self._queued_input_samples += len(x)

    def _drain_resampler(self) -> None:
        if self._resampler is None:
            return
        for out in self._resampler.resample(None):
            x = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            if len(x):
                self._pending.append([x, time.monotonic()])
                self._pending_samples += len(x)
                with self._lock:
                    self._queued_input_samples += len(x)
        self._resampler = None  # a flushed resampler takes no more input: start a new one

    def _feed(self) -> None:
        """Push pending input up to clock + lead; fill silence when input is missing."""
        now = self.clock.now_samples()
        target = now + self.settings.lead_samples
        while self._pending and self._pushed < target:
            chunk = self._pending[0]
            x, t_arrival = chunk
            n = min(len(x), target - self._pushed)
            if n < len(x):
                chunk[0] = x[n:]
                x = x[:n]
            else:
                self._pending.popleft()
            self._pending_samples -= n
            with self._lock:
                self._queued_input_samples -= n
            # Counted from when it could first go in: the media clock's schedule for its last
            # sample (clock + lead reaching it; a stall moves that too) or its arrival, the
            # later. A session with a render deadline (server.render_deadline_ms) skips
            # rendering a window the worker reaches that far behind, so a host too slow for
            # real time repeats images instead of stalling the clock and dropping the
            # microphone's audio.
            self.session.push_audio(x, SAMPLE_RATE, **self._due(self._pushed + n, t_arrival))
            self._add_segment(self._pushed, self._pushed + n, True, t_arrival)
            self._pushed += n
            self._speech_end = self._pushed
        if self._live and self._pending_samples > self.settings.live_max_pending_samples:
            self._catch_up()
        floor = now - self.settings.silence_slack_samples
        if not self._pending and self._pushed < floor:
            # No input for a while: silence advances the timeline (idle motion, clock).
            n = floor - self._pushed
            self.session.push_silence(n, **self._due(floor))
            self._add_segment(self._pushed, self._pushed + n, False, time.monotonic())
            self._pushed += n
            self.stats.silence_samples += n
        if self._flush_requested and not self._pending:
            self._flush_requested = False
            end, callbacks = self._speech_end, self._flush_callbacks
            self._flush_callbacks = []
            for cb in callbacks:
                self._post(self._add_flush_waiter, end, cb)

    def _catch_up(self) -> None:
        """Live input outran the clock (output stalled while the microphone kept talking): drop
        the oldest queued input down to ``live_catchup_to_samples``, so the latency a stall added
        does not stay for good. Rendered frames keep their slots: nothing is sent late."""
        drop = self._pending_samples - self.settings.live_catchup_to_samples
        left = drop
        while left > 0 and self._pending:
            chunk = self._pending[0]
            if len(chunk[0]) <= left:
                left -= len(chunk[0])
                self._pending.popleft()
            else:
                chunk[0] = chunk[0][left:]
                left = 0
        dropped = drop - left
        self._pending_samples -= dropped
        with self._lock:
            self._queued_input_samples -= dropped
        self.stats.input_skipped_samples += dropped
        self.stats.catchups += 1
        now = time.monotonic()
        if now - self._last_catchup_log > 5.0:
            self._last_catchup_log = now
            log.warning(
                "live input behind, catching up %s",
                kv(
                    room=self.name,
                    dropped_ms=dropped * 1000 / SAMPLE_RATE,
                    total_dropped_s=self.stats.input_skipped_samples / SAMPLE_RATE,
                    catchups=self.stats.catchups,
                ),
            )

    def _due(self, end: int, arrived: float = -math.inf) -> dict[str, float]:
        """``arrived=`` for a push ending at sample ``end``: when the clock + lead reached it, or
        ``arrived`` if later ({} for a session that does not take it)."""
        if not self._timed_pushes:
            return {}
        return {"arrived": max(self.clock.wall_time(end - self.settings.lead_samples), arrived)}

    def _note_repeats(self) -> None:
        """Every 10 s in which the engine repeated at least 5 % of the frames to keep real time
        (server.render_deadline_ms on cores too slow for this model), tell the operator and how
        many frames it still rendered. (A room pulls every frame at once, so the session's
        other reason to repeat images, an overfull output queue, does not arise here.)"""
        self._repeat_frames += 1
        now = time.monotonic()
        if now - self._repeat_since < 10.0:
            return
        frames, repeated = self._repeat_frames, self.stats.engine_dropped - self._repeat_base
        if repeated >= 0.05 * frames:
            log.warning(
                "rendering behind real time, repeating images %s",
                kv(
                    room=self.name,
                    rendered_pct=round(100.0 * (frames - repeated) / frames, 1),
                    frames=frames,
                    engine_dropped_total=self.stats.engine_dropped,
                    engine_fast_total=self.stats.engine_fast,
                ),
            )
        self._repeat_since, self._repeat_frames = now, 0
        self._repeat_base = self.stats.engine_dropped

    def _add_segment(self, start: int, end: int, speech: bool, t_arrival: float) -> None:
        # Not merged: each keeps its own arrival time, for the latency metric. They live only
        # from push to send (a few hundred ms), so there are few.
        with self._lock:
            self._segments.append(_Segment(start, end, speech, t_arrival))

    def _emit(self, f: OutputFrame, compute_ms: float) -> None:
        """Encode one output frame once and queue it for the pacer."""
        image = np.ascontiguousarray(f.image)
        h, w = image.shape[:2]
        due = self.clock.wall_time(f.pts_samples + self.delay_samples)
        late = time.monotonic() - due > FRAME_S
        with self._lock:
            congested = self._ready_depth >= self.settings.max_ready_frames
        drop_video = late or congested
        if f.meta.get("dropped"):
            self.stats.engine_dropped += 1  # the engine repeated an image to keep up
        if f.meta.get("fast"):
            self.stats.engine_fast += 1  # ... or drew it by its cheaper draft exit
        self._note_repeats()
        pcm16 = int16_pcm(np.asarray(f.audio, dtype=np.float32))
        video, audio, jpeg = None, [], None
        if self._want_rtp:
            if not drop_video:
                keyframe = self._keyframe_requested
                self._keyframe_requested = False
                video = self._vp8.encode(image, force_keyframe=keyframe)
                self.stats.frames_encoded += 1
            audio = self._opus.encode(pcm16)
        else:
            self._vp8.reset()  # the next subscriber starts from a keyframe
        if self._want_ws and not drop_video:
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="JPEG", quality=self.settings.jpeg_quality)
            jpeg = buf.getvalue()
        item = ReadyFrame(
            f.pts_samples,
            w,
            h,
            pcm16.tobytes(),
            bool(f.speech),
            video,
            audio,
            jpeg,
            compute_ms,
            {
                k[:-3]: float(v)
                for k, v in f.meta.items()
                if k.endswith("_ms") and isinstance(v, int | float) and not isinstance(v, bool)
            },
            time.monotonic(),
        )
        with self._lock:
            self._ready_depth += 1
        if drop_video:
            self._post(self._count_video_drop)
        self._post(self._ready.put_nowait, item)

    def _do_interrupt(self) -> int:
        """Worker side of ``interrupt``: everything not yet sent is forgotten."""
        emitted = int(self.session.interrupt())
        self._take_input()  # input that arrived before the interrupt is dropped with the rest
        self._resampler = None  # and so is what its filter still holds (no tail leaks through)
        self._pending.clear()
        with self._lock:
            self._queued_input_samples -= self._pending_samples
            self._pending_samples = 0
            next_pts = self._next_pts
            self._discard_below = emitted
            # Frames [next_pts, emitted) were rendered but will not be sent: jump the clock so
            # the frame at ``emitted`` takes the slot of the first dropped one.
            if emitted > next_pts:
                self.clock.skip(emitted - next_pts)
            self._segments.clear()
            played = self._played_speech
        self._pushed = emitted
        self._speech_end = emitted
        self._flush_requested = False
        callbacks, self._flush_callbacks = self._flush_callbacks, []
        self._post(self._fire_flush_waiters, played, callbacks)
        return played

    # ---------------------------------------------------------------------------------------
    # Pacer (event loop)
    # ---------------------------------------------------------------------------------------
    def _pacer_done(self, task: asyncio.Task) -> None:
        """Output must not stop silently: a pacer that raised fails the room."""
        if task.cancelled() or self.closed:
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("room pacer failed %s", kv(room=self.name), exc_info=exc)
        self.failed = exc
        if self._on_failed is not None:
            self._on_failed(self, exc)  # the server drops every member; the last closes the room
        else:
            self._close_task = self._loop.create_task(self.close())

    def _count_video_drop(self) -> None:
        self.stats.video_dropped += 1

    def _add_flush_waiter(self, end: int, cb: Callable[[int], None]) -> None:
        with self._lock:
            sent_up_to = self._next_pts
            played = self._played_speech
        if end <= sent_up_to:
            cb(played)
        else:
            self._flush_waiters.append((end, cb))

    def _fire_flush_waiters(self, played: int, extra: list[Callable[[int], None]]) -> None:
        waiters, self._flush_waiters = self._flush_waiters, []
        for _, cb in waiters:
            cb(played)
        for cb in extra:
            cb(played)

    async def _pace(self) -> None:
        while True:
            item = await self._ready.get()
            with self._lock:
                self._ready_depth -= 1
                stale = item.pts < self._discard_below
            if stale:
                self.stats.frames_flushed += 1
                continue
            due = self.clock.wall_time(item.pts + self.delay_samples)
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -STALL_TOLERANCE_S:
                # The frame is late: hold both tracks (the viewer keeps the last picture)
                # and move the clock, so input and later frames wait with it.
                self.clock.delay(-wait)
                self.stats.stalls += 1
                self.stats.stall_seconds += -wait
            t_send = time.monotonic()
            with self._lock:
                if item.pts < self._discard_below:  # an interrupt came while we slept
                    self.stats.frames_flushed += 1
                    continue
                self._next_pts = item.pts + SAMPLES_PER_FRAME
                speech, t_arrival = self._account(item.pts)
                self._played_speech += speech
                played = self._played_speech
            out_pts = self._out_pts
            self._out_pts += SAMPLES_PER_FRAME
            self._stamp(item, out_pts)
            # Opus decodes ``delay`` late, so the audio leaves that much before the picture
            # (stamps and send times both).
            delay_s = self._opus.delay_samples / SAMPLE_RATE
            if self._media_origin_unix is None:  # the picture of this pts leaves at t_send + delay
                unix_send = time.time() - (time.monotonic() - t_send)
                self._media_origin_unix = unix_send + delay_s - out_pts / SAMPLE_RATE
            for sub in list(self._rtp):
                sub.deliver_audio(item.audio[:1])
            await asyncio.sleep(max(0.0, t_send + delay_s - time.monotonic()))
            for sub in list(self._rtp):
                sub.deliver_video(item.video)
            if self._ws:
                sent = SentFrame(item, out_pts, played)
                for ws in list(self._ws):
                    ws.deliver(sent)
            st = self.stats
            st.frames_sent += 1
            st.send_times.append(t_send)
            st.compute_ms.append(item.compute_ms)
            for stage, ms in item.stages_ms.items():
                st.stages_ms.setdefault(stage, deque(maxlen=500)).append(ms)
            if t_arrival is not None:
                st.latency_s.append(t_send - t_arrival)
            if st.first_frame_s is None:
                st.first_frame_s = t_send - st.created
                log.info("first frame %s", kv(room=self.name, after_s=st.first_frame_s))
            if self._flush_waiters:
                done = [w for w in self._flush_waiters if w[0] <= self._next_pts]
                self._flush_waiters = [w for w in self._flush_waiters if w[0] > self._next_pts]
                for _, cb in done:
                    cb(played)
            # The frame's second 20 ms of audio goes out 20 ms later: smooth pacing.
            for k, packet in enumerate(item.audio[1:], start=1):
                await asyncio.sleep(
                    max(0.0, t_send + k * OPUS_FRAME_SAMPLES / SAMPLE_RATE - time.monotonic())
                )
                for sub in list(self._rtp):
                    sub.deliver_audio([packet])

    def _account(self, pts: int) -> tuple[int, float | None]:
        """Presenter samples in frame [pts, pts + 640) and the arrival time of its last input
        sample; drops segments that are entirely in the past. Caller holds _lock."""
        end = pts + SAMPLES_PER_FRAME
        speech, t_arrival = 0, None
        for seg in self._segments:
            if seg.start >= end:
                break
            overlap = min(seg.end, end) - max(seg.start, pts)
            if overlap > 0:
                if seg.speech:
                    speech += overlap
                t_arrival = seg.t_arrival  # segments are in order: the last one holds end - 1
        while self._segments and self._segments[0].end <= end:
            self._segments.popleft()
        return speech, t_arrival

    def _stamp(self, item: ReadyFrame, out_pts: int) -> None:
        """Set the shared packets' pts on the output timeline (every sender reads them)."""
        self.size = (item.width, item.height)
        if item.video is not None:
            item.video.pts = video_pts(out_pts)
            item.video.time_base = VIDEO_TIME_BASE
        for k, packet in enumerate(item.audio):
            # Earlier by the encoder's look-ahead: decoded sound then lines up with the picture.
            packet.pts = out_pts + k * OPUS_FRAME_SAMPLES - self._opus.delay_samples
            packet.time_base = AUDIO_TIME_BASE


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
