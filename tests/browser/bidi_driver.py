"""Drive headless Firefox over WebDriver BiDi (Python websockets, no geckodriver).

Run inside the test's network namespace (the remote-agent port lives on its loopback):

    ip netns exec NS python tests/browser/bidi_driver.py URL SHOT.png PROFILE_DIR

Firefox's fake microphone (media.navigator.streams.fake) is a steady tone. Opens URL (the
livehead page, autostarting), waits until the page's own getStats report shows decoded frames,
screenshots the video element, prints one line ``RESULT {json}`` (the same shape as
cdp_driver.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import sys
import time
from pathlib import Path

import websockets
from driver_common import run_browser  # a sibling: the drivers run as scripts

FIREFOX = os.environ.get("LIVEHEAD_FIREFOX") or shutil.which("firefox-esr") or "firefox"
AGENT_PORT = 9334
WANT_DECODED = 75  # three seconds of video

PREFS = {
    "media.navigator.streams.fake": True,  # a fake microphone (a tone) instead of a device
    "media.navigator.permission.disabled": True,  # no permission prompt
    "media.autoplay.default": 0,  # allow audible autoplay
    "media.autoplay.blocking_policy": 0,
    "media.peerconnection.ice.obfuscate_host_addresses": False,  # no mDNS candidates
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
}


async def drive(url: str, shot: str) -> dict:
    ws_url = f"ws://127.0.0.1:{AGENT_PORT}/session"
    for _ in range(300):
        try:
            ws = await websockets.connect(ws_url, max_size=2**26)
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise RuntimeError(f"Firefox's remote agent did not open {ws_url}")
    async with ws:
        ids = iter(range(1, 10**6))

        async def call(method: str, **params: object) -> dict:
            mid = next(ids)
            await ws.send(json.dumps({"id": mid, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == mid:
                    if msg.get("type") == "error":
                        raise RuntimeError(f"{method}: {msg.get('error')}: {msg.get('message')}")
                    return msg.get("result", {})

        await call("session.new", capabilities={})
        tree = await call("browsingContext.getTree")
        context = tree["contexts"][0]["context"]
        await call("browsingContext.navigate", context=context, url=url, wait="complete")

        async def evaluate(expr: str) -> object:
            r = await call(
                "script.evaluate",
                expression=expr,
                target={"context": context},
                awaitPromise=False,
            )
            return r.get("result", {}).get("value")

        t0 = time.monotonic()
        state = None
        while time.monotonic() - t0 < 40:
            state = await evaluate("JSON.stringify(window.livehead || null)")
            state = json.loads(state) if isinstance(state, str) and state else None
            stats = (state or {}).get("stats") or {}
            if (stats.get("framesDecoded") or 0) >= WANT_DECODED and stats.get("fps") is not None:
                break
            if state and state.get("errors"):
                break
            await asyncio.sleep(0.25)
        rect = json.loads(
            str(
                await evaluate(
                    "JSON.stringify(document.getElementById('video').getBoundingClientRect())"
                )
            )
        )
        video_size = json.loads(
            str(
                await evaluate(
                    "JSON.stringify([document.getElementById('video').videoWidth,"
                    "document.getElementById('video').videoHeight])"
                )
            )
        )
        clip = {
            "type": "box",
            "x": rect["x"],
            "y": rect["y"],
            "width": rect["width"],
            "height": rect["height"],
        }
        png = await call("browsingContext.captureScreenshot", context=context, clip=clip)
        with open(shot, "wb") as f:
            f.write(base64.b64decode(png["data"]))
        version = await evaluate("navigator.userAgent")
        return {
            "state": state,
            "video_size": video_size,
            "seconds": time.monotonic() - t0,
            "browser": version,
        }


def main() -> None:
    url, shot, profile = sys.argv[1:4]
    prof = Path(profile)
    prof.mkdir(parents=True, exist_ok=True)
    (prof / "user.js").write_text(
        "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items())
    )
    env = dict(os.environ, HOME=str(prof), MOZ_HEADLESS="1")
    cmd = [
        FIREFOX,
        "--headless",
        "--no-remote",
        "--profile",
        str(prof),
        "--remote-debugging-port",
        str(AGENT_PORT),
        "--width=1000",
        "--height=800",
        "about:blank",
    ]
    run_browser(cmd, url, lambda: drive(url, shot), 120, env)


if __name__ == "__main__":
    main()
