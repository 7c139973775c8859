"""WebRTC end to end on loopback: Python aiortc clients <-> the server in one event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from clients.media import PacedPcmTrack
from clients.rtc import RtcOptions, connect
from server.standin import LOUD_RMS
from tests.test_server_support import bursts, http, mouth_openness, running_server, wait_for

LOOPBACK = ["127.0.0.1"]


class Receiver:
    """Reads a connection's video and audio tracks into lists (arrival time, pts, payload)."""

    def __init__(self, video, audio=None, keep_images: bool = True) -> None:  # noqa: ANN001
        self.video: list[tuple[float, int, np.ndarray | None]] = []
        self.audio: list[tuple[float, int, np.ndarray]] = []
        self.before_controls = 0
        self.tasks = [asyncio.create_task(self._video(video, keep_images))]
        if audio is not None:
            self.tasks.append(asyncio.create_task(self._audio(audio)))

    async def _video(self, track, keep: bool) -> None:  # noqa: ANN001
        while True:
            f = await track.recv()
            self.video.append(
                (time.monotonic(), int(f.pts), f.to_ndarray(format="rgb24") if keep else None)
            )

    async def _audio(self, track) -> None:  # noqa: ANN001
        while True:
            f = await track.recv()
            x = f.to_ndarray().reshape(-1, len(f.layout.channels)).mean(axis=1)
            self.audio.append((time.monotonic(), int(f.pts), x))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def fps(self, skip: int = 5) -> float:
        t = [v[0] for v in self.video[skip:]]
        return (len(t) - 1) / (t[-1] - t[0])


async def whep_viewer(base: str, room: str) -> tuple[RTCPeerConnection, asyncio.Future, str]:
    """A standard WHEP client: recvonly offer as application/sdp, 201 + Location."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    video: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: t.kind == "video" and not video.done() and video.set_result(t))
    await pc.setLocalDescription(await pc.createOffer())
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{base}/whep?room={room}",
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        ) as r,
    ):
        assert r.status == 201, await r.text()
        assert r.headers["Content-Type"].startswith("application/sdp")
        location = r.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(await r.text(), "answer"))
    return pc, video, location


def test_presenter_gets_video_at_25fps_with_audio_in_sync() -> None:
    async def scenario() -> None:
        async with running_server() as (server, base):
            # A burst period that is no multiple of 40 ms: onsets sweep across frame phases.
            track = PacedPcmTrack(bursts(4.0, 48000, period_s=0.46), 48000)
            conn = await connect(RtcOptions(base, ice_addresses=LOOPBACK), track)
            rx = Receiver(conn.video, conn.audio)
            await asyncio.sleep(2.0)
            rx.before_controls = len(rx.video)
            reply = await conn.send_control(
                {"type": "controls", "pose_deg": [5, 0, 10], "location": 0.1, "scale": 1.1}
            )
            assert reply["type"] == "controls" and reply["scale"] == 1.1
            bad = await conn.send_control({"type": "controls", "location": 3})
            assert bad["type"] == "error" and "location" in bad["message"]
            await asyncio.sleep(1.0)
            reply = await conn.send_control({"type": "interrupt"})
            assert reply["type"] == "interrupted", reply
            assert 0 < reply["played_samples"] <= 4 * 16000, reply  # the clip is 4 s long
            stats = await asyncio.wait_for(conn.messages.get(), 3)
            assert stats["type"] == "stats" and stats["fps"] > 20
            await rx.stop()
            await conn.close()
            await wait_for(lambda: not server.rooms)
            return rx, conn.clocks

    rx, clocks = asyncio.run(scenario())
    assert 20 < rx.fps() < 27, rx.fps()  # arrival rate; the pts below are the exact check
    vpts = np.array([p for _, p, _ in rx.video])
    steps = np.diff(vpts)
    assert np.all(steps == 3600), np.unique(steps)  # 90 kHz clock, one frame per 40 ms
    # Returned audio by its RTP timestamps (48 kHz).
    a0 = rx.audio[0][1]
    audio = np.zeros(rx.audio[-1][1] - a0 + 960, np.float32)
    for _, pts, x in rx.audio:
        audio[pts - a0 : pts - a0 + len(x)] = x
    # Video and audio of one media time, matched the way a browser does it: RTCP sender reports
    # give each stream's sender time (the server sends both of one pts at the same moment).
    assert clocks["video"].ready and clocks["audio"].ready
    opening, loudness = [], []
    for _, pts, img in rx.video[: rx.before_controls]:  # before the controls move the face
        i = int(round(clocks["audio"].pts_at(clocks["video"].sender_time(pts)))) - a0
        if i >= 0 and i + 1920 <= len(audio):
            opening.append(mouth_openness(img))
            rms = float(np.sqrt(np.mean((audio[i : i + 1920] / 32768) ** 2)))
            loudness.append(np.sqrt(min(1.0, rms / LOUD_RMS)))  # how the stand-in opens it
    o, a = np.array(opening), np.array(loudness)
    corr = {
        lag: np.corrcoef(
            o[max(0, lag) : len(o) + min(0, lag)], a[max(0, -lag) : len(a) - max(0, lag)]
        )[0, 1]
        for lag in range(-3, 4)
    }
    assert len(o) > 30 and corr[0] > 0.9, corr
    assert max(corr, key=corr.get) == 0, corr


def test_presenter_and_two_viewers_share_one_encode() -> None:
    async def scenario() -> None:
        async with running_server() as (server, base):
            presenter = await connect(
                RtcOptions(base, room="show", ice_addresses=LOOPBACK),
                PacedPcmTrack(bursts(4.0, 48000), 48000),
            )
            viewer = await connect(
                RtcOptions(base, role="viewer", room="show", ice_addresses=LOOPBACK)
            )
            whep_pc, whep_video, location = await whep_viewer(base, "show")
            receivers = [
                Receiver(presenter.video, keep_images=False),
                Receiver(viewer.video, viewer.audio, keep_images=False),
                Receiver(await asyncio.wait_for(whep_video, 10), keep_images=False),
            ]
            await asyncio.sleep(3.0)
            room = server.rooms["show"]
            assert room.subscribers == (3, 0)
            sent, encoded = room.stats.frames_sent, room.stats.frames_encoded
            # Viewers' data channels do not control.
            reply = await viewer.send_control({"type": "interrupt"})
            assert reply["type"] == "error" and "viewers" in reply["message"]
            for r in receivers:
                await r.stop()
            code, _, _ = await http("DELETE", base + location)
            assert code == 200
            await wait_for(lambda: room.subscribers == (2, 0))
            await whep_pc.close()
            await viewer.close()
            await presenter.close()
            await wait_for(lambda: not server.rooms and not server.members)
            return receivers, sent, encoded

    receivers, sent, encoded = asyncio.run(scenario())
    for r in receivers:
        assert len(r.video) > 50 and 23 < r.fps() < 27
    assert len(receivers[1].audio) > 100  # the viewer hears the avatar too
    # One VP8 encode per frame for all three peers (not one per peer).
    assert encoded <= sent + 5


def test_abrupt_disconnect_leaks_nothing_and_spares_other_rooms() -> None:
    async def scenario() -> None:
        async with running_server(["server.peer_timeout_s=1.5"], capacity=3) as (server, base):
            baseline_tasks = len(asyncio.all_tasks())
            # Room A: a WebSocket agent that keeps streaming throughout.
            async with (
                aiohttp.ClientSession() as s,
                s.ws_connect(base.replace("http", "ws") + "/ws") as ws,
            ):
                await ws.send_json({"type": "start", "sample_rate": 16000, "room": "steady"})
                assert (await ws.receive_json())["type"] == "started"
                arrivals: list[float] = []

                async def read_ws() -> None:
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            arrivals.append(time.monotonic())

                ws_task = asyncio.create_task(read_ws())
                # Room B: a WebRTC presenter whose network vanishes (no DTLS close, no BYE).
                conn = await connect(
                    RtcOptions(base, room="doomed", ice_addresses=LOOPBACK),
                    PacedPcmTrack(bursts(10.0, 48000), 48000),
                )
                rx = Receiver(conn.video, keep_images=False)
                await wait_for(lambda: len(rx.video) > 10)
                threads = {t.name for t in threading.enumerate()}
                assert "livehead-room-doomed" in threads
                t_cut = time.monotonic()
                for t in conn.pc.getTransceivers():
                    await t.receiver.transport.transport.stop()  # the ICE transport: UDP gone
                # Room C: a WebSocket client that drops its TCP connection mid-stream.
                ws_c = await s.ws_connect(base.replace("http", "ws") + "/ws")
                await ws_c.send_json({"type": "start", "sample_rate": 16000, "room": "abort"})
                assert (await ws_c.receive_json())["type"] == "started"
                await ws_c.send_bytes(bursts(0.5, 16000).tobytes())
                await asyncio.sleep(0.3)
                ws_c._response.connection.transport.abort()
                await wait_for(lambda: set(server.rooms) == {"steady"}, timeout=8)
                t_gone = time.monotonic()
                await rx.stop()
                await conn.close()
                await asyncio.sleep(0.5)
                # Nothing left of B and C: members, rooms, worker threads, tasks.
                assert [m.room for m in server.members.values()] == ["steady"]
                alive = {t.name for t in threading.enumerate()}
                assert "livehead-room-doomed" not in alive and "livehead-room-abort" not in alive
                names = {t.get_name() for t in asyncio.all_tasks()}
                assert not any("doomed" in n or "abort" in n for n in names), names
                # Room A never noticed: frames kept coming at 25 fps.
                window = [t for t in arrivals if t_cut - 0.5 < t < t_gone]
                gaps = np.diff(window)
                assert len(window) > 20 and gaps.max() < 0.2, gaps.max()
                assert 22 < (len(window) - 1) / (window[-1] - window[0]) < 28
                ws_task.cancel()
            await wait_for(lambda: not server.rooms and not server.members)
            # Only the test's own task and the server's watchdog remain.
            await asyncio.sleep(0.2)
            assert len(asyncio.all_tasks()) <= baseline_tasks + 1, asyncio.all_tasks()
            assert not any(t.name.startswith("livehead-room") for t in threading.enumerate())

    asyncio.run(scenario())


def test_whip_ingest_drives_a_whep_viewer() -> None:
    async def scenario() -> None:
        async with running_server(token="tok") as (server, base):
            # A WHIP publisher: audio only, send-only, standard application/sdp exchange.
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver(PacedPcmTrack(bursts(4.0, 48000), 48000), direction="sendonly")
            await pc.setLocalDescription(await pc.createOffer())
            auth = {"Authorization": "Bearer tok"}
            code, _, _ = await http(
                "POST",
                base + "/whip?room=live",
                data=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            )
            assert code == 401
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    f"{base}/whip?room=live",
                    data=pc.localDescription.sdp,
                    headers={"Content-Type": "application/sdp", **auth},
                ) as r,
            ):
                assert r.status == 201, await r.text()
                location = r.headers["Location"]
                await pc.setRemoteDescription(RTCSessionDescription(await r.text(), "answer"))
            viewer_pc, video, _ = await whep_viewer(base, "live")
            rx = Receiver(await asyncio.wait_for(video, 10))
            room = server.rooms["live"]
            await wait_for(lambda: room._played_speech > 16000, timeout=8)  # speech arrived
            await rx.stop()
            opening = [mouth_openness(img) for _, _, img in rx.video]
            assert max(opening) > 3 * min(opening) + 0.02  # the mouth moves with the speech
            code, _, _ = await http("DELETE", base + location)
            assert code == 401
            code, _, _ = await http("DELETE", base + location, headers=auth)
            assert code == 200
            assert [m.kind for m in server.members.values()] == ["whep"]  # the room lives on
            await viewer_pc.close()
            await pc.close()
            await wait_for(lambda: not server.rooms)

    asyncio.run(scenario())


def test_viewers_alone_do_not_keep_a_room() -> None:
    """A room whose presenter left closes after server.presenter_grace_s (its viewers are
    disconnected), so an anonymous viewer cannot hold the only session slot; a presenter who
    comes back within the grace period keeps it."""

    async def scenario() -> None:
        overrides = ["server.presenter_grace_s=0.5"]
        async with (
            running_server(overrides, capacity=1) as (server, base),
            aiohttp.ClientSession() as s,
        ):
            ws_url = base.replace("http", "ws") + "/ws"

            async def presenter() -> aiohttp.ClientWebSocketResponse:
                ws = await s.ws_connect(ws_url)
                await ws.send_json({"type": "start", "room": "talk"})
                assert (await ws.receive_json())["type"] == "started"
                return ws

            ws = await presenter()
            viewer_pc, video, _ = await whep_viewer(base, "talk")
            track = await asyncio.wait_for(video, 10)
            room = server.rooms["talk"]
            await ws.close()  # the presenter leaves ...
            await asyncio.sleep(0.2)
            ws = await presenter()  # ... and comes back within the grace period
            await asyncio.sleep(0.6)
            assert server.rooms.get("talk") is room
            await ws.close()  # leaves for good
            await asyncio.sleep(0.2)
            assert server.rooms.get("talk") is room  # still within the grace period
            await wait_for(lambda: not server.rooms and not server.members, timeout=3)
            assert room.closed
            # The viewer sees its connection closed and its track end.
            await wait_for(lambda: viewer_pc.connectionState == "closed", timeout=5)

            async def drain() -> None:
                while True:
                    await track.recv()

            with pytest.raises(MediaStreamError):
                await asyncio.wait_for(drain(), 5)
            await viewer_pc.close()
            # The slot is free for the next presenter.
            ws = await presenter()
            await ws.close()

    asyncio.run(scenario())


def test_sender_reports_describe_one_media_timeline() -> None:
    """RTCP sender reports (what browsers line audio up with video by) map every RTP timestamp
    onto the room's one media timeline: each report of a stream implies the same wall-clock time
    for its first frame, and the two streams' first frames sit on the pacer's grid (20 ms Opus
    packets, the audio stamped the encoder's look-ahead early). aiortc's own stamps (the moment
    a packet left) moved by 0-4 ms between reports on an idle machine and by up to 163 ms with
    an engine (small random networks) in the process."""
    from aiortc.rtp import RtcpSrPacket

    from clients.rtc import NTP_UNIX_OFFSET_S, recv_audio, recv_video
    from server.media import OpusEncoder

    opus = OpusEncoder()
    opus.encode(np.zeros(640, np.int16))
    look_ahead_s = opus.delay_samples / 16000
    assert look_ahead_s > 0

    async def scenario() -> tuple[dict, dict, dict]:
        async with running_server() as (_, base):
            pcm = (bursts(8.0, 48000, period_s=0.46) * 32767).astype(np.int16)
            conn = await connect(
                RtcOptions(base, ice_addresses=LOOPBACK), PacedPcmTrack(pcm, 48000)
            )
            reports: dict[str, list[tuple[int, float]]] = {"audio": [], "video": []}
            for kind in reports:
                receiver = conn.clocks[kind]._receiver
                original = receiver._handle_rtcp_packet

                def hook(kind: str = kind, original=original):
                    async def handle(packet) -> None:
                        if isinstance(packet, RtcpSrPacket):
                            info = packet.sender_info
                            t = info.ntp_timestamp / 2**32 - NTP_UNIX_OFFSET_S
                            reports[kind].append((info.rtp_timestamp, t))
                        await original(packet)

                    return handle

                receiver._handle_rtcp_packet = hook()
            first: dict[str, int] = {}

            async def read(kind: str) -> None:
                while True:
                    if kind == "video":
                        first.setdefault(kind, int((await recv_video(conn.video)).pts))
                    else:
                        first.setdefault(kind, (await recv_audio(conn.audio))[0])

            tasks = [asyncio.create_task(read(k)) for k in reports]
            await wait_for(lambda: min(len(r) for r in reports.values()) >= 3, timeout=15)
            for task in tasks:
                task.cancel()
            origins = {k: conn.clocks[k]._origin() for k in reports}
            await conn.close()
            return reports, first, origins

    reports, first, origins = asyncio.run(scenario())
    start = {}
    for kind, rate in (("audio", 48000), ("video", 90000)):
        # The wall-clock time each report implies for the stream's first received frame.
        implied = [
            t - (((rtp - origins[kind]) % 2**32) - first[kind]) / rate for rtp, t in reports[kind]
        ]
        assert max(implied) - min(implied) < 1e-4, (kind, np.diff(implied) * 1000)
        start[kind] = implied[0]
    # Video frames start on 40 ms, audio packets on 20 ms steps stamped look_ahead_s early.
    steps = (start["video"] - start["audio"] - look_ahead_s) / 0.02
    assert abs(steps - round(steps)) < 0.01, (start["video"] - start["audio"]) * 1000


def test_sender_report_times_unwrap_long_sessions() -> None:
    from clients.rtc import NTP_UNIX_OFFSET_S
    from server.media import _TimelineReports

    reports = _TimelineReports(90000, lambda s: 1000.0 + s)
    assert reports.ntp(123, fallback=7) == 7  # nothing sent yet: aiortc's own stamp
    reports.origin = 2**32 - 10
    reports.last = 5 * 2**32 + 3600  # ~66 hours in: the 32-bit RTP timestamp wrapped 5 times
    rtp = (reports.origin + reports.last) % 2**32
    expected = (1000.0 + reports.last / 90000 + NTP_UNIX_OFFSET_S) * 2**32
    assert abs(reports.ntp(rtp, fallback=0) - expected) < 2**32 * 1e-6
    # A report still on the frame before the last one handed over: one frame earlier.
    earlier = reports.ntp((rtp - 3600) % 2**32, fallback=0)
    assert abs((expected - earlier) / 2**32 - 0.04) < 1e-6
