"""Helpers shared by the server and client tests (no tests here).

Servers run in the test's own event loop on an ephemeral port; WebRTC peers on both sides offer
only 127.0.0.1 (aioice skips loopback by default, ENVIRONMENT.md)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web

from engine.config import load_config
from server.app import LiveheadServer
from server.cli import standin_factory
from server.standin import placeholder_face

TEST_SIZE = 128  # stand-in frame size: small keeps VP8/JPEG cheap on two shared cores


@contextlib.asynccontextmanager
async def running_server(
    overrides: list[str] | None = None,
    capacity: int | None = None,
    token: str | None = None,
    factory=None,  # noqa: ANN001
) -> AsyncIterator[tuple[LiveheadServer, str]]:
    """A LiveheadServer on 127.0.0.1:<free port>; yields (server, "http://127.0.0.1:PORT")."""
    cfg = load_config(
        "tiny",
        [
            'server.ice_addresses=["127.0.0.1"]',
            f"server.standin_size={TEST_SIZE}",
            *(overrides or []),
        ],
    )
    server = LiveheadServer(
        cfg,
        factory or standin_factory(cfg.server.standin_size),
        placeholder_face(256),
        token=token,
        capacity=capacity,
    )
    runner = web.AppRunner(server.make_app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def bursts(seconds: float, rate: int, period_s: float = 0.4, amp: float = 0.5) -> np.ndarray:
    """(N,) int16: tone bursts (on half of each period, pitch varying) and silence between,
    so loudness (and the stand-in's mouth) changes every few frames."""
    t = np.arange(int(seconds * rate)) / rate
    on = (t % period_s) < period_s / 2
    f = 180 + 60 * np.sin(2 * np.pi * 0.7 * t)
    x = amp * np.sin(2 * np.pi * np.cumsum(f) / rate) * on
    return (x * 32767).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, np.int16).tobytes())
    return path


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 150, 120)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def mouth_openness(rgb: np.ndarray) -> float:
    """Fraction of the stand-in's mouth box that is mouth-dark (it grows with loudness)."""
    h, w = rgb.shape[:2]
    box = rgb[int(0.62 * h) : int(0.82 * h), int(0.38 * w) : int(0.62 * w)].astype(np.int32)
    dark = (box[..., 0] < 110) & (box[..., 1] < 60) & (box[..., 2] < 70)
    return float(dark.mean())


async def http(method: str, url: str, **kwargs) -> tuple[int, dict | str, dict]:  # noqa: ANN003
    """One request -> (status, JSON or text body, headers)."""
    async with aiohttp.ClientSession() as s, s.request(method, url, **kwargs) as r:
        text = await r.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return r.status, body, dict(r.headers)


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> None:  # noqa: ANN001
    """Poll ``predicate()`` until true (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
