"""WebSocket client for livehead's voice-agent API (server/PROTOCOL.md): push PCM at real-time
pace, receive synchronized frames, clear on barge-in, end to flush.

    result = asyncio.run(push_file("ws://127.0.0.1:8080/ws", "speech.wav", out="o.mp4"))
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from clients.media import ClientError, Mp4Recorder, load_audio
from clients.wire import Frame, parse_frame

PUSH_RATE = 16000
CHUNK_MS = 20


@dataclass
class WsRun:
    """What happened during one push: every frame with its arrival time, every text message,
    and when each chunk of input was sent (for latency)."""

    t_connect: float = 0.0  # time.monotonic() when the connection opened
    started: dict = field(default_factory=dict)
    frames: list[tuple[float, Frame]] = field(default_factory=list)
    messages: list[tuple[float, dict]] = field(default_factory=list)
    sent: list[tuple[int, float]] = field(default_factory=list)  # (samples sent so far, time)
    sample_rate: int = PUSH_RATE

    def message(self, kind: str) -> dict | None:
        return next((m for _, m in self.messages if m.get("type") == kind), None)


class JpegDecoder:
    """JPEG bytes -> (H, W, 3) uint8 RGB with PyAV's MJPEG decoder."""

    def __init__(self) -> None:
        self._codec = av.CodecContext.create("mjpeg", "r")

    def __call__(self, jpeg: bytes) -> np.ndarray:
        frames = self._codec.decode(av.Packet(jpeg))
        if not frames:
            raise ClientError("could not decode a JPEG frame")
        return frames[0].to_ndarray(format="rgb24")


async def run_push(
    url: str,
    pcm: np.ndarray,
    *,
    sample_rate: int = PUSH_RATE,
    token: str | None = None,
    room: str | None = None,
    clear_at_s: float | None = None,
    tail_s: float = 0.5,
    on_frame: Callable[[Frame], None] | None = None,
    timeout_s: float = 30.0,
) -> WsRun:
    """Connect, push ``pcm`` ((N,) int16 mono at ``sample_rate``) in 20 ms chunks at real-time
    pace, optionally ``clear`` after ``clear_at_s`` seconds (and stop pushing, as an agent does
    on barge-in), then ``end``; record until ``flushed`` arrives plus ``tail_s`` seconds."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus, WebSocketException

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    run = WsRun(sample_rate=sample_rate)
    chunk = sample_rate * CHUNK_MS // 1000
    try:
        ws_cm = connect(url, additional_headers=headers, max_size=16 * 2**20, open_timeout=10)
        ws = await ws_cm.__aenter__()
    except InvalidStatus as e:
        raise ClientError(f"{url}: HTTP {e.response.status_code}") from None
    except (TimeoutError, OSError, WebSocketException) as e:
        raise ClientError(f"cannot connect to {url}: {e}") from None
    try:
        run.t_connect = time.monotonic()
        start = {"type": "start", "sample_rate": sample_rate, "format": "s16le", "channels": 1}
        if room:
            start["room"] = room
        await ws.send(json.dumps(start))
        reply = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
        if reply.get("type") != "started":
            raise ClientError(f"server refused the stream: {reply.get('message', reply)}")
        run.started = reply
        flushed = asyncio.Event()

        async def sender() -> None:
            t0 = time.monotonic()
            for i, pos in enumerate(range(0, len(pcm), chunk)):
                elapsed = time.monotonic() - t0
                if clear_at_s is not None and elapsed >= clear_at_s:
                    await ws.send(json.dumps({"type": "clear"}))
                    break
                due = t0 + i * CHUNK_MS / 1000
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                part = pcm[pos : pos + chunk]
                await ws.send(part.astype("<i2").tobytes())
                run.sent.append((pos + len(part), time.monotonic()))
            else:
                if clear_at_s is not None:  # the clip ended before the clear time
                    await asyncio.sleep(max(0.0, t0 + clear_at_s - time.monotonic()))
                    await ws.send(json.dumps({"type": "clear"}))
            await ws.send(json.dumps({"type": "end"}))

        async def receiver() -> None:
            async for message in ws:
                now = time.monotonic()
                if isinstance(message, bytes):
                    frame = parse_frame(message)
                    run.frames.append((now, frame))
                    if on_frame is not None:
                        on_frame(frame)
                else:
                    msg = json.loads(message)
                    run.messages.append((now, msg))
                    if msg.get("type") == "flushed":
                        flushed.set()
                    elif msg.get("type") == "error":
                        raise ClientError(f"server: {msg.get('message')}")

        recv_task = asyncio.create_task(receiver())
        send_task = asyncio.create_task(sender())
        try:
            limit = len(pcm) / sample_rate + timeout_s
            done, _ = await asyncio.wait(
                {recv_task, asyncio.ensure_future(flushed.wait())},
                timeout=limit,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if recv_task in done:
                recv_task.result()  # raises the server's error or the connection's
                raise ClientError("the server closed the connection early")
            if not flushed.is_set():
                raise ClientError(f"no 'flushed' reply within {limit:.0f} s")
            await asyncio.sleep(tail_s)
            await send_task
        finally:
            for t in (recv_task, send_task):
                t.cancel()
            await asyncio.gather(recv_task, send_task, return_exceptions=True)
    finally:
        await ws_cm.__aexit__(None, None, None)
    return run


async def push_file(
    url: str,
    audio: str | Path,
    out: str | Path | None = None,
    token: str | None = None,
    room: str | None = None,
    clear_at_s: float | None = None,
) -> dict:
    """``livehead client push``: push a file, record what comes back, return a summary."""
    pcm = load_audio(audio, PUSH_RATE)
    recorder = None
    decode = JpegDecoder()
    first_pts: list[int] = []

    def on_frame(frame: Frame) -> None:
        nonlocal recorder
        if out is None:
            return
        if recorder is None:
            recorder = Mp4Recorder(out, frame.sample_rate)
            first_pts.append(frame.pts_samples)
        recorder.audio(frame.pcm)
        if frame.jpeg is not None:
            recorder.video(
                decode(frame.jpeg), (frame.pts_samples - first_pts[0]) / frame.sample_rate
            )

    try:
        run = await run_push(
            url, pcm, token=token, room=room, clear_at_s=clear_at_s, on_frame=on_frame
        )
    finally:
        if recorder is not None:
            recorder.close()
    frames = [f for _, f in run.frames]
    summary = {
        "frames": len(frames),
        "video_frames": sum(1 for f in frames if f.jpeg is not None),
        "speech_frames": sum(1 for f in frames if f.speech),
        "sent_samples": len(pcm),
        "played_samples": frames[-1].played_samples if frames else 0,
        "cleared": run.message("cleared"),
        "flushed": run.message("flushed"),
        "out": str(out) if out else None,
    }
    return summary
