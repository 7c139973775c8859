"""HTTP surface: bad input, limits, tokens, admission, metrics and health."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import numpy as np
import pytest

from engine.errors import UserError
from server.app import ServerError, check_bind, host_allowed, parse_controls, same_origin
from tests.test_server_support import http, png_bytes, running_server

FAKE_SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


async def ws_presenter(
    session: aiohttp.ClientSession, base: str, room: str, headers: dict | None = None
) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
    ws = await session.ws_connect(base.replace("http", "ws") + "/ws", headers=headers)
    await ws.send_json({"type": "start", "sample_rate": 16000, "room": room})
    return ws, await ws.receive_json()


def test_malformed_and_huge_offers_are_refused() -> None:
    async def scenario() -> None:
        async with running_server() as (server, base):
            cases = [
                (dict(data=b"not json", headers={"Content-Type": "application/json"}), 400, "JSON"),
                (dict(data=b"{}", headers={"Content-Type": "text/plain"}), 415, "application/json"),
                (dict(json={"type": "offer"}), 400, "sdp"),
                (dict(json={"sdp": "hello", "type": "offer"}), 400, "v=0"),
                (dict(json={"sdp": FAKE_SDP, "type": "answer"}), 400, "offer"),
                (dict(json={"sdp": FAKE_SDP, "type": "offer", "role": "boss"}), 400, "role"),
                (dict(json={"sdp": FAKE_SDP, "type": "offer", "room": "a/b"}), 400, "room"),
                (dict(json={"sdp": FAKE_SDP, "type": "offer"}), 400, "negotiate"),
                (dict(json={"sdp": "v=0\r\n" + "a=x\r\n" * 20000, "type": "offer"}), 413, "limit"),
                (
                    dict(
                        json={
                            "sdp": "v=0\r\ns=-\r\n",
                            "type": "offer",
                            "role": "viewer",
                            "room": "nobody",
                        }
                    ),
                    400,
                    "m-line",
                ),
            ]
            for kwargs, status, words in cases:
                code, body, _ = await http("POST", base + "/offer", **kwargs)
                assert code == status, (kwargs, body)
                assert words in body["error"], body
            code, body, _ = await http(
                "POST", base + "/whip", data=FAKE_SDP, headers={"Content-Type": "text/plain"}
            )
            assert code == 415 and "application/sdp" in body["error"]
            code, body, _ = await http(
                "POST",
                base + "/whep",
                data=b"v=0\r\n" * 20000,
                headers={"Content-Type": "application/sdp"},
            )
            assert code == 413
            code, body, _ = await http(
                "PATCH",
                base + "/whep/x",
                data=b"",
                headers={"Content-Type": "application/trickle-ice-sdpfrag"},
            )
            assert code == 405 and "trickle" in body["error"]
            code, body, _ = await http("DELETE", base + "/whep/nope")
            assert code == 404
            # A failed negotiation leaves nothing behind, and the room it opened is closed.
            assert not server.members and not server.rooms

    asyncio.run(scenario())


def test_viewer_needs_a_room_and_a_room_one_presenter() -> None:
    async def scenario() -> None:
        async with running_server(capacity=2) as (_, base), aiohttp.ClientSession() as s:
            code, body, _ = await http(
                "POST",
                base + "/offer",
                json={"sdp": FAKE_SDP, "type": "offer", "role": "viewer", "room": "empty"},
            )
            assert code == 404 and "does not exist" in body["error"]
            ws, started = await ws_presenter(s, base, "one")
            assert started["type"] == "started"
            ws2, refused = await ws_presenter(s, base, "one")
            assert refused["type"] == "error" and "already has a presenter" in refused["message"]
            await ws2.close()
            await ws.close()

    asyncio.run(scenario())


def test_capacity_is_enforced_with_503() -> None:
    async def scenario() -> None:
        async with running_server(capacity=1) as (server, base), aiohttp.ClientSession() as s:
            ws, started = await ws_presenter(s, base, "first")
            assert started["type"] == "started"
            code, body, headers = await http(
                "POST", base + "/offer", json={"sdp": FAKE_SDP, "type": "offer", "room": "second"}
            )
            assert code == 503 and "capacity" in body["error"] and "Retry-After" in headers
            ws2, refused = await ws_presenter(s, base, "third")
            assert refused["status"] == 503
            msg = await ws2.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1013
            assert server.refused == 2
            _, metrics, _ = await http("GET", base + "/metrics")
            assert "livehead_sessions_refused_total 2" in metrics
            await ws.close()
            await asyncio.sleep(0.1)
            # The slot is free again once the first room closed.
            ws3, again = await ws_presenter(s, base, "third")
            assert again["type"] == "started"
            await ws3.close()

    asyncio.run(scenario())


def test_avatar_upload_validation() -> None:
    async def scenario() -> None:
        overrides = ["server.max_upload_bytes=200000", "server.max_image_pixels=1000000"]
        async with running_server(overrides) as (server, base), aiohttp.ClientSession() as s:
            post = base + "/avatar"
            code, body, _ = await http(
                "POST",
                post,
                data=b"GIF89a? definitely not an image",
                headers={"Content-Type": "image/gif"},
            )
            assert code == 415 and "not a readable image" in body["error"]
            code, body, _ = await http("POST", post, data=b"\x00" * 300000)
            assert code == 413 and "max_upload_bytes" in body["error"]
            bomb = png_bytes(2000, 1000)  # small file, 2 Mpx declared
            assert len(bomb) < 200000
            code, body, _ = await http("POST", post, data=bomb)
            assert code == 413 and "pixels" in body["error"]
            code, body, _ = await http("POST", post, data=png_bytes(8, 8))
            assert code == 422
            form = aiohttp.FormData()
            form.add_field(
                "image",
                io.BytesIO(png_bytes(300, 200)),
                filename="me.png",
                content_type="image/png",
            )
            code, body, _ = await http("POST", post, data=form)
            assert code == 200 and (body["width"], body["height"]) == (300, 200)
            avatar_id = body["id"]
            # Applying it: to a live room by id, over HTTP control.
            ws, _ = await ws_presenter(s, base, "default")
            code, reply, _ = await http(
                "POST", base + "/control?room=default", json={"type": "avatar", "id": avatar_id}
            )
            assert code == 200 and reply == {"type": "avatar", "id": avatar_id}
            code, reply, _ = await http(
                "POST", base + "/control", json={"type": "avatar", "id": "f00"}
            )
            assert code == 404
            code, reply, _ = await http("POST", post + "?room=default", data=png_bytes(64, 64))
            assert code == 200 and reply["room"] == "default"
            code, reply, _ = await http("POST", base + "/control", json={"type": "interrupt"})
            assert code == 200 and reply["type"] == "interrupted" and reply["played_samples"] == 0
            await ws.close()

    asyncio.run(scenario())


def test_token_is_required_for_publishing_and_uploads() -> None:
    async def scenario() -> None:
        async with running_server(token="s3cret") as (_, base), aiohttp.ClientSession() as s:
            offer = {"sdp": FAKE_SDP, "type": "offer"}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                code, body, h = await http("POST", base + "/offer", json=offer, headers=headers)
                assert code == 401 and "token" in body["error"] and h["WWW-Authenticate"]
            for path in ("/avatar", "/control", "/whip"):
                code, _, _ = await http("POST", base + path, data=b"x")
                assert code == 401, path
            # Viewing needs no token (here the room does not exist: 404, not 401).
            code, _, _ = await http("POST", base + "/offer", json=dict(offer, role="viewer"))
            assert code == 404
            ws, refused = await ws_presenter(s, base, "r")
            assert refused["type"] == "error" and "token" in refused["message"]
            await ws.close()
            ws = await s.ws_connect(base.replace("http", "ws") + "/ws")
            await ws.send_json({"type": "start", "token": "s3cret"})  # browsers: in the message
            assert (await ws.receive_json())["type"] == "started"
            await ws.close()
            ws, started = await ws_presenter(s, base, "r", {"Authorization": "Bearer s3cret"})
            assert started["type"] == "started"
            await ws.close()

    asyncio.run(scenario())


def test_bind_beyond_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    check_bind("127.0.0.1", None)
    with pytest.raises(UserError, match="token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "t")
    from livehead.cli import main

    monkeypatch.delenv("LIVEHEAD_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--standin"]) == 2


def test_health_metrics_and_no_cors_by_default() -> None:
    async def scenario() -> None:
        async with running_server() as (_, base), aiohttp.ClientSession() as s:
            code, health, headers = await http(
                "GET", base + "/health", headers={"Origin": "https://evil.example"}
            )
            assert code == 200 and health["status"] == "ok" and health["sessions"] == 0
            assert not any(k.lower().startswith("access-control") for k in headers)
            ws, _ = await ws_presenter(s, base, "m")
            await asyncio.sleep(1.2)
            code, metrics, headers = await http("GET", base + "/metrics")
            assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
            values = {}
            for line in metrics.splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    values[name] = float(value)
            assert values["livehead_sessions"] == 1
            assert values['livehead_ws_subscribers{room="m"}'] == 1
            assert 20 < values['livehead_fps{room="m"}'] < 30
            assert values['livehead_frames_sent_total{room="m"}'] > 15
            assert 0.05 < values['livehead_latency_seconds{room="m",quantile="0.5"}'] < 0.5
            assert values['livehead_video_dropped_total{room="m"}'] == 0
            assert "# TYPE livehead_latency_seconds summary" in metrics
            assert 'livehead_stage_seconds{room="m",stage="compute",quantile="0.5"}' in metrics
            code, page, _ = await http("GET", base + "/")
            assert code == 200 and "livehead" in page
            code, js, _ = await http("GET", base + "/static/app.js")
            assert code == 200 and "iceGatheringState" in js
            code, _, _ = await http("GET", base + "/static/..%2Fserver.py")
            assert code == 404
            await ws.close()

    asyncio.run(scenario())


def test_cross_site_requests_are_refused() -> None:
    """A page on another site must not interrupt, swap the avatar or take the session slot:
    browsers send Origin, and only this server's own origin (or a configured one) gets in."""

    async def scenario() -> None:
        overrides = ['server.cors_origins=["https://app.example"]']
        async with running_server(overrides) as (server, base), aiohttp.ClientSession() as s:
            evil = {"Origin": "https://evil.example"}
            ws_url = base.replace("http", "ws") + "/ws"
            # The WebSocket handshake: refused before any session exists.
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await s.ws_connect(ws_url, headers=evil)
            assert e.value.status == 403 and not server.rooms
            for origin in (base.replace("127.0.0.1", "localhost"), "null", base + ".evil"):
                with pytest.raises(aiohttp.WSServerHandshakeError):
                    await s.ws_connect(ws_url, headers={"Origin": origin})
            # Same origin (the bundled page), a configured origin, and no Origin (not a browser).
            for headers in ({"Origin": base}, {"Origin": "https://app.example"}, None):
                ws = await s.ws_connect(ws_url, headers=headers)
                await ws.send_json({"type": "start", "room": "x"})
                assert (await ws.receive_json())["type"] == "started"
                await ws.close()
                await asyncio.sleep(0.05)
            ws, _ = await ws_presenter(s, base, "default")
            room = server.rooms["default"]
            # POSTs: controls, avatar, offers, WHIP; and DELETE.
            posts = [
                ("/control", dict(json={"type": "interrupt"})),
                ("/avatar", dict(data=png_bytes(64, 64), headers={"Content-Type": "image/png"})),
                ("/offer", dict(json={"sdp": FAKE_SDP, "type": "offer", "room": "other"})),
                ("/whip", dict(data=FAKE_SDP, headers={"Content-Type": "application/sdp"})),
            ]
            for path, kwargs in posts:
                headers = {**kwargs.pop("headers", {}), **evil}
                code, body, h = await http("POST", base + path, headers=headers, **kwargs)
                assert code == 403 and "origin" in body["error"], (path, body)
                assert not any(k.lower().startswith("access-control") for k in h)
            code, _, _ = await http("DELETE", base + "/whep/x", headers=evil)
            assert code == 403
            assert room.stats.frames_flushed == 0 and set(server.rooms) == {"default"}
            code, reply, _ = await http(
                "POST", base + "/control", json={"type": "interrupt"}, headers={"Origin": base}
            )
            assert code == 200 and reply["type"] == "interrupted"
            code, reply, h = await http(
                "POST",
                base + "/control",
                json={"type": "interrupt"},
                headers={"Origin": "https://app.example"},
            )
            assert code == 200 and h["Access-Control-Allow-Origin"] == "https://app.example"
            # CORS preflight: answered for the configured origin only.
            pre = {"Access-Control-Request-Method": "POST"}
            code, _, h = await http(
                "OPTIONS", base + "/control", headers={"Origin": "https://app.example", **pre}
            )
            assert code == 204 and h["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Content-Type" in h["Access-Control-Allow-Headers"]
            code, _, h = await http("OPTIONS", base + "/control", headers={**evil, **pre})
            assert code == 403 and "Access-Control-Allow-Origin" not in h
            # Reading stays open (GET needs no Origin check).
            code, _, _ = await http("GET", base + "/health", headers=evil)
            assert code == 200
            await ws.close()

    asyncio.run(scenario())


def test_dns_rebinding_is_refused_without_a_token() -> None:
    """A page on evil.example whose name resolves to 127.0.0.1 is its own origin: only the
    Host header tells it apart. Loopback names and IP literals pass; other names need
    server.allowed_hosts, or a token (then every Host is served)."""

    async def scenario() -> None:
        async with running_server(['server.allowed_hosts=["avatar.lan"]']) as (server, base):
            port = base.rsplit(":", 1)[1]
            rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
            for method, path, kwargs in (
                ("GET", "/", {}),
                ("GET", "/metrics", {}),
                ("POST", "/control", dict(json={"type": "interrupt"})),
            ):
                code, body, _ = await http(method, base + path, headers=rebound, **kwargs)
                assert code == 403 and "allowed_hosts" in body["error"], (path, body)
            for host in (f"localhost:{port}", f"avatar.lan:{port}", f"10.0.0.2:{port}"):
                code, _, _ = await http("GET", base + "/health", headers={"Host": host})
                assert code == 200, host
            assert not server.rooms
        async with running_server(token="s3cret") as (_, base):
            code, _, _ = await http("GET", base + "/health", headers={"Host": "avatar.example"})
            assert code == 200

    asyncio.run(scenario())
    assert host_allowed("[::1]:8080", []) and host_allowed("app.localhost", [])
    assert host_allowed("anything.example", ["*"])
    assert not host_allowed("", []) and not host_allowed("127.0.0.1.evil.example", [])


def test_same_origin_rule() -> None:
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert same_origin("https://Avatar.example", "avatar.example")  # TLS proxy: default ports
    assert same_origin("https://avatar.example", "avatar.example:443")
    assert same_origin("http://[::1]:8080", "[::1]:8080")
    assert not same_origin("http://127.0.0.1:8081", "127.0.0.1:8080")
    assert not same_origin("https://avatar.example", "avatar.example:80")
    assert not same_origin("http://evil.example", "avatar.example")
    assert not same_origin("null", "avatar.example")
    assert not same_origin("file://", "avatar.example")
    assert not same_origin("http://x:99999", "x:99999")


def test_control_and_avatar_need_their_content_types() -> None:
    """text/plain (or a form) is what a page elsewhere can POST without a CORS preflight."""

    async def scenario() -> None:
        async with running_server() as (_, base), aiohttp.ClientSession() as s:
            ws, _ = await ws_presenter(s, base, "default")
            body = json.dumps({"type": "interrupt"}).encode()
            for ctype in ("text/plain", "application/x-www-form-urlencoded"):
                code, reply, _ = await http(
                    "POST", base + "/control", data=body, headers={"Content-Type": ctype}
                )
                assert code == 415 and "application/json" in reply["error"], reply
            code, reply, _ = await http(
                "POST", base + "/control", data=body, headers={"Content-Type": "application/json"}
            )
            assert code == 200 and reply["type"] == "interrupted"
            png = png_bytes(64, 64)
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/json"):
                code, reply, _ = await http(
                    "POST", base + "/avatar", data=png, headers={"Content-Type": ctype}
                )
                assert code == 415 and "image/" in reply["error"], (ctype, reply)
            # No Content-Type at all (a fetch with an untyped body is a "simple" request too).
            async with (
                aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as bare,
                bare.post(base + "/avatar", data=png) as r,
            ):
                assert r.status == 415, await r.text()
            for ctype in ("image/png", "application/octet-stream"):
                code, reply, _ = await http(
                    "POST", base + "/avatar", data=png, headers={"Content-Type": ctype}
                )
                assert code == 200 and reply["width"] == 64, reply
            await ws.close()

    asyncio.run(scenario())


def test_large_control_messages_are_parsed_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A control message may carry a 10 MB base64 image: json.loads and the base64 decode of
    it must not run on the event loop (the pacer of every room runs there)."""
    import base64
    import threading

    from PIL import Image

    seen: list[tuple[str, str]] = []
    real_loads, real_b64decode = json.loads, base64.b64decode

    def loads(s, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if len(s) > 100_000:
            seen.append(("json", threading.current_thread().name))
        return real_loads(s, *a, **kw)

    def b64decode(s, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if len(s) > 100_000:
            seen.append(("base64", threading.current_thread().name))
        return real_b64decode(s, *a, **kw)

    noise = np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    assert len(image) > 100_000

    async def scenario() -> None:
        async with running_server() as (_, base), aiohttp.ClientSession() as s:
            ws, _ = await ws_presenter(s, base, "default")
            monkeypatch.setattr(json, "loads", loads)
            monkeypatch.setattr(base64, "b64decode", b64decode)
            loop_thread = threading.current_thread().name
            code, reply, _ = await http(
                "POST", base + "/control", json={"type": "avatar", "image": image}
            )
            assert code == 200 and reply["type"] == "avatar", reply
            await ws.send_json({"type": "avatar", "image": "data:image/png;base64," + image})
            while (msg := await ws.receive(timeout=5)).type != aiohttp.WSMsgType.TEXT:
                pass
            assert real_loads(msg.data)["type"] == "avatar", msg.data
            monkeypatch.undo()
            await ws.close()
            kinds = [k for k, _ in seen]
            assert kinds.count("json") >= 2 and kinds.count("base64") >= 2, seen
            assert all(thread != loop_thread for _, thread in seen), seen

    asyncio.run(scenario())


def test_controls_accept_any_real_number() -> None:
    c = parse_controls(
        {"pose_deg": [np.float32(5.5), np.int64(0), 1], "location": np.float64(0.1), "scale": 1}
    )
    assert c.pose_deg == (5.5, 0.0, 1.0) and c.location == 0.1 and c.scale == 1.0
    assert all(type(v) is float for v in (*c.pose_deg, c.location, c.scale))
    for bad in ({"scale": True}, {"scale": "1"}, {"location": np.float32("nan")}):
        with pytest.raises(ServerError):
            parse_controls(bad)
