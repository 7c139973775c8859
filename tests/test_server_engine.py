"""The server with the real streaming engine (not the stand-in): small random networks at 64²
over WebSocket and WebRTC, and `livehead serve` itself with the bundled weights."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from clients.bench import bench
from clients.ws import push_file
from engine.stream import Engine
from engine.weights import DEFAULT_STAGE1, DEFAULT_STAGE2
from tests.small import small_models
from tests.test_server_support import bursts, running_server, write_wav

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine_factory():
    torch.set_num_threads(1)
    engine = Engine.from_models(*small_models())

    def factory(avatar_rgb: np.ndarray):
        return engine.session(engine.prepare_avatar(avatar_rgb))

    return factory


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pcm = bursts(3.0, 22050, period_s=0.46)
    return write_wav(tmp_path_factory.mktemp("audio") / "bursts.wav", pcm, 22050)


def test_websocket_with_the_real_engine(engine_factory, speech: Path) -> None:
    async def scenario() -> dict:
        async with running_server(factory=engine_factory) as (server, base):
            r = await bench(base.replace("http", "ws") + "/ws", speech)
            await asyncio.sleep(0.1)
            return dict(r, rooms_after=len(server.rooms))

    r = asyncio.run(scenario())
    # The stream is 25 fps by its own clock and never runs ahead of real time; whether this
    # machine keeps up (arrival fps, drops) is the bench's to measure: a loaded CI machine
    # received 22.9 frames/s here.
    assert r["transport"] == "websocket" and r["media_fps"] == 25.0 and r["fps"] < 27, r
    assert r["dropped_frames"] < r["frames"] // 4, r
    # Audio is never lost; video may drop a frame on a busy machine.
    assert r["played_samples"] == r["sent_samples"]
    assert 0 < r["latency_ms"]["p50"] < 1000 and r["latency_ms"]["n"] > 40
    assert r["rooms_after"] == 0  # the session closed with its client


def test_webrtc_with_the_real_engine(engine_factory, speech: Path) -> None:
    async def scenario() -> dict:
        async with running_server(factory=engine_factory) as (_, base):
            return await bench(base, speech, ice_addresses=["127.0.0.1"])

    r = asyncio.run(scenario())
    assert r["transport"] == "webrtc" and r["media_fps"] == 25.0 and r["fps"] < 27, r
    assert r["dropped_frames"] < r["frames"] // 4, r
    # The avatar's audio is the input delayed: the client finds the alignment confidently.
    assert r["alignment"]["confidence"] > 0.5, r["alignment"]
    assert abs(r["av_offset_ms"]["p50"]) < 80


@pytest.mark.skipif(
    not (DEFAULT_STAGE1.exists() and DEFAULT_STAGE2.exists()), reason="no bundled weights"
)
def test_serve_command_streams_the_bundled_model(speech: Path, tmp_path: Path) -> None:
    """What `make serve` runs: the bundled weights and avatar with the tiny config's ONNX Runtime
    backend (exported on first use into a private cache here), a client pushing speech over the
    WebSocket API and recording what comes back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [sys.executable, "-m", "livehead", "serve", "--port", str(port)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS="2", LIVEHEAD_CACHE=str(tmp_path / "cache")),
    )
    out = tmp_path / "reply.mp4"
    try:
        deadline = time.monotonic() + 300  # the export comes first (~1 min here)
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        summary = asyncio.run(push_file(f"ws://127.0.0.1:{port}/ws", speech, out))
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    served = (tmp_path / "serve.log").read_text()
    assert server.returncode == 0, served
    assert "exporting" in served and list((tmp_path / "cache" / "onnx").glob("*/manifest.json"))
    # 3 s of speech: every frame comes back (audio is never dropped); how many carry a fresh
    # picture depends on this machine's speed (a busy one drops video, by design), so only a
    # few are required here; speed is `livehead bench`'s job.
    assert summary["frames"] >= 75 and summary["video_frames"] >= 10, summary
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.width, v.codec_context.height) == (256, 256)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    # A face, not a blank: the bundled avatar's frames vary in space and differ over time.
    stack = np.stack(frames).astype(np.float32)
    assert stack.std() > 20 and np.abs(np.diff(stack, axis=0)).mean() > 0.05
