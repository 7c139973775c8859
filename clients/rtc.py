"""A Python WebRTC client for livehead: publish audio, receive the avatar (aiortc).

conn = await connect(RtcOptions("http://127.0.0.1:8080", role="presenter"), audio_track)
frame = await conn.video.recv()     # av.VideoFrame, pts on the 90 kHz RTP clock
await conn.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtp import RtcpSrPacket

from clients.media import ClientError, Mp4Recorder


async def recv_video(track: MediaStreamTrack) -> av.VideoFrame:
    """The next decoded video frame (pts on the 90 kHz RTP clock)."""
    frame = await track.recv()
    if not isinstance(frame, av.VideoFrame):
        raise ClientError(f"expected a video frame, got {type(frame).__name__}")
    return frame


async def recv_audio(track: MediaStreamTrack) -> tuple[int, np.ndarray]:
    """The next decoded audio frame as (pts on the 48 kHz RTP clock, (N,) int16 mono)."""
    frame = await track.recv()
    if not isinstance(frame, av.AudioFrame) or frame.pts is None:
        raise ClientError(f"expected an audio frame, got {type(frame).__name__}")
    x = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
    return int(frame.pts), x.mean(axis=1).astype(np.int16)


NTP_UNIX_OFFSET_S = 2208988800  # 1900-01-01 -> 1970-01-01


class RemoteClock:
    """Maps one remote stream's frame pts to the sender's wall clock (``time.time()`` seconds),
    the way browsers do lip sync: RTCP sender reports pair an RTP timestamp with the sender's
    NTP time. aiortc rebases received timestamps to the first frame it assembles, so the rebasing
    origin is read from its receiver; when that is unavailable (another aiortc version),
    ``sender_time`` returns None and callers fall back to first-frame anchoring.

    The livehead server sends the audio and video of one pts at the same moment, so equal
    sender times mean equal media times across the two streams."""

    def __init__(self, receiver: Any, clock_rate: int) -> None:
        self.rate = clock_rate
        self._receiver = receiver
        self._sr: tuple[int, float] | None = None  # (RTP timestamp, sender unix time)
        original = receiver._handle_rtcp_packet

        async def handle_rtcp(packet: Any) -> None:
            if isinstance(packet, RtcpSrPacket):
                info = packet.sender_info
                self._sr = (info.rtp_timestamp, info.ntp_timestamp / 2**32 - NTP_UNIX_OFFSET_S)
            await original(packet)

        receiver._handle_rtcp_packet = handle_rtcp

    def _origin(self) -> int | None:
        mapper = getattr(self._receiver, "_RTCRtpReceiver__timestamp_mapper", None)
        return getattr(mapper, "_origin", None)

    @property
    def ready(self) -> bool:
        return self._sr is not None and self._origin() is not None

    def sender_time(self, pts: int) -> float | None:
        """Sender wall-clock time (s) of the frame with aiortc pts ``pts``."""
        origin = self._origin()
        if self._sr is None or origin is None:
            return None
        rtp_sr, t_sr = self._sr
        delta = (origin + pts - rtp_sr + 2**31) % 2**32 - 2**31  # RTP timestamps wrap
        return t_sr + delta / self.rate

    def pts_at(self, t: float) -> float | None:
        """The (fractional) pts this stream had at sender time ``t``."""
        t0 = self.sender_time(0)
        return None if t0 is None else (t - t0) * self.rate


def restrict_ice(addresses: list[str]) -> None:
    """Offer only these host addresses (process-wide). aioice skips 127.0.0.1 by default, so a
    client and server on one machine without another interface pass ["127.0.0.1"]."""
    if addresses:
        import aioice.ice

        allowed = list(addresses)
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(allowed)


def http_json(
    url: str,
    body: dict | None = None,
    token: str | None = None,
    method: str | None = None,
    timeout: float = 30.0,
) -> dict:
    """POST JSON (or GET) and return the JSON reply; HTTP errors become ClientError with the
    server's message (blocking: call through asyncio.to_thread)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise ClientError(f"{url}: HTTP {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ClientError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


@dataclass
class RtcOptions:
    url: str  # http://host:port
    role: str = "presenter"  # or "viewer"
    room: str = "default"
    token: str | None = None
    data_channel: bool = True
    ice_addresses: list[str] = field(default_factory=list)


@dataclass
class RtcConnection:
    pc: RTCPeerConnection
    video: MediaStreamTrack
    audio: MediaStreamTrack | None
    channel: Any
    member_id: str
    t_offer: float  # time.monotonic() when the offer was posted
    messages: asyncio.Queue = field(default_factory=asyncio.Queue)  # data channel JSON
    clocks: dict[str, RemoteClock] = field(default_factory=dict)  # "audio", "video"

    async def send_control(self, msg: dict, timeout: float = 5.0) -> dict:
        """Send a control message on the data channel and wait for the (non-stats) reply."""
        if self.channel is None or self.channel.readyState != "open":
            raise ClientError("the data channel is not open")
        self.channel.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = await asyncio.wait_for(self.messages.get(), deadline - time.monotonic())
            if reply.get("type") != "stats":
                return reply

    async def close(self) -> None:
        await self.pc.close()


async def connect(
    opts: RtcOptions, audio_track: MediaStreamTrack | None = None, timeout: float = 20.0
) -> RtcConnection:
    """Offer (audio out if given, audio + video in), wait for the remote tracks."""
    restrict_ice(opts.ice_addresses)
    # No STUN: the default Google server is unreachable in closed networks and stalls gathering.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    loop = asyncio.get_running_loop()
    tracks: dict[str, asyncio.Future] = {
        "video": loop.create_future(),
        "audio": loop.create_future(),
    }
    messages: asyncio.Queue = asyncio.Queue()
    channel = None
    try:
        if audio_track is not None:
            pc.addTransceiver(audio_track, direction="sendrecv")
        else:
            pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        clocks = {
            t.kind: RemoteClock(t.receiver, 48000 if t.kind == "audio" else 90000)
            for t in pc.getTransceivers()
        }
        if opts.data_channel:
            channel = pc.createDataChannel("control")

            @channel.on("message")
            def on_message(message: str) -> None:
                with contextlib.suppress(TypeError, ValueError):
                    messages.put_nowait(json.loads(message))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            fut = tracks.get(track.kind)
            if fut is not None and not fut.done():
                fut.set_result(track)

        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers ICE here
        t_offer = time.monotonic()
        answer = await asyncio.to_thread(
            http_json,
            opts.url.rstrip("/") + "/offer",
            {"sdp": pc.localDescription.sdp, "type": "offer", "role": opts.role, "room": opts.room},
            opts.token,
        )
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        video = await asyncio.wait_for(tracks["video"], timeout)
        audio = tracks["audio"].result() if tracks["audio"].done() else None
        if channel is not None:
            opened = asyncio.Event()
            channel.on("open", opened.set)
            if channel.readyState != "open":
                await asyncio.wait_for(opened.wait(), timeout)
    except BaseException:
        await pc.close()
        raise
    return RtcConnection(pc, video, audio, channel, answer.get("id", ""), t_offer, messages, clocks)


class AvRecording:
    """Received audio and video of one connection written to an ``Mp4Recorder`` in sync.

    Audio is written back to back from its first frame. The livehead server starts both
    tracks on one media time, so when the sender reports (RemoteClock) put the two first
    frames within ``SAME_START_S`` of each other they are taken to be that common start, and
    each video frame is placed by its own timestamp from there (exact). Otherwise (a first
    frame lost) each video frame is placed at its sender time relative to the first audio
    frame. A livehead server's reports describe its media timeline exactly; other aiortc
    senders stamp a report with the moment their stream's last packet left, so theirs move by
    tens of ms from one to the next under load. Frames are held until both streams' reports
    arrived (about a second), or written with first-frame anchoring when they never do."""

    MAX_HELD = 250  # frames (about 3 s of audio + video) before giving up on sender reports
    SAME_START_S = 0.15  # first frames this close by the sender reports: one common start

    def __init__(self, recorder: Mp4Recorder, clocks: dict[str, RemoteClock]) -> None:
        self._rec = recorder
        self._clocks = clocks
        self._held: list[tuple[str, int, np.ndarray]] = []
        self._t0: float | None = None  # sender time of the first audio sample
        self._anchored = False
        self._first: dict[str, int] = {}
        self._next_audio: int | None = None  # pts the next audio frame should have

    def audio(self, pts: int, pcm: np.ndarray) -> None:
        self._add("audio", pts, pcm)

    def video(self, pts: int, rgb: np.ndarray) -> None:
        self._add("video", pts, rgb)

    def _add(self, kind: str, pts: int, data: np.ndarray) -> None:
        self._first.setdefault(kind, pts)
        self._held.append((kind, pts, data))
        if self._t0 is None and not self._anchored:
            # Decide once both streams' first frames and reports are in (whichever comes last).
            if (
                self._clocks["audio"].ready
                and self._clocks["video"].ready
                and "audio" in self._first
                and "video" in self._first
            ):
                t0 = self._t0 = self._clocks["audio"].sender_time(self._first["audio"])
                t_v = self._clocks["video"].sender_time(self._first["video"])
                if t0 is not None and t_v is not None and abs(t_v - t0) < self.SAME_START_S:
                    self._anchored = True  # one common start: place video by its pts
            elif len(self._held) < self.MAX_HELD:
                return
            else:
                self._anchored = True
        self._drain()

    def _drain(self) -> None:
        for kind, pts, data in self._held:
            if kind == "audio":
                # A lost packet leaves a gap in the pts: keep the timeline, fill with silence.
                gap = 0 if self._next_audio is None else pts - self._next_audio
                if 0 < gap < 48000:
                    self._rec.audio(np.zeros(gap, np.int16))
                self._next_audio = pts + len(data)
                self._rec.audio(data)
                continue
            use_sr = self._t0 is not None and not self._anchored
            t_sent = self._clocks["video"].sender_time(pts) if use_sr else None
            if t_sent is not None and self._t0 is not None:
                t = t_sent - self._t0
            else:
                t = (pts - self._first["video"]) / 90000
            if t >= 0:
                self._rec.video(data, t)
        self._held.clear()

    def close(self) -> None:
        self._anchored = self._anchored or self._t0 is None
        self._drain()
        self._rec.close()
