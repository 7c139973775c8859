"""Clients read what the server writes, and depend on nothing but the wire protocol."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clients.wire import HEADER, WireError, parse_frame
from server import wire as server_wire

REPO = Path(__file__).resolve().parent.parent


def test_frame_round_trip() -> None:
    pcm = (np.arange(640) - 320).astype(np.int16)
    msg = server_wire.pack_frame(
        1280, 777, 16000, pcm.astype("<i2").tobytes(), 256, 128, b"\xff\xd8jpeg", speech=True
    )
    f = parse_frame(msg)
    assert (f.pts_samples, f.played_samples, f.sample_rate, f.width, f.height) == (
        1280,
        777,
        16000,
        256,
        128,
    )
    assert f.speech and f.jpeg == b"\xff\xd8jpeg"
    np.testing.assert_array_equal(f.pcm, pcm)
    assert HEADER.size == server_wire.HEADER.size == 40
    # No JPEG: the frame's video was dropped; audio still present.
    f = parse_frame(server_wire.pack_frame(0, 0, 16000, bytes(1280), 64, 64, None, False))
    assert f.jpeg is None and not f.speech and len(f.pcm) == 640


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda m: m[:30], "shorter"),
        (lambda m: b"XXXX" + m[4:], "magic"),
        (lambda m: m[:4] + b"\x02" + m[5:], "version"),
        (lambda m: m + b"extra", "header says"),
    ],
)
def test_bad_frames_are_rejected(mutate, words: str) -> None:  # noqa: ANN001
    msg = server_wire.pack_frame(0, 0, 16000, bytes(1280), 64, 64, b"jpg", False)
    with pytest.raises(WireError, match=words):
        parse_frame(mutate(msg))


def test_clients_import_no_engine_server_or_training() -> None:
    code = (
        "import sys, clients.cli, clients.ws, clients.bench, clients.rtc, clients.media, "
        "clients.wire\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('engine', 'server', 'training', 'export'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_web_client_is_plain_files() -> None:
    web = REPO / "clients" / "web"
    assert {p.name for p in web.iterdir()} >= {"index.html", "app.js", "style.css"}
    js = (web / "app.js").read_text()
    assert "import " not in js.split("\n", 5)[-1][:200]  # no modules / bundler needed
    assert "iceGatheringState" in js and "getStats" in js and "createDataChannel" in js
