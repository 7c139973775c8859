"""Media plumbing shared by every room: the media clock, encode-once encoders and packet tracks.

Encode once, fan out: a room encodes each video frame once (VP8) and each 20 ms of audio once
(Opus) and hands the same ``av.Packet`` objects to every viewer's tracks; aiortc's RTP sender only
packetizes pre-encoded packets (``Encoder.pack``), so the per-viewer cost is RTP and SRTP, not
encoding. The price is one bitrate for everyone (no per-viewer congestion control) and keyframes
on request (a new viewer, a PLI) for all viewers at once.
"""

from __future__ import annotations

import asyncio
import datetime
import fractions
import threading
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc import RTCRtpSender
from aiortc.clock import datetime_to_ntp
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.session_api import SAMPLE_RATE, SAMPLES_PER_FRAME

VIDEO_CLOCK_HZ = 90000  # RTP video clock
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
OPUS_RTP_CLOCK_HZ = 48000  # Opus's RTP clock, whatever the content's rate
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
OPUS_FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms at 16 kHz: two Opus packets per video frame


def video_pts(samples: int) -> int:
    """A 16 kHz sample position as a 90 kHz video pts (exact: 640 samples = 3600 ticks)."""
    return samples * VIDEO_CLOCK_HZ // SAMPLE_RATE


class MediaClock:
    """Maps a room's sample timeline to wall time (``time.monotonic``).

    One clock per room, shared by the worker (which pushes input up to "now" on this clock) and
    the pacer (which sends frame pts P when the clock reaches P + delay). Both sides move with
    it, so when the pacer waits for a late frame (``delay``) input waits too, and when an
    interrupt skips queued output (``skip``) input jumps with it: queues never grow.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self.sample_rate = sample_rate
        self._origin = time.monotonic()
        self._offset_samples = 0
        self._lock = threading.Lock()

    def now_samples(self, t: float | None = None) -> int:
        t = time.monotonic() if t is None else t
        with self._lock:
            return int((t - self._origin) * self.sample_rate) + self._offset_samples

    def wall_time(self, samples: int) -> float:
        with self._lock:
            return self._origin + (samples - self._offset_samples) / self.sample_rate

    def delay(self, seconds: float) -> None:
        """The timeline waits ``seconds`` (output was late: a stall)."""
        with self._lock:
            self._origin += seconds

    def skip(self, samples: int) -> None:
        """The timeline jumps ``samples`` ahead (queued output was dropped by an interrupt)."""
        with self._lock:
            self._offset_samples += samples


class Vp8Encoder:
    """VP8 with aiortc's real-time settings, producing ``av.Packet``s for ``Encoder.pack``.

    Unlike aiortc's per-sender encoder, keyframes come every ``keyframe_interval`` frames (so a
    viewer that lost packets recovers without asking) and on request (a new viewer, a PLI)."""

    def __init__(self, bitrate: int, keyframe_interval: int) -> None:
        self.bitrate = bitrate
        self.keyframe_interval = keyframe_interval
        self._codec: av.VideoCodecContext | None = None
        self._frames = 0

    def encode(self, rgb: np.ndarray, force_keyframe: bool = False) -> av.Packet | None:
        """rgb: (H, W, 3) uint8 -> one packet (None if the encoder held the frame back)."""
        h, w = rgb.shape[:2]
        if self._codec is None or (self._codec.width, self._codec.height) != (w, h):
            self._codec = self._open(w, h)
            force_keyframe = True
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = self._frames
        frame.time_base = fractions.Fraction(1, 25)
        if force_keyframe:
            frame.pict_type = av.video.frame.PictureType.I
        self._frames += 1
        packets = self._codec.encode(frame)
        if not packets:
            return None
        if len(packets) == 1:
            return packets[0]
        # lag-in-frames=0 gives one packet per frame; join defensively if libvpx ever splits.
        joined = av.Packet(b"".join(bytes(p) for p in packets))
        joined.is_keyframe = any(p.is_keyframe for p in packets)
        return joined

    def reset(self) -> None:
        """Drop the encoder state (the next frame is a keyframe)."""
        self._codec = None

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuv420p"
        codec.bit_rate = self.bitrate
        codec.time_base = fractions.Fraction(1, 25)
        codec.framerate = fractions.Fraction(25, 1)
        codec.gop_size = self.keyframe_interval
        codec.qmin, codec.qmax = 2, 56
        codec.options = {
            "deadline": "realtime",
            "cpu-used": "8",  # fastest real-time preset: this runs next to the model
            "lag-in-frames": "0",  # one packet out per frame in: no added latency
            "bufsize": str(self.bitrate),
            "minrate": str(self.bitrate),  # minrate = maxrate = bit_rate: CBR, like aiortc
            "maxrate": str(self.bitrate),
            "undershoot-pct": "100",
            "overshoot-pct": "15",
            "static-thresh": "1",
            "partitions": "0",
        }
        codec.thread_count = 1  # two shared cores: the model needs the other one
        return codec


class OpusEncoder:
    """16 kHz mono Opus, 20 ms packets: one video frame's 640 samples -> two packets.

    Encoding at the engine's own rate avoids a resampler whose delay would shift audio against
    video; RTP still runs the Opus clock at 48 kHz (aiortc converts from the packet time base).
    The encoder's look-ahead (``delay_samples``, 6.5 ms) delays decoded sound behind its
    timestamp; the pacer stamps packets that much earlier so sound and picture still match."""

    def __init__(self, bitrate: int = 32000) -> None:
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate = SAMPLE_RATE
        codec.layout = "mono"
        codec.format = "s16"
        codec.bit_rate = bitrate
        codec.time_base = AUDIO_TIME_BASE
        codec.options = {"application": "voip"}
        self._codec = codec
        self._samples = 0
        self.delay_samples = 0

    def encode(self, pcm16: np.ndarray) -> list[av.Packet]:
        """pcm16: (640,) int16 -> two 20 ms packets (pts set later by the pacer)."""
        out: list[av.Packet] = []
        for i in range(0, len(pcm16), OPUS_FRAME_SAMPLES):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(pcm16[None, i : i + OPUS_FRAME_SAMPLES]),
                format="s16",
                layout="mono",
            )
            frame.sample_rate = SAMPLE_RATE
            frame.pts = self._samples
            packets = self._codec.encode(frame)
            if self._samples == 0 and packets and packets[0].pts is not None:
                self.delay_samples = max(0, -int(packets[0].pts))  # FFmpeg's initial padding
            self._samples += OPUS_FRAME_SAMPLES
            out.extend(packets)
        return out


class PacketTrack(MediaStreamTrack):
    """An outgoing track fed with pre-encoded packets by the room's pacer.

    recv() returns the moment the pacer delivers, so the pacer's timing is the send timing. A
    track only queues once its sender has started reading (before that, packets are dropped),
    and a video track skips to the next keyframe after any loss, asking the room for one."""

    def __init__(
        self,
        kind: str,
        max_queue: int = 8,
        on_keyframe_needed: Callable[[bool], None] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue[av.Packet | None] = asyncio.Queue()
        self._max_queue = max_queue
        self._on_keyframe_needed = on_keyframe_needed
        self._started = False
        self._need_keyframe = kind == "video"
        self.dropped = 0

    @property
    def synced(self) -> bool:
        """True once the sender reads and (for video) a keyframe went out."""
        return self._started and not self._need_keyframe

    def put(self, packet: av.Packet) -> None:
        """Called on the event loop by the pacer."""
        if not self._started or self.readyState != "live":
            return
        if self._need_keyframe:
            if not packet.is_keyframe:
                return
            self._need_keyframe = False
        if self._queue.qsize() >= self._max_queue:
            # The sender is not keeping up: drop the backlog rather than let latency grow. For
            # video the next packets would reference dropped ones, so wait for a keyframe.
            while not self._queue.empty():
                self._queue.get_nowait()
                self.dropped += 1
            if self.kind == "video":
                self._need_keyframe = not packet.is_keyframe
                if self._need_keyframe:
                    self._ask_keyframe()
                    return
        self._queue.put_nowait(packet)

    async def recv(self) -> av.Packet:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        if not self._started:
            self._started = True
            if self.kind == "video":
                self._ask_keyframe(force=True)  # not rate-limited: this viewer sees nothing yet
        packet = await self._queue.get()
        if packet is None:
            raise MediaStreamError
        return packet

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            self._queue.put_nowait(None)  # wake a pending recv()

    def _ask_keyframe(self, force: bool = False) -> None:
        if self._on_keyframe_needed is not None:
            self._on_keyframe_needed(force)


class _TimelineReports:
    """One sender's RTP timestamps as times on its room's media timeline (see
    ``report_media_time``)."""

    def __init__(self, clock_rate: int, unix_time: Callable[[float], float | None]) -> None:
        self.clock_rate = clock_rate
        self.unix_time = unix_time
        self.origin: int | None = None  # the sender's random RTP timestamp offset
        self.last: int | None = None  # codec timestamp of the last frame handed to the sender

    def ntp(self, rtp_timestamp: int, fallback: int) -> int:
        if self.origin is None or self.last is None:
            return fallback
        # The report's timestamp is the last sent frame's: unwrap it against the last frame
        # handed over (a Python int that never wraps), so sessions past 2^32 ticks stay exact.
        delta = (rtp_timestamp - self.origin - self.last + 2**31) % 2**32 - 2**31
        t = self.unix_time((self.last + delta) / self.clock_rate)
        if t is None:
            return fallback
        return datetime_to_ntp(datetime.datetime.fromtimestamp(t, datetime.UTC))


def _report_ntp(self: RTCRtpSender) -> int:
    raw: int = self.__dict__.get("_RTCRtpSender__ntp_timestamp", 0)
    reports: _TimelineReports | None = self.__dict__.get("_livehead_reports")
    if reports is None:
        return raw
    return reports.ntp(self.__dict__.get("_RTCRtpSender__rtp_timestamp", 0), raw)


def _store_ntp(self: RTCRtpSender, value: int) -> None:
    self.__dict__["_RTCRtpSender__ntp_timestamp"] = value


class _TimelineSender(RTCRtpSender):
    """aiortc's sender with the NTP time of its sender reports read from the media timeline.

    aiortc records ``__ntp_timestamp`` as the moment each packet left and writes it into the
    next report; this data descriptor (it takes precedence over the instance attribute) returns
    instead the time the report's RTP timestamp stands for. Everything else is aiortc's."""

    _RTCRtpSender__ntp_timestamp = property(_report_ntp, _store_ntp)


def report_media_time(
    sender: RTCRtpSender, clock_rate: int, unix_time: Callable[[float], float | None]
) -> bool:
    """Make ``sender``'s RTCP sender reports pair each RTP timestamp with its media time.

    ``unix_time(seconds)`` maps a codec timestamp in seconds (pts / clock rate, the room's
    output timeline) to a ``time.time()`` instant, one fixed line per room. aiortc stamps a
    report with the moment its stream's last packet left, which drifts from the media time by
    event-loop delays and by every stall; receivers (browsers, the Python clients) line audio up
    with video by these reports, so the two streams' reports must describe one timeline. With
    this hook they do exactly, under any load; after a stall packets simply arrive late (as
    over a slow network), for audio and video alike. Returns False (reports stay aiortc's) if
    this aiortc's sender lacks the private attributes the hook relies on."""
    needed = ("_RTCRtpSender__ntp_timestamp", "_RTCRtpSender__rtp_timestamp")
    if type(sender) is not RTCRtpSender or not all(k in sender.__dict__ for k in needed):
        return False
    original = getattr(sender, "_next_encoded_frame", None)
    if original is None:
        return False
    reports = _TimelineReports(clock_rate, unix_time)

    async def next_encoded_frame(codec: Any) -> Any:
        # aiortc's send loop calls this right after sending a frame's last packet (no await
        # in between), so the sender's RTP timestamp here is the previous frame's: the
        # difference is the sender's random timestamp offset.
        d = sender.__dict__
        sent = d.get("_RTCRtpSender__packet_count", 0) > 0
        if reports.origin is None and reports.last is not None and sent:
            reports.origin = (d["_RTCRtpSender__rtp_timestamp"] - reports.last) % 2**32
        frame = await original(codec)
        if frame is not None:
            reports.last = int(frame.timestamp)
        return frame

    sender._next_encoded_frame = next_encoded_frame  # type: ignore[method-assign]
    sender.__dict__["_livehead_reports"] = reports
    sender.__class__ = _TimelineSender
    return True


def int16_pcm(audio: np.ndarray) -> np.ndarray:
    """(N,) float in [-1, 1] -> (N,) int16."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16)


__all__ = [
    "AUDIO_TIME_BASE",
    "OPUS_RTP_CLOCK_HZ",
    "VIDEO_CLOCK_HZ",
    "MediaClock",
    "OpusEncoder",
    "PacketTrack",
    "SAMPLES_PER_FRAME",
    "VIDEO_TIME_BASE",
    "Vp8Encoder",
    "int16_pcm",
    "report_media_time",
    "video_pts",
]
