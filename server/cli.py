"""``livehead serve``: the streaming server.

livehead serve --config tiny --standin                 # stand-in session, 127.0.0.1:8080
livehead serve --host 0.0.0.0 --token "$T" --avatar me.jpg
livehead serve --set server.max_sessions=2 --set server.playout_frames=2
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from engine.config import add_config_args

DEFAULT_AVATAR = Path("weights/avatar.png")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the avatar over WebRTC (browser, WHIP/WHEP) and a WebSocket API",
        description="Stream a talking head: browsers send their microphone and get the avatar "
        "back; voice agents push PCM over /ws. See server/PROTOCOL.md.",
    )
    add_config_args(p, example="server.max_sessions=2")
    p.add_argument(
        "--avatar",
        help="portrait image (default: weights/avatar.png if it exists, "
        "else a drawn placeholder face)",
    )
    p.add_argument("--host", help="address to bind (default: server.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: server.port, 8080)")
    p.add_argument(
        "--token",
        help="bearer token for publishing, controls and uploads "
        "(default: $LIVEHEAD_TOKEN); required when binding beyond loopback",
    )
    p.add_argument(
        "--standin",
        action="store_true",
        help="serve the stand-in session (no model: the avatar with an audio-driven "
        "mouth) instead of the engine with the bundled weights",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def standin_factory(size: int) -> Callable:
    """``make_session(avatar_rgb) -> Session`` for the stand-in."""
    from server.standin import StandInSession

    def make_session(avatar_rgb):  # noqa: ANN001, ANN202 - the SessionFactory signature
        return StandInSession(avatar_rgb, size=size)

    return make_session


def session_factory(cfg, standin: bool) -> Callable:  # noqa: ANN001
    """The one place the engine plugs in: ``make_session(avatar_rgb) -> Session``.

    ``engine.stream.make_session_factory`` (weights loaded once and shared, one Session per
    room; with backend "onnx" exported on first use), or the stand-in with ``--standin``."""
    if standin:
        return standin_factory(cfg.server.standin_size)
    from engine.errors import UserError
    from engine.stream import make_session_factory

    try:
        engine = None
        if cfg.stream.backend == "onnx":
            from export.onnx import onnx_engine

            engine = onnx_engine(cfg, lambda m: print(f"livehead: {m}", flush=True))
        return make_session_factory(cfg, engine)
    except UserError as e:
        raise UserError(f"{e}; or serve the stand-in: livehead serve --standin") from None


def run(args: argparse.Namespace) -> int:
    import logging

    from aiohttp import web

    from engine.config import load_config
    from engine.errors import UserError
    from server.app import LiveheadServer, check_bind
    from server.images import load_avatar_file
    from server.standin import placeholder_face

    cfg = load_config(args.config, args.override)
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    if not 0 <= port <= 65535:
        raise UserError(f"port must be in [0, 65535], got {port}")
    token = args.token or os.environ.get("LIVEHEAD_TOKEN") or None
    check_bind(host, token)
    if args.avatar:
        avatar = load_avatar_file(args.avatar)
    elif DEFAULT_AVATAR.is_file():
        avatar = load_avatar_file(DEFAULT_AVATAR)
    else:
        avatar = placeholder_face(512)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    server = LiveheadServer(cfg, session_factory(cfg, args.standin), avatar, token=token)
    print(
        f"livehead: serving on http://{host}:{port}/ (capacity {server.capacity}, "
        f"{'token required' if token else 'no token'})",
        flush=True,
    )
    try:
        web.run_app(
            server.make_app(),
            host=host,
            port=port,
            access_log=None,
            print=None,
            shutdown_timeout=5.0,
        )
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return 0
