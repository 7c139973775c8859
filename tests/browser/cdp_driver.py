"""Drive headless Chromium over the DevTools protocol (Python websockets, no Node).

Run inside the test's network namespace (the DevTools port lives on its loopback):

    ip netns exec NS python tests/browser/cdp_driver.py URL WAV SHOT.png PROFILE_DIR

Opens URL (the livehead page, autostarting), waits until the page's own getStats report shows
decoded frames, screenshots the video element, prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import urllib.request

import websockets
from driver_common import run_browser  # a sibling: the drivers run as scripts

CHROMIUM = "/usr/bin/chromium"
DEVTOOLS_PORT = 9333
WANT_DECODED = 75  # three seconds of video


async def drive(url: str, shot: str) -> dict:
    targets: list[dict] = []
    for _ in range(150):
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{DEVTOOLS_PORT}/json/list", timeout=1
            ) as r:
                targets = json.load(r)
            if any(t["type"] == "page" for t in targets):
                break
        except OSError:
            pass
        await asyncio.sleep(0.1)
    page = next(t for t in targets if t["type"] == "page")
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2**26) as ws:
        ids = iter(range(1, 10**6))

        async def call(method: str, **params: object) -> dict:
            mid = next(ids)
            await ws.send(json.dumps({"id": mid, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == mid:
                    return msg.get("result", {})

        async def evaluate(expr: str) -> object:
            r = await call("Runtime.evaluate", expression=expr, returnByValue=True)
            return r.get("result", {}).get("value")

        t0 = time.monotonic()
        state = None
        while time.monotonic() - t0 < 40:
            state = await evaluate("JSON.stringify(window.livehead || null)")
            state = json.loads(state) if state else None
            if (
                state
                and (state.get("stats", {}).get("framesDecoded") or 0) >= WANT_DECODED
                and state.get("stats", {}).get("fps") is not None
            ):
                break
            if state and state.get("errors"):
                break
            await asyncio.sleep(0.25)
        rect = await evaluate(
            "JSON.stringify(document.getElementById('video').getBoundingClientRect())"
        )
        rect = json.loads(rect)
        video_size = await evaluate(
            "[document.getElementById('video').videoWidth,"
            "document.getElementById('video').videoHeight]"
        )
        clip = {
            "x": rect["x"],
            "y": rect["y"],
            "width": rect["width"],
            "height": rect["height"],
            "scale": 1,
        }
        png = await call("Page.captureScreenshot", format="png", clip=clip)
        with open(shot, "wb") as f:
            f.write(base64.b64decode(png["data"]))
        return {"state": state, "video_size": video_size, "seconds": time.monotonic() - t0}


def main() -> None:
    url, wav, shot, profile = sys.argv[1:5]
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1000,800",
        f"--remote-debugging-port={DEVTOOLS_PORT}",
        url,
    ]
    run_browser(cmd, url, lambda: drive(url, shot), 90)


if __name__ == "__main__":
    main()
