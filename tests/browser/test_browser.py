"""Headless Chromium and Firefox <-> livehead serve, inside a private network namespace.

The page (clients/web) autostarts as presenter with the browser's fake microphone (Chromium: a
WAV of tone bursts; Firefox: its built-in tone); its own getStats overlay must show decoded
frames, and a screenshot of the video must show the (stand-in) face. Chromium is driven over
the DevTools protocol (cdp_driver.py), Firefox over WebDriver BiDi (bidi_driver.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.standin import placeholder_face
from tests.browser.conftest import CHROMIUM
from tests.test_server_support import bursts, write_wav

REPO = Path(__file__).resolve().parents[2]
PORT = 8089
SKIN = np.array([232, 190, 160])  # the placeholder face (server/standin.py)


def _in_ns(ns: str, *cmd: str, **kw) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)


def _firefox() -> str | None:
    return (
        os.environ.get("LIVEHEAD_FIREFOX") or shutil.which("firefox-esr") or shutil.which("firefox")
    )


@pytest.mark.browser
@pytest.mark.parametrize("browser", ["chromium", "firefox"])
def test_browser_presenter_sees_the_face(browser: str, netns: str, tmp_path: Path) -> None:
    if browser == "chromium" and not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    if browser == "firefox" and _firefox() is None:
        pytest.skip("no firefox (apt-get install -y firefox-esr)")
    wav = write_wav(tmp_path / "mic.wav", bursts(4.0, 48000), 48000)
    avatar = tmp_path / "face.png"  # a known face (weights/avatar.png may hold another)
    Image.fromarray(placeholder_face(256)).save(avatar)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = _in_ns(
        netns,
        sys.executable,
        "-m",
        "livehead",
        "serve",
        "--standin",
        "--port",
        str(PORT),
        "--avatar",
        str(avatar),
        "--set",
        "server.standin_size=256",
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Wait for the server (its port lives in the namespace: probe from inside it).
        for _ in range(100):
            probe = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    sys.executable,
                    "-c",
                    f"import urllib.request; urllib.request.urlopen("
                    f"'http://127.0.0.1:{PORT}/health', timeout=1)",
                ],
                capture_output=True,
                timeout=20,
            )
            if probe.returncode == 0:
                break
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        shot = tmp_path / "video.png"
        url = f"http://127.0.0.1:{PORT}/?mode=presenter&autostart=1"
        if browser == "chromium":
            args = ["cdp_driver.py", url, str(wav), str(shot), str(tmp_path / "profile")]
        else:
            args = ["bidi_driver.py", url, str(shot), str(tmp_path / "profile")]
        driver = _in_ns(
            netns,
            sys.executable,
            str(REPO / "tests/browser" / args[0]),
            *args[1:],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = driver.communicate(timeout=150)
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        assert line, f"driver failed: {err[-2000:]}"
        result = json.loads(line[len("RESULT ") :])
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()

    state = result["state"]
    assert state and not state["errors"], state
    assert state["state"] == "live"
    stats = state["stats"]
    assert stats["framesDecoded"] >= 75, stats
    assert stats["fps"] > 15, stats
    assert result["video_size"] == [256, 256]
    # The server saw the browser's microphone and streamed at full rate.
    metrics = result["metrics"]
    assert 'livehead_rtp_subscribers{room="default"} 1' in metrics
    # The screenshot shows the face: not blank, and skin-coloured pixels where the face is.
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.std() > 20
    skin = np.all(np.abs(img - SKIN) < 30, axis=-1)
    assert skin.mean() > 0.05, skin.mean()
    print(f"{browser} {result.get('browser', '')}: screenshot {shot}; page stats: {stats}")


def test_page_is_served_without_a_browser() -> None:
    """The part of the browser flow that needs no browser: page assets and their wiring."""
    html = (REPO / "clients/web/index.html").read_text()
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html
    for control in ("yaw", "pitch", "roll", "location", "scale", "mic", "mode", "avatar"):
        assert f'id="{control}"' in html
    assert urllib.request  # the driver fetches /metrics with it inside the namespace
