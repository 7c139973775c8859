"""The WebSocket voice-agent API: PCM in, synchronized frames out, clear with played position."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np

from clients.wire import parse_frame
from tests.test_server_support import bursts, running_server

RATE = 16000
CHUNK = 320  # 20 ms


async def push_paced(ws: aiohttp.ClientWebSocketResponse, pcm: np.ndarray) -> None:
    t0 = time.monotonic()
    for i, pos in enumerate(range(0, len(pcm), CHUNK)):
        await asyncio.sleep(max(0.0, t0 + i * CHUNK / RATE - time.monotonic()))
        await ws.send_bytes(pcm[pos : pos + CHUNK].astype("<i2").tobytes())


def test_round_trip_clear_and_flush() -> None:
    first, second = bursts(1.2, RATE), bursts(0.6, RATE, period_s=0.2)
    events: list[tuple[float, str, object]] = []

    async def scenario() -> None:
        async with (
            running_server() as (server, base),
            aiohttp.ClientSession() as s,
            s.ws_connect(base.replace("http", "ws") + "/ws") as ws,
        ):
            await ws.send_json(
                {
                    "type": "start",
                    "sample_rate": RATE,
                    "format": "s16le",
                    "channels": 1,
                    "room": "agent",
                }
            )
            started = await ws.receive_json()
            assert started["type"] == "started" and started["sample_rate"] == 16000
            got = {k: asyncio.Event() for k in ("cleared", "flushed")}

            async def reader() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        events.append((time.monotonic(), "frame", parse_frame(msg.data)))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        m = json.loads(msg.data)
                        events.append((time.monotonic(), m["type"], m))
                        if m["type"] in got:
                            got[m["type"]].set()

            task = asyncio.create_task(reader())
            await push_paced(ws, first)
            await ws.send_json({"type": "clear"})
            await asyncio.wait_for(got["cleared"].wait(), 5)
            await push_paced(ws, second)
            await ws.send_json({"type": "end"})
            await asyncio.wait_for(got["flushed"].wait(), 5)
            await asyncio.sleep(0.2)
            assert server.rooms["agent"].stats.frames_flushed > 0  # the clear dropped frames
            task.cancel()
        assert not server.rooms and not server.members  # the room closed with the socket

    asyncio.run(scenario())
    frames = [(t, f) for t, kind, f in events if kind == "frame"]
    cleared = next(m for _, kind, m in events if kind == "cleared")
    flushed = next(m for _, kind, m in events if kind == "flushed")
    t_cleared = next(t for t, kind, _ in events if kind == "cleared")

    # Played position: some of the first push played, the rest dropped; nothing of it after.
    n = cleared["played_samples"]
    assert 0.3 * len(first) < n < len(first)
    assert cleared["dropped_samples"] == len(first) - n
    assert max(f.played_samples for t, f in frames if t < t_cleared) <= n
    assert min(f.played_samples for t, f in frames if t > t_cleared) >= n
    assert flushed["played_samples"] == n + len(second)  # every sample after the clear played

    # One contiguous 25 fps timeline across the clear; frames carry 640 samples and a JPEG.
    pts = np.array([f.pts_samples for _, f in frames])
    assert pts[0] == 0 and np.all(np.diff(pts) == 640)
    arrivals = np.array([t for t, _ in frames])
    fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert 23 < fps < 27, fps
    assert all(len(f.pcm) == 640 and f.jpeg and f.jpeg[:2] == b"\xff\xd8" for _, f in frames)

    # Sync by construction: a frame whose 640 samples are all ours carries exactly those samples
    # (int16 -> float -> int16 may differ by one step). Played positions map frames to input.
    sent = np.concatenate([first[:n], second])
    full = matched = 0
    prev = 0
    for _, f in frames:
        if f.played_samples - prev == 640:
            full += 1
            matched += int(np.abs(f.pcm.astype(int) - sent[prev : f.played_samples]).max() <= 2)
        prev = f.played_samples
    assert full > 0.8 * (n + len(second)) / 640 - 5
    assert matched == full


def test_bad_messages_get_clear_errors() -> None:
    async def scenario() -> None:
        async with running_server() as (_, base), aiohttp.ClientSession() as s:
            url = base.replace("http", "ws") + "/ws"
            async with s.ws_connect(url) as ws:  # a bad start closes the socket
                await ws.send_json({"type": "start", "sample_rate": 1000})
                err = await ws.receive_json()
                assert err["type"] == "error" and "sample_rate" in err["message"]
                assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
            async with s.ws_connect(url) as ws:
                await ws.send_bytes(b"\x00\x00")
                assert "start" in (await ws.receive_json())["message"]
            async with s.ws_connect(url) as ws:  # bad chunks are refused, the stream goes on
                await ws.send_json({"type": "start", "sample_rate": 24000, "format": "f32le"})
                assert (await ws.receive_json())["type"] == "started"

                async def next_text() -> dict:
                    while True:
                        msg = await ws.receive(timeout=5)
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            return json.loads(msg.data)

                await ws.send_bytes(b"\x00" * 6)
                assert "whole number" in (await next_text())["message"]
                await ws.send_bytes(np.array([0.0, np.nan], "<f4").tobytes())
                assert "NaN" in (await next_text())["message"]
                await ws.send_str("not json")
                assert "JSON" in (await next_text())["message"]
                await ws.send_json({"type": "dance"})
                assert "unknown" in (await next_text())["message"]
                await ws.send_json({"type": "controls", "scale": 9})
                assert "scale" in (await next_text())["message"]
                await ws.send_json({"type": "controls", "pose_deg": [5, 0, 0], "scale": 1.2})
                assert (await next_text())["type"] == "controls"
                msg = await ws.receive(timeout=5)  # frames still flowing
                while msg.type != aiohttp.WSMsgType.BINARY:
                    msg = await ws.receive(timeout=5)

    asyncio.run(scenario())


def test_failing_session_is_reported_and_frees_capacity() -> None:
    from engine.errors import UserError
    from server.standin import StandInSession

    class Breaks(StandInSession):
        """Fails on its 20th pull, like an engine that runs out of memory."""

        pulls = 0

        def pull(self):  # noqa: ANN202
            self.pulls += 1
            if self.pulls == 20:
                raise RuntimeError("engine exploded")
            return super().pull()

    made = []

    def factory(avatar):  # noqa: ANN001, ANN202
        if made:
            raise UserError("no weights for a second session")
        made.append(1)
        return Breaks(avatar, size=64)

    async def scenario() -> None:
        async with (
            running_server(capacity=1, factory=factory) as (server, base),
            aiohttp.ClientSession() as s,
        ):
            async with s.ws_connect(base.replace("http", "ws") + "/ws") as ws:
                await ws.send_json({"type": "start", "sample_rate": 16000})
                assert (await ws.receive_json())["type"] == "started"
                while True:
                    msg = await ws.receive(timeout=5)
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        assert "engine exploded" in json.loads(msg.data)["message"]
                        break
                assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
            assert not server.rooms and not server.members  # capacity is free again
            async with s.ws_connect(base.replace("http", "ws") + "/ws") as ws:
                await ws.send_json({"type": "start", "sample_rate": 16000})
                reply = await ws.receive_json()
                assert reply["status"] == 500 and "no weights" in reply["message"]

    asyncio.run(scenario())


def test_slow_engine_stalls_without_growing_queues() -> None:
    """An engine slower than real time (50 ms per 40 ms frame): output waits for it (audio is
    never dropped), the frame queue stays at a few frames, the timeline stays contiguous."""
    from server.standin import StandInSession

    def slow(avatar):  # noqa: ANN001, ANN202
        return StandInSession(avatar, size=64, compute_ms=50)

    async def scenario() -> None:
        async with (
            running_server(factory=slow) as (server, base),
            aiohttp.ClientSession() as s,
            s.ws_connect(base.replace("http", "ws") + "/ws") as ws,
        ):
            await ws.send_json({"type": "start"})
            assert (await ws.receive_json())["type"] == "started"
            frames, depth = [], []
            t_end = time.monotonic() + 2.0
            while time.monotonic() < t_end:
                msg = await ws.receive(timeout=5)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    frames.append((time.monotonic(), parse_frame(msg.data)))
                    depth.append(server.rooms["default"].queue_depth)
            room = server.rooms["default"]
            assert room.stats.stalls > 5
            assert max(depth) <= server.settings.max_ready_frames
            pts = [f.pts_samples for _, f in frames]
            assert pts == list(range(0, 640 * len(pts), 640))
            fps = (len(frames) - 1) / (frames[-1][0] - frames[0][0])
            assert 14 < fps < 23, fps

    asyncio.run(scenario())


def test_failing_pacer_fails_the_room() -> None:
    """If the pacer (output) raised, frames would stop with the room still open and holding the
    slot: the room fails instead, like a failing session."""

    async def scenario() -> None:
        async with running_server(capacity=1) as (server, base), aiohttp.ClientSession() as s:
            async with s.ws_connect(base.replace("http", "ws") + "/ws") as ws:
                await ws.send_json({"type": "start", "room": "p"})
                assert (await ws.receive_json())["type"] == "started"
                room = server.rooms["p"]

                def broken(item, out_pts):  # noqa: ANN001, ANN202
                    raise RuntimeError("pacer bug")

                room._stamp = broken
                while True:
                    msg = await ws.receive(timeout=5)
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        assert "pacer bug" in json.loads(msg.data)["message"]
                        break
                assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
            assert not server.rooms and not server.members and room.closed
            assert isinstance(room.failed, RuntimeError)

    asyncio.run(scenario())
