"""The livehead HTTP/WebRTC/WebSocket server (aiohttp + aiortc).

    server = LiveheadServer(cfg, session_factory, avatar_rgb, token=None)
    web.run_app(server.make_app(), host=cfg.server.host, port=cfg.server.port)

Endpoints (PROTOCOL.md has the details):
    GET  /                      the web client (clients/web)
    POST /offer                 {"sdp","type","role":"presenter"|"viewer","room"} -> answer JSON
    POST /whip, DELETE /whip/ID presenter ingest (WHIP, application/sdp)
    POST /whep, DELETE /whep/ID viewer egress (WHEP, application/sdp)
    POST /control               live controls and interrupt, JSON
    POST /avatar                portrait upload (raw image body or multipart)
    GET  /ws                    voice-agent WebSocket: PCM in, synchronized frames out
    GET  /metrics, GET /health  Prometheus text, JSON

A room is one engine session (created by ``session_factory``) with one presenter and any number
of viewers; at most ``capacity`` rooms exist at once (admission control: 503 beyond that).
Everything that touches the session runs on the room's worker thread (server/room.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import math
import numbers
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import av
import numpy as np
from aiohttp import BodyPartReader, WSMsgType, web
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription

from engine.config import Config
from engine.errors import UserError
from engine.session_api import SAMPLE_RATE, Controls, Session
from server.images import AvatarCache, ImageRejected, decode_avatar
from server.media import OPUS_RTP_CLOCK_HZ, VIDEO_CLOCK_HZ, report_media_time
from server.room import Room, RoomSettings, RtpSubscriber, WsSubscriber, kv
from server.wire import pack_frame

log = logging.getLogger("livehead.server")

SessionFactory = Callable[[np.ndarray], Session]
WEB_DIR = Path(__file__).resolve().parent.parent / "clients" / "web"
ROOM_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
WS_START_TIMEOUT_S = 10.0
WATCHDOG_PERIOD_S = 1.0
ROLES = ("presenter", "viewer")
# JSON bodies and base64 images larger than this are parsed on a worker thread, not the loop.
INLINE_PARSE_BYTES = 65536
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
OFFER_SHAPE = 'body must be JSON {"sdp": ..., "type": "offer", "role": ..., "room": ...}'


class ServerError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _unbase64(text: str) -> bytes:
    """base64 or a data: URL -> bytes (ServerError 400). Runs on a worker thread."""
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServerError(400, "avatar image must be base64 (or a data: URL)") from None


def configure_ice(addresses: list[str]) -> None:
    """Restrict the host candidates aioice offers (process-wide).

    aioice never offers 127.0.0.1 on its own; tests and single-machine setups without another
    interface pass ["127.0.0.1"] (ENVIRONMENT.md)."""
    if not addresses:
        return
    import aioice.ice

    allowed = list(addresses)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(allowed)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (UserError)."""
    if host not in LOOPBACK_HOSTS and not token:
        raise UserError(
            f"refusing to listen on {host} without a token: pass --token or set LIVEHEAD_TOKEN "
            "(publishing and uploads then need 'Authorization: Bearer <token>')"
        )


def host_allowed(host: str | None, allowed: list[str]) -> bool:
    """DNS-rebinding defence: may a request with this ``Host`` header be served?

    Loopback names and IP literals always; other names only when listed in ``allowed`` (or
    ``allowed`` holds "*"). A page on evil.example whose name is made to resolve to 127.0.0.1
    sends ``Host: evil.example`` and is refused."""
    if "*" in allowed:
        return True
    try:
        name = urlsplit("//" + (host or "")).hostname
    except ValueError:
        return False
    if not name:
        return False
    if name in LOOPBACK_HOSTS or name.endswith(".localhost") or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def same_origin(origin: str, host: str | None) -> bool:
    """True when a browser's ``Origin`` names the host (and port) the request was sent to.

    A missing port means the scheme's default on both sides (a TLS proxy in front keeps
    ``Host`` without a port while the page is https)."""
    try:
        o = urlsplit(origin)
        h = urlsplit("//" + (host or ""))
        if o.scheme not in ("http", "https") or not o.hostname or not h.hostname:
            return False
        default = DEFAULT_PORTS[o.scheme]
        return o.hostname == h.hostname and (o.port or default) == (h.port or default)
    except ValueError:  # a malformed port or netloc
        return False


def parse_controls(msg: dict[str, Any]) -> Controls:
    """{"pose_deg": [yaw, pitch, roll], "location": x, "scale": s} -> Controls (400 on bad
    values); a missing or null field means "let the model decide"."""

    def number(v: Any, name: str, lo: float, hi: float) -> float:
        # Any real number (numpy scalars too, from Python callers); bool is not a number here.
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ServerError(400, f"{name} must be a finite number, got {v!r}")
        x = float(v)
        if not lo <= x <= hi:
            raise ServerError(400, f"{name} must be in [{lo}, {hi}], got {x}")
        return x

    pose = msg.get("pose_deg")
    if pose is not None:
        if not isinstance(pose, list) or len(pose) != 3:
            raise ServerError(400, f"pose_deg must be [yaw, pitch, roll] in degrees, got {pose!r}")
        pose = tuple(number(v, f"pose_deg[{i}]", -90, 90) for i, v in enumerate(pose))
    loc = msg.get("location")
    scale = msg.get("scale")
    return Controls(
        pose_deg=pose,
        location=None if loc is None else number(loc, "location", -1.0, 1.0),
        scale=None if scale is None else number(scale, "scale", 0.25, 4.0),
    )


@dataclass
class Member:
    """Someone in a room: a WebRTC peer or a WebSocket connection."""

    id: str
    role: str  # "presenter" or "viewer"
    room: str
    kind: str  # "offer", "whip", "whep", "ws"
    created: float = field(default_factory=time.monotonic)
    pc: RTCPeerConnection | None = None
    sub: RtpSubscriber | None = None
    channel: Any = None  # RTCDataChannel
    tasks: set[asyncio.Task] = field(default_factory=set)
    rx_packets: int = -1
    rx_changed: float = field(default_factory=time.monotonic)
    closing: bool = False
    ws: web.WebSocketResponse | None = None


class LiveheadServer:
    """Rooms, peers and the aiohttp application.

    session_factory: makes one engine session for a portrait, ``(H, W, 3) uint8 -> Session``;
        called on a worker thread (it may load or prepare things), once per room.
    default_avatar: the portrait new rooms start with.
    capacity: most rooms (real-time sessions) at once; defaults to ``server.max_sessions``.
    token: when set, publishing, controls and uploads need ``Authorization: Bearer <token>``.
    """

    def __init__(
        self,
        cfg: Config,
        session_factory: SessionFactory,
        default_avatar: np.ndarray,
        token: str | None = None,
        capacity: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.scfg = cfg.server
        self.session_factory = session_factory
        self.default_avatar = default_avatar
        self.token = token or None
        self.capacity = cfg.server.max_sessions if capacity is None else capacity
        self.settings = RoomSettings.from_config(cfg)
        self.rooms: dict[str, Room] = {}
        self.members: dict[str, Member] = {}
        self.avatars = AvatarCache()
        self.refused = 0
        self.started = time.monotonic()
        self._room_lock = asyncio.Lock()
        self._creating = 0
        self._watchdog: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._orphan_timers: dict[str, asyncio.Task] = {}  # rooms whose presenter left
        configure_ice(self.scfg.ice_addresses)

    # ---------------------------------------------------------------------------------------
    # Application
    # ---------------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        # aiohttp's own cap on bodies it buffers; our handlers stream with tighter limits.
        app = web.Application(
            client_max_size=self.scfg.max_upload_bytes + 65536,
            middlewares=[self._errors_middleware],
        )
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/static/{name}", self._static)
        r.add_post("/offer", self._offer)
        r.add_post("/whip", self._whip)
        r.add_delete("/whip/{id}", self._whip_delete)
        r.add_patch("/whip/{id}", self._no_trickle)
        r.add_post("/whep", self._whep)
        r.add_delete("/whep/{id}", self._whep_delete)
        r.add_patch("/whep/{id}", self._no_trickle)
        r.add_post("/control", self._control)
        r.add_post("/avatar", self._avatar)
        r.add_get("/ws", self._ws)
        r.add_get("/metrics", self._metrics)
        r.add_get("/health", self._health)
        r.add_route("OPTIONS", "/{tail:.*}", self._preflight)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._watchdog = asyncio.create_task(self._watch(), name="livehead-watchdog")
        log.info("server ready %s", kv(capacity=self.capacity, token=bool(self.token)))

    async def _on_shutdown(self, app: web.Application) -> None:
        """Graceful shutdown: every peer and connection closed, every session closed."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await asyncio.gather(
            *(self._drop_member(m, "server shutting down") for m in list(self.members.values()))
        )
        for timer in list(self._orphan_timers.values()):  # presenters that just left start some
            timer.cancel()
        await asyncio.gather(*(room.close() for room in list(self.rooms.values())))
        self.rooms.clear()
        log.info("server stopped")

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Callable
    ) -> web.StreamResponse:
        try:
            self._check_host(request)
            self._check_origin(request)
            resp = await handler(request)
        except ServerError as e:
            if e.status >= 500:
                log.warning("refused %s", kv(path=request.path, status=e.status, error=e.message))
            resp = web.json_response({"error": e.message}, status=e.status, headers=e.headers)
        except web.HTTPException as e:
            if e.status >= 400 and e.content_type != "application/json":
                resp = web.json_response({"error": e.reason}, status=e.status)
            else:
                raise
        self._cors(request, resp)
        return resp

    def _cors(self, request: web.Request, resp: web.StreamResponse) -> None:
        # No CORS headers unless origins are configured: a page elsewhere must not drive this.
        origin = request.headers.get("Origin")
        if origin and origin in self.scfg.cors_origins and not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = "Location"
            resp.headers["Vary"] = "Origin"

    def _check_host(self, request: web.Request) -> None:
        """Without a token, answer only to loopback names, IP literals and
        ``server.allowed_hosts`` (DNS rebinding would otherwise let any web page reach a
        loopback server as its own origin). With a token every ``Host`` is served."""
        if self.token is None and not host_allowed(request.host, self.scfg.allowed_hosts):
            raise ServerError(
                403,
                f"unknown Host {request.host!r}: open this server by 127.0.0.1/localhost or an IP "
                "address, or list the name in server.allowed_hosts",
            )

    def _check_origin(self, request: web.Request) -> None:
        """A web page elsewhere must not drive this server: a browser's POST/DELETE/PATCH and
        WebSocket handshake carry ``Origin``, which must be this server's own or one listed in
        ``server.cors_origins``. Requests without ``Origin`` (not a browser) pass."""
        origin = request.headers.get("Origin")
        if origin is None or (request.method in SAFE_METHODS and request.path != "/ws"):
            return
        if origin in self.scfg.cors_origins or same_origin(origin, request.host):
            return
        raise ServerError(
            403,
            f"cross-site request from origin {origin!r} refused: serve the page from this "
            "server or list its origin in server.cors_origins",
        )

    async def _preflight(self, request: web.Request) -> web.Response:
        """CORS preflight: only for origins in ``server.cors_origins`` (JSON and image POSTs,
        the token header and DELETE need one)."""
        origin = request.headers.get("Origin")
        if not origin or origin not in self.scfg.cors_origins:
            raise ServerError(
                403, "cross-origin requests are allowed only from server.cors_origins"
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE, PATCH",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            },
        )

    # ---------------------------------------------------------------------------------------
    # Helpers
    # ---------------------------------------------------------------------------------------
    @staticmethod
    async def _parse_json(data: bytes | str) -> Any:
        """json.loads, on a worker thread when the text is large (controls may carry a
        base64 image of up to 2 x server.max_upload_bytes). Raises ValueError."""
        if len(data) > INLINE_PARSE_BYTES:
            return await asyncio.to_thread(json.loads, data)
        return json.loads(data)

    def _check_token(self, request: web.Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ServerError(
                401,
                "missing or wrong token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    async def _read_body(self, request: web.Request, limit: int, what: str, setting: str) -> bytes:
        """The body, refused with 413 as soon as it passes ``limit`` (never buffered whole)."""
        if request.content_length is not None and request.content_length > limit:
            raise ServerError(
                413, f"{what} is {request.content_length} bytes; the limit is {limit} ({setting})"
            )
        data = bytearray()
        async for chunk in request.content.iter_chunked(65536):
            data += chunk
            if len(data) > limit:
                raise ServerError(
                    413, f"{what} is larger than the limit of {limit} bytes ({setting})"
                )
        return bytes(data)

    @staticmethod
    def _room_name(value: Any) -> str:
        name = "default" if value in (None, "") else value
        if not isinstance(name, str) or not ROOM_RE.match(name):
            raise ServerError(400, "room must be 1-64 characters of A-Z a-z 0-9 _ -")
        return name

    def _presenter_of(self, room: str) -> Member | None:
        for m in self.members.values():
            if m.room == room and m.role == "presenter":
                return m
        return None

    def _room_members(self, room: str) -> list[Member]:
        return [m for m in self.members.values() if m.room == room]

    async def _join(self, role: str, room_name: str, kind: str) -> tuple[Room, Member]:
        """Admission: a presenter creates (or takes over an idle) room; a viewer joins one."""
        async with self._room_lock:
            room = self.rooms.get(room_name)
            if role == "presenter":
                if self._presenter_of(room_name) is not None:
                    raise ServerError(409, f"room '{room_name}' already has a presenter")
                if room is None:
                    room = await self._create_room(room_name)
            else:
                if room is None:
                    raise ServerError(
                        404,
                        f"room '{room_name}' does not exist; a presenter "
                        "creates it (POST /offer role=presenter, /whip or /ws)",
                    )
                viewers = sum(1 for m in self._room_members(room_name) if m.role == "viewer")
                if viewers >= self.scfg.max_viewers_per_room:
                    self.refused += 1
                    raise ServerError(
                        503,
                        f"room '{room_name}' has {viewers} viewers, the limit "
                        "(server.max_viewers_per_room)",
                        {"Retry-After": "10"},
                    )
            member = Member(secrets.token_urlsafe(12), role, room_name, kind)
            self.members[member.id] = member
        log.info("joined %s", kv(member=member.id, role=role, kind=kind, room=room_name))
        return room, member

    async def _create_room(self, name: str) -> Room:
        if len(self.rooms) + self._creating >= self.capacity:
            self.refused += 1
            raise ServerError(
                503,
                f"server is at capacity: {len(self.rooms)} of {self.capacity} real-time "
                "sessions in use (server.max_sessions); try again later",
                {"Retry-After": "10"},
            )
        self._creating += 1
        try:
            # The factory may prepare the avatar or load state: keep it off the event loop.
            session = await asyncio.to_thread(self.session_factory, self.default_avatar.copy())
        except UserError as e:
            raise ServerError(500, f"could not start a session: {e}") from None
        finally:
            self._creating -= 1
        room = Room(
            name, session, self.settings, asyncio.get_running_loop(), on_failed=self._room_failed
        )
        room.start()
        self.rooms[name] = room
        log.info(
            "room open %s",
            kv(
                room=name,
                sessions=len(self.rooms),
                capacity=self.capacity,
                delay_ms=room.delay_samples * 1000 / SAMPLE_RATE,
            ),
        )
        return room

    def _room_failed(self, room: Room, exc: BaseException) -> None:
        log.error("room failed %s", kv(room=room.name, error=repr(exc)))
        for m in self._room_members(room.name):
            self._spawn(self._drop_member(m, f"session failed: {exc}"))

    def _spawn(self, coro: Awaitable[Any], member: Member | None = None) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        if member is not None:
            member.tasks.add(task)
            task.add_done_callback(member.tasks.discard)
        else:
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return task

    async def _drop_member(self, member: Member, reason: str) -> None:
        """Remove a member everywhere; the last one out closes the room (frees capacity)."""
        if member.closing:
            return
        member.closing = True
        log.info("left %s", kv(member=member.id, role=member.role, room=member.room, reason=reason))
        room = self.rooms.get(member.room)
        if room is not None and member.sub is not None:
            room.remove_rtp(member.sub)
        current = asyncio.current_task()
        for task in list(member.tasks):
            if task is not current:
                task.cancel()
        if member.ws is not None and not member.ws.closed:
            with contextlib.suppress(Exception):
                await member.ws.send_json({"type": "error", "message": reason})
                await member.ws.close(
                    code=1001 if "shutting" in reason else 1011, message=reason[:100].encode()
                )
        if member.pc is not None:
            with contextlib.suppress(Exception):
                await member.pc.close()
        async with self._room_lock:
            self.members.pop(member.id, None)
            room = self.rooms.get(member.room)
            if room is not None and not self._room_members(member.room):
                self.rooms.pop(member.room, None)
                await room.close()
                log.info("room closed %s", kv(room=member.room, sessions=len(self.rooms)))
                room = None
        if room is not None and member.role == "presenter":
            # Viewers alone must not hold a session slot: close after a grace period unless a
            # presenter comes back.
            old = self._orphan_timers.pop(member.room, None)
            if old is not None:
                old.cancel()
            timer = asyncio.ensure_future(self._close_orphan(member.room, room))
            self._orphan_timers[member.room] = timer
            timer.add_done_callback(functools.partial(self._forget_orphan_timer, member.room))

    def _forget_orphan_timer(self, name: str, timer: asyncio.Task) -> None:
        if self._orphan_timers.get(name) is timer:
            del self._orphan_timers[name]

    async def _close_orphan(self, name: str, room: Room) -> None:
        grace = self.scfg.presenter_grace_s
        await asyncio.sleep(grace)
        if self.rooms.get(name) is not room or self._presenter_of(name) is not None:
            return
        log.info("room without presenter %s", kv(room=name, grace_s=grace))
        await asyncio.gather(
            *(
                self._drop_member(m, f"the presenter left more than {grace:g} s ago")
                for m in self._room_members(name)
            )
        )

    async def _watch(self) -> None:
        """Every second: close peers that went silent (no packet at all for peer_timeout_s,
        e.g. a browser tab killed without a goodbye), send stats on data channels."""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            now = time.monotonic()
            for m in list(self.members.values()):
                if m.pc is None or m.closing:
                    continue
                try:
                    report = await m.pc.getStats()
                except Exception:
                    continue
                rx = sum(s.packetsReceived for s in report.values() if s.type == "transport")
                if rx != m.rx_packets:
                    m.rx_packets, m.rx_changed = rx, now
                elif now - m.rx_changed > self.scfg.peer_timeout_s:
                    self._spawn(self._drop_member(m, f"no packets for {self.scfg.peer_timeout_s}s"))
                    continue
                room = self.rooms.get(m.room)
                if room is not None and m.channel is not None and m.channel.readyState == "open":
                    with contextlib.suppress(Exception):
                        m.channel.send(json.dumps(self._room_stats(room)))

    def _room_stats(self, room: Room) -> dict[str, Any]:
        st = room.stats
        lat = np.array(st.latency_s) if st.latency_s else None
        return {
            "type": "stats",
            "room": room.name,
            "fps": round(st.fps(), 2),
            "frames_sent": st.frames_sent,
            "video_dropped": st.video_dropped,
            "stalls": st.stalls,
            "queue_frames": room.queue_depth,
            "delay_ms": room.delay_samples * 1000 / SAMPLE_RATE,
            "latency_ms_p50": None if lat is None else round(float(np.median(lat)) * 1000, 1),
            "latency_ms_p95": None
            if lat is None
            else round(float(np.percentile(lat, 95)) * 1000, 1),
        }

    # ---------------------------------------------------------------------------------------
    # Static files
    # ---------------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = WEB_DIR / name
        if not re.match(r"^[a-z0-9_-]+\.(js|css|html|svg|png)$", name) or not path.is_file():
            raise ServerError(404, f"no such file: {name}")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    # ---------------------------------------------------------------------------------------
    # WebRTC signaling
    # ---------------------------------------------------------------------------------------
    async def _offer(self, request: web.Request) -> web.Response:
        # Not a "simple" CORS type: a page elsewhere cannot send it without asking first.
        if request.content_type != "application/json":
            raise ServerError(415, "POST /offer needs Content-Type: application/json")
        body = await self._read_body(
            request, self.scfg.max_sdp_bytes + 4096, "offer", "server.max_sdp_bytes"
        )
        try:
            params = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ServerError(400, OFFER_SHAPE) from None
        if not isinstance(params, dict) or not isinstance(params.get("sdp"), str):
            raise ServerError(400, OFFER_SHAPE)
        if params.get("type") != "offer":
            raise ServerError(400, f"type must be 'offer', got {params.get('type')!r}")
        role = params.get("role", "presenter")
        if role not in ROLES:
            raise ServerError(400, f"role must be one of {ROLES}, got {role!r}")
        if role == "presenter":
            self._check_token(request)
        room = self._room_name(params.get("room"))
        sdp, member = await self._negotiate(params["sdp"], role, room, "offer")
        return web.json_response({"sdp": sdp, "type": "answer", "id": member.id, "room": room})

    async def _whip(self, request: web.Request) -> web.Response:
        self._check_token(request)
        return await self._sdp_resource(request, "presenter", "whip")

    async def _whep(self, request: web.Request) -> web.Response:
        return await self._sdp_resource(request, "viewer", "whep")

    async def _sdp_resource(self, request: web.Request, role: str, kind: str) -> web.Response:
        if request.content_type != "application/sdp":
            raise ServerError(415, f"{kind.upper()} needs Content-Type: application/sdp")
        body = await self._read_body(
            request, self.scfg.max_sdp_bytes, "SDP offer", "server.max_sdp_bytes"
        )
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ServerError(400, "SDP offer is not UTF-8 text") from None
        room = self._room_name(request.query.get("room"))
        sdp, member = await self._negotiate(offer, role, room, kind)
        return web.Response(
            status=201,
            text=sdp,
            content_type="application/sdp",
            headers={"Location": f"/{kind}/{member.id}", "ETag": member.id},
        )

    async def _whip_delete(self, request: web.Request) -> web.Response:
        self._check_token(request)
        return await self._delete_resource(request, "whip")

    async def _whep_delete(self, request: web.Request) -> web.Response:
        return await self._delete_resource(request, "whep")

    async def _delete_resource(self, request: web.Request, kind: str) -> web.Response:
        member = self.members.get(request.match_info["id"])
        if member is None or member.kind != kind:
            raise ServerError(404, f"no such {kind.upper()} resource")
        await self._drop_member(member, "deleted by client")
        return web.Response(status=200)

    async def _no_trickle(self, request: web.Request) -> web.Response:
        raise ServerError(
            405,
            "trickle ICE is not supported: gather all candidates before sending the offer",
            {"Allow": "POST, DELETE"},
        )

    def _parse_offer(self, sdp: str, role: str) -> SessionDescription:
        if len(sdp.encode()) > self.scfg.max_sdp_bytes:
            raise ServerError(
                413,
                f"SDP offer is larger than {self.scfg.max_sdp_bytes} bytes (server.max_sdp_bytes)",
            )
        if not sdp.lstrip().startswith("v=0"):
            raise ServerError(400, "malformed SDP offer: it must start with 'v=0'")
        try:
            parsed = SessionDescription.parse(sdp)
        except Exception as e:
            raise ServerError(400, f"malformed SDP offer: {e!r}") from None
        kinds = [m.kind for m in parsed.media]
        if role == "presenter" and "audio" not in kinds:
            raise ServerError(400, "a presenter's offer must contain an audio m-line (the speech)")
        if role == "viewer" and not ({"audio", "video"} & set(kinds)):
            raise ServerError(400, "a viewer's offer must contain an audio or video m-line")
        return parsed

    async def _negotiate(
        self, sdp: str, role: str, room_name: str, kind: str
    ) -> tuple[str, Member]:
        parsed = self._parse_offer(sdp, role)
        room, member = await self._join(role, room_name, kind)
        ice = [RTCIceServer(urls=u) for u in self.scfg.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        member.pc = pc
        try:
            answer = await self._answer(pc, parsed, sdp, role, kind, room, member)
        except ServerError:
            await self._drop_member(member, "negotiation failed")
            raise
        except Exception as e:
            await self._drop_member(member, "negotiation failed")
            raise ServerError(400, f"could not negotiate the offer: {e}") from None
        log.info("answered %s", kv(member=member.id, role=role, kind=kind, room=room_name))
        return answer, member

    async def _answer(
        self,
        pc: RTCPeerConnection,
        parsed: SessionDescription,
        sdp: str,
        role: str,
        kind: str,
        room: Room,
        member: Member,
    ) -> str:
        kinds = {m.kind for m in parsed.media}
        # WHIP is ingest only: nothing goes back to the publisher.
        sub = None if kind == "whip" else RtpSubscriber(room, video="video" in kinds)
        ours = []
        # Transceivers exist before setRemoteDescription so aiortc matches the offer's m-lines
        # to them and negotiates only what we encode: Opus audio and VP8 video.
        for mline_kind in ("audio", "video"):
            if mline_kind not in kinds:
                continue
            track = None if sub is None else (sub.audio if mline_kind == "audio" else sub.video)
            if track is None:
                # Ingest: receive the speech, refuse a camera.
                direction = "recvonly" if mline_kind == "audio" else "inactive"
                t = pc.addTransceiver(mline_kind, direction=direction)
            else:
                presenter_audio = mline_kind == "audio" and role == "presenter"
                t = pc.addTransceiver(
                    track, direction="sendrecv" if presenter_audio else "sendonly"
                )
                if mline_kind == "video":
                    self._hook_pli(t.sender, room)
                rate = VIDEO_CLOCK_HZ if mline_kind == "video" else OPUS_RTP_CLOCK_HZ
                if not report_media_time(t.sender, rate, room.media_unix_time):
                    log.warning("this aiortc's sender reports stay its own (no lip-sync timeline)")
            wanted = ("audio/opus",) if mline_kind == "audio" else ("video/vp8", "video/rtx")
            caps = RTCRtpSender.getCapabilities(mline_kind).codecs
            t.setCodecPreferences([c for c in caps if c.mimeType.lower() in wanted])
            ours.append(t)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and role == "presenter":
                self._spawn(self._consume_audio(member, room, track), member)

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            member.channel = channel

            @channel.on("message")
            def on_message(message: Any) -> None:
                self._spawn(self._channel_message(member, room, channel, message), member)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("peer state %s", kv(member=member.id, state=pc.connectionState))
            if pc.connectionState in ("failed", "closed"):
                self._spawn(self._drop_member(member, f"connection {pc.connectionState}"))

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as e:
            msg = str(e)
            if "codec" in msg.lower() or "send parameters" in msg.lower():
                raise ServerError(
                    400, f"the offer must support Opus audio and VP8 video ({msg})"
                ) from None
            raise
        for t in pc.getTransceivers():
            if t not in ours:
                t.direction = "inactive"  # an extra m-line: accept nothing on it
        await pc.setLocalDescription(await pc.createAnswer())
        if sub is not None:
            member.sub = sub
            room.add_rtp(sub)
        return pc.localDescription.sdp

    @staticmethod
    def _hook_pli(sender: RTCRtpSender, room: Room) -> None:
        """A viewer's PLI (picture loss) reaches aiortc's own encoder, which we bypass: forward
        it to the room's shared encoder (rate-limited there)."""
        original = getattr(sender, "_send_keyframe", None)
        if original is None:
            return

        def send_keyframe() -> None:
            room.request_keyframe()
            original()

        sender._send_keyframe = send_keyframe  # type: ignore[method-assign]

    async def _consume_audio(self, member: Member, room: Room, track: MediaStreamTrack) -> None:
        """A presenter's microphone -> the room's worker (decoded 48 kHz frames). A live
        source: the room drops its oldest audio rather than let latency grow after stalls."""
        refused = 0  # samples (at the track's rate) refused since the buffer filled
        try:
            while True:
                frame = await track.recv()
                if not isinstance(frame, av.AudioFrame):
                    continue
                if room.push_input(frame, member.id, live=True):
                    if refused:
                        log.warning(
                            "microphone input accepted again %s",
                            kv(member=member.id, room=room.name, dropped_samples=refused),
                        )
                        refused = 0
                else:
                    # Only when the worker stopped taking input (an engine stuck for seconds):
                    # the audio is lost, counted in livehead_input_dropped_samples_total.
                    if not refused:
                        log.warning(
                            "input buffer full, dropping microphone audio %s",
                            kv(
                                member=member.id,
                                room=room.name,
                                max_input_buffer_s=self.scfg.max_input_buffer_s,
                            ),
                        )
                    refused += frame.samples
        except MediaStreamError:
            pass

    async def _channel_message(
        self, member: Member, room: Room, channel: Any, message: Any
    ) -> None:
        try:
            if member.role != "presenter":
                raise ServerError(403, "viewers cannot send controls")
            if not isinstance(message, str) or len(message) > self.scfg.max_upload_bytes * 2:
                raise ServerError(400, "control messages are JSON text")
            try:
                msg = await self._parse_json(message)
            except ValueError:
                raise ServerError(400, "control message is not JSON") from None
            reply = await self._handle_control(room, msg)
        except (ServerError, UserError) as e:
            reply = {"type": "error", "message": getattr(e, "message", str(e))}
        if channel.readyState == "open":
            channel.send(json.dumps(reply))

    # ---------------------------------------------------------------------------------------
    # Controls and avatars
    # ---------------------------------------------------------------------------------------
    async def _handle_control(
        self, room: Room, msg: Any, rate: int = SAMPLE_RATE
    ) -> dict[str, Any]:
        """One control message -> its reply. ``rate``: the unit of played_samples."""
        if not isinstance(msg, dict):
            raise ServerError(400, "control message must be a JSON object with a 'type'")
        kind = msg.get("type")
        if kind == "controls":
            controls = parse_controls(msg)
            await room.set_controls(controls)
            return {
                "type": "controls",
                "pose_deg": controls.pose_deg and list(controls.pose_deg),
                "location": controls.location,
                "scale": controls.scale,
            }
        if kind == "interrupt":
            played = await room.interrupt()
            return {
                "type": "interrupted",
                "played_samples": played * rate // SAMPLE_RATE,
                "played_ms": played * 1000 // SAMPLE_RATE,
            }
        if kind == "avatar":
            if isinstance(msg.get("id"), str):
                avatar = self.avatars.get(msg["id"])
                if avatar is None:
                    raise ServerError(404, f"no uploaded avatar with id {msg['id']!r}")
            elif isinstance(msg.get("image"), str):
                avatar = await self._decode(msg["image"])  # base64: decoded off the loop too
            else:
                raise ServerError(400, "avatar message needs 'id' (from POST /avatar) or 'image'")
            await room.set_avatar(avatar.rgb)
            return {"type": "avatar", "id": avatar.id}
        raise ServerError(
            400, f"unknown control type {kind!r}: expected 'controls', 'interrupt' or 'avatar'"
        )

    async def _decode(self, raw: bytes | str) -> Any:
        """An uploaded image (bytes, or base64 / a data: URL as text), decoded on a worker
        thread: a 10 MB image must not hold up the event loop (and the pacer on it)."""
        limits = self.scfg.max_upload_bytes, self.scfg.max_image_pixels

        def decode() -> Any:
            return decode_avatar(raw if isinstance(raw, bytes) else _unbase64(raw), *limits)

        try:
            avatar = await asyncio.to_thread(decode)
        except ImageRejected as e:
            raise ServerError(e.status, str(e)) from None
        self.avatars.put(avatar)
        return avatar

    async def _control(self, request: web.Request) -> web.Response:
        self._check_token(request)
        # Not a "simple" CORS type: a page elsewhere cannot send it without asking first.
        if request.content_type != "application/json":
            raise ServerError(415, "/control needs Content-Type: application/json")
        body = await self._read_body(
            request, self.scfg.max_upload_bytes * 2, "control message", "server.max_upload_bytes"
        )
        try:
            msg = await self._parse_json(body)
        except (ValueError, UnicodeDecodeError):
            raise ServerError(400, "control message must be JSON") from None
        name = self._room_name(
            request.query.get("room") or (msg.get("room") if isinstance(msg, dict) else None)
        )
        room = self.rooms.get(name)
        if room is None:
            raise ServerError(404, f"room '{name}' does not exist")
        try:
            return web.json_response(await self._handle_control(room, msg))
        except UserError as e:
            raise ServerError(409, str(e)) from None

    async def _avatar(self, request: web.Request) -> web.Response:
        """Upload a portrait: raw image body or multipart (first file field). ``?room=NAME``
        applies it to that live room; without it, it becomes the avatar of rooms opened later.
        Either way the id works with {"type": "avatar", "id": ...}."""
        self._check_token(request)
        limit = self.scfg.max_upload_bytes
        # aiohttp reports a missing Content-Type as application/octet-stream: look at the header.
        ctype = request.content_type if "Content-Type" in request.headers else ""
        if not (
            ctype.startswith("image/")
            or ctype == "multipart/form-data"
            or ctype == "application/octet-stream"
        ):
            raise ServerError(
                415,
                "/avatar needs Content-Type: image/* (the raw image) or multipart/form-data, "
                f"got {ctype or 'none'!r}",
            )
        if ctype == "multipart/form-data":
            reader = await request.multipart()
            raw = None
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue  # a nested multipart: not an image
                if part.filename is None and part.name not in ("image", "avatar", "file"):
                    continue
                data = bytearray()
                while chunk := await part.read_chunk(65536):
                    data += chunk
                    if len(data) > limit:
                        raise ServerError(
                            413,
                            f"avatar upload is larger than {limit} bytes (server.max_upload_bytes)",
                        )
                raw = bytes(data)
                break
            if raw is None:
                raise ServerError(400, "multipart upload has no file field")
        else:
            raw = await self._read_body(request, limit, "avatar upload", "server.max_upload_bytes")
        avatar = await self._decode(raw)
        applied = None
        if request.query.get("room"):
            name = self._room_name(request.query["room"])
            room = self.rooms.get(name)
            if room is None:
                raise ServerError(404, f"room '{name}' does not exist")
            await room.set_avatar(avatar.rgb)
            applied = name
        else:
            self.default_avatar = avatar.rgb  # rooms opened from now on start with it
        h, w = avatar.rgb.shape[:2]
        return web.json_response(
            {"id": avatar.id, "width": w, "height": h, "room": applied, "default": not applied}
        )

    # ---------------------------------------------------------------------------------------
    # WebSocket API (PROTOCOL.md)
    # ---------------------------------------------------------------------------------------
    async def _ws(self, request: web.Request) -> web.StreamResponse:
        header_ok = True
        if self.token is not None:
            try:
                self._check_token(request)
            except ServerError:
                header_ok = False  # browsers cannot set headers: the start message may carry it
        ws = web.WebSocketResponse(max_msg_size=self.scfg.max_ws_message_bytes, heartbeat=10.0)
        await ws.prepare(request)
        member: Member | None = None
        try:
            start = await self._ws_start(ws, header_ok)
            if start is None:
                return ws
            rate, fmt, channels, room_name = start
            try:
                room, member = await self._join("presenter", room_name, "ws")
            except ServerError as e:
                await ws.send_json({"type": "error", "status": e.status, "message": e.message})
                await ws.close(code=1013 if e.status == 503 else 1008)
                return ws
            member.ws = ws
            await self._ws_session(ws, room, member, rate, fmt, channels)
        finally:
            if member is not None:
                await self._drop_member(member, "websocket closed")
        return ws

    async def _ws_start(
        self, ws: web.WebSocketResponse, header_ok: bool
    ) -> tuple[int, str, int, str] | None:
        async def fail(message: str) -> None:
            await ws.send_json({"type": "error", "message": message})
            await ws.close(code=1008)

        try:
            msg = await ws.receive(timeout=WS_START_TIMEOUT_S)
        except TimeoutError:
            await fail("expected a start message within 10 s")
            return None
        if msg.type != WSMsgType.TEXT:
            if msg.type not in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                await fail('the first message must be JSON text {"type": "start", ...}')
            return None
        try:
            start = json.loads(msg.data)
        except ValueError:
            start = None
        if not isinstance(start, dict) or start.get("type") != "start":
            await fail('the first message must be {"type": "start", "sample_rate": ...}')
            return None
        if not header_ok:
            given = start.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(
                given.encode(), (self.token or "").encode()
            ):
                await fail("missing or wrong token (Authorization header or 'token' in start)")
                return None
        rate = start.get("sample_rate", SAMPLE_RATE)
        fmt = start.get("format", "s16le")
        channels = start.get("channels", 1)
        if not isinstance(rate, int) or not 8000 <= rate <= 48000:
            await fail(f"sample_rate must be an integer in [8000, 48000], got {rate!r}")
            return None
        if fmt not in ("s16le", "f32le"):
            await fail(f"format must be 's16le' or 'f32le', got {fmt!r}")
            return None
        if channels not in (1, 2):
            await fail(f"channels must be 1 or 2, got {channels!r}")
            return None
        try:
            room = self._room_name(start.get("room"))
        except ServerError as e:
            await fail(e.message)
            return None
        return rate, fmt, channels, room

    async def _ws_session(
        self,
        ws: web.WebSocketResponse,
        room: Room,
        member: Member,
        rate: int,
        fmt: str,
        channels: int,
    ) -> None:
        sub = WsSubscriber(self.settings.ws_queue_frames)
        room.add_ws(sub)
        width, height = room.size if room.size != (0, 0) else (0, 0)
        await ws.send_json(
            {
                "type": "started",
                "protocol": 1,
                "room": room.name,
                "sample_rate": SAMPLE_RATE,
                "samples_per_frame": 640,
                "fps": 25,
                "width": width,
                "height": height,
                "delay_ms": room.delay_samples * 1000 / SAMPLE_RATE,
            }
        )
        counts = {"received": 0, "dropped": 0}

        def client_units(samples16: int) -> int:
            return samples16 * rate // SAMPLE_RATE

        async def writer() -> None:
            while (sent := await sub.queue.get()) is not None:
                f = sent.frame
                await ws.send_bytes(
                    pack_frame(
                        sent.out_pts,
                        client_units(sent.played_samples),
                        SAMPLE_RATE,
                        f.pcm,
                        f.width,
                        f.height,
                        f.jpeg,
                        f.speech,
                    )
                )

        async def flush() -> None:
            played = await room.request_flush()
            await ws.send_json({"type": "flushed", "played_samples": client_units(played)})

        writer_task = self._spawn(writer(), member)
        sample_bytes = 2 if fmt == "s16le" else 4
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    data = msg.data
                    if len(data) % (sample_bytes * channels):
                        await ws.send_json(
                            {
                                "type": "error",
                                "message": f"PCM chunk of {len(data)} bytes is not a whole number"
                                f" of {channels}-channel {fmt} samples",
                            }
                        )
                        continue
                    arr = np.frombuffer(data, np.int16 if fmt == "s16le" else "<f4")
                    if fmt == "f32le" and not np.all(np.isfinite(arr)):
                        await ws.send_json(
                            {"type": "error", "message": "f32le audio contains NaN or inf"}
                        )
                        continue
                    if not len(arr):
                        continue
                    frame = av.AudioFrame.from_ndarray(
                        arr.reshape(1, -1),
                        format="s16" if fmt == "s16le" else "flt",
                        layout="mono" if channels == 1 else "stereo",
                    )
                    frame.sample_rate = rate
                    if room.push_input(frame, member.id):
                        counts["received"] += len(arr) // channels
                    else:
                        await ws.send_json(
                            {
                                "type": "error",
                                "message": "input buffer full (server.max_input_buffer_s): push "
                                "at about real-time pace; this chunk was dropped",
                            }
                        )
                elif msg.type == WSMsgType.TEXT:
                    await self._ws_text(ws, room, msg.data, counts, client_units, flush, member)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            room.remove_ws(sub)
            writer_task.cancel()

    async def _ws_text(
        self,
        ws: web.WebSocketResponse,
        room: Room,
        text: str,
        counts: dict[str, int],
        client_units: Callable[[int], int],
        flush: Callable[[], Awaitable[None]],
        member: Member,
    ) -> None:
        try:
            msg = await self._parse_json(text)
        except ValueError:
            await ws.send_json({"type": "error", "message": "text messages must be JSON"})
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        try:
            if kind in ("clear", "interrupt"):
                played = client_units(await room.interrupt())
                dropped = max(0, counts["received"] - played - counts["dropped"])
                counts["dropped"] += dropped
                await ws.send_json(
                    {
                        "type": "cleared" if kind == "clear" else "interrupted",
                        "played_samples": played,
                        "dropped_samples": dropped,
                    }
                )
            elif kind == "end":
                self._spawn(flush(), member)
            elif kind in ("controls", "avatar"):
                await ws.send_json(await self._handle_control(room, msg))
            else:
                await ws.send_json(
                    {
                        "type": "error",
                        "message": f"unknown message type {kind!r}: expected clear, end, "
                        "controls or avatar",
                    }
                )
        except (ServerError, UserError) as e:
            await ws.send_json({"type": "error", "message": getattr(e, "message", str(e))})

    # ---------------------------------------------------------------------------------------
    # Metrics and health
    # ---------------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "sessions": len(self.rooms),
                "capacity": self.capacity,
                "peers": sum(1 for m in self.members.values() if m.pc is not None),
                "websockets": sum(1 for m in self.members.values() if m.ws is not None),
                "uptime_s": round(time.monotonic() - self.started, 1),
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics_text().encode(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    def metrics_text(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(
                    f"{name}{labels} {value:.6g}"
                    if isinstance(value, float)
                    else f"{name}{labels} {value}"
                )

        def room_label(room: str, **extra: str) -> str:
            parts = [f'room="{room}"'] + [f'{k}="{v}"' for k, v in extra.items()]
            return "{" + ",".join(parts) + "}"

        metric(
            "livehead_sessions", "gauge", "Live engine sessions (rooms).", [("", len(self.rooms))]
        )
        metric(
            "livehead_session_capacity",
            "gauge",
            "Most sessions at once (admission).",
            [("", self.capacity)],
        )
        metric(
            "livehead_sessions_refused_total",
            "counter",
            "Requests refused by admission control (503).",
            [("", self.refused)],
        )
        peers: dict[tuple[str, str], int] = {}
        for m in self.members.values():
            peers[(m.role, m.kind)] = peers.get((m.role, m.kind), 0) + 1
        metric(
            "livehead_members",
            "gauge",
            "Connected presenters and viewers.",
            [(f'{{role="{r}",transport="{k}"}}', n) for (r, k), n in sorted(peers.items())],
        )
        rooms = sorted(self.rooms.items())
        per_room: list[tuple[str, str, str, Callable[[Room], float]]] = [
            (
                "livehead_fps",
                "gauge",
                "Frames sent per second (last ~2 s).",
                lambda r: r.stats.fps(),
            ),
            (
                "livehead_frames_sent_total",
                "counter",
                "Frames released to subscribers.",
                lambda r: r.stats.frames_sent,
            ),
            (
                "livehead_video_dropped_total",
                "counter",
                "Video frames dropped before encoding because they were late (audio kept).",
                lambda r: r.stats.video_dropped,
            ),
            (
                "livehead_engine_dropped_total",
                "counter",
                "Frames the engine did not render in time (it repeated the previous image).",
                lambda r: r.stats.engine_dropped,
            ),
            (
                "livehead_engine_fast_total",
                "counter",
                "Frames the engine drew by its cheaper draft exit (stage1.fast_head) to keep up.",
                lambda r: r.stats.engine_fast,
            ),
            (
                "livehead_frames_flushed_total",
                "counter",
                "Frames discarded by interrupts.",
                lambda r: r.stats.frames_flushed,
            ),
            (
                "livehead_stalls_total",
                "counter",
                "Times output waited for a late frame.",
                lambda r: r.stats.stalls,
            ),
            (
                "livehead_stall_seconds_total",
                "counter",
                "Time output waited for late frames.",
                lambda r: r.stats.stall_seconds,
            ),
            (
                "livehead_queue_frames",
                "gauge",
                "Encoded frames waiting for their slot.",
                lambda r: r.queue_depth,
            ),
            (
                "livehead_input_queued_seconds",
                "gauge",
                "Presenter audio queued before the engine.",
                lambda r: r.input_queued_ms / 1000,
            ),
            (
                "livehead_input_dropped_samples_total",
                "counter",
                "Presenter samples refused because the input buffer was full.",
                lambda r: r.stats.input_dropped_samples,
            ),
            (
                "livehead_input_skipped_samples_total",
                "counter",
                "Live presenter samples (16 kHz) dropped to catch up after output stalls.",
                lambda r: r.stats.input_skipped_samples,
            ),
            (
                "livehead_catchups_total",
                "counter",
                "Times live presenter input was dropped to keep latency bounded.",
                lambda r: r.stats.catchups,
            ),
            (
                "livehead_delay_seconds",
                "gauge",
                "Nominal delay: engine latency + playout buffer.",
                lambda r: r.delay_samples / SAMPLE_RATE,
            ),
            (
                "livehead_first_frame_seconds",
                "gauge",
                "Session start to first frame sent.",
                lambda r: r.stats.first_frame_s or 0.0,
            ),
            (
                "livehead_rtp_subscribers",
                "gauge",
                "WebRTC peers receiving the room.",
                lambda r: r.subscribers[0],
            ),
            (
                "livehead_ws_subscribers",
                "gauge",
                "WebSocket clients receiving the room.",
                lambda r: r.subscribers[1],
            ),
        ]
        for name, kind, help_, get in per_room:
            metric(name, kind, help_, [(room_label(n), get(r)) for n, r in rooms])
        for name, help_, attr, scale in (
            (
                "livehead_latency_seconds",
                "Input arrival at the server to frame sent, last 500 frames.",
                "latency_s",
                1.0,
            ),
            (
                "livehead_compute_seconds",
                "Engine wall time (push + pull) per frame on the worker, last 500 frames.",
                "compute_ms",
                1e-3,
            ),
        ):
            samples: list[tuple[str, float]] = []
            for n, r in rooms:
                values = np.array(getattr(r.stats, attr), dtype=np.float64) * scale
                for q in (0.5, 0.95, 0.99):
                    v = float(np.quantile(values, q)) if len(values) else float("nan")
                    samples.append((room_label(n, quantile=str(q)), v))
            metric(name, "summary", help_, samples)
            for n, r in rooms:
                values = np.array(getattr(r.stats, attr), dtype=np.float64) * scale
                lines.append(f"{name}_sum{room_label(n)} {float(values.sum()):.6g}")
                lines.append(f"{name}_count{room_label(n)} {len(values)}")
        # The engine's own per-stage timings (OutputFrame.meta["<stage>_ms"]).
        stage_samples: list[tuple[str, float]] = []
        for n, r in rooms:
            for stage, ms in sorted(r.stats.stages_ms.items()):
                values = np.array(ms, dtype=np.float64) / 1000
                for q in (0.5, 0.95, 0.99):
                    stage_samples.append(
                        (room_label(n, stage=stage, quantile=str(q)), float(np.quantile(values, q)))
                    )
        metric(
            "livehead_stage_seconds",
            "summary",
            "Engine-reported time per frame and stage (OutputFrame.meta), last 500 frames.",
            stage_samples,
        )
        return "\n".join(lines) + "\n"
