"""What both browser drivers do around their protocol: start the browser, drive the page,
fetch the server's /metrics, print one ``RESULT {json}`` line, stop the browser."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from collections.abc import Awaitable, Callable


def run_browser(
    cmd: list[str],
    url: str,
    drive: Callable[[], Awaitable[dict]],
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        result = asyncio.run(asyncio.wait_for(drive(), timeout_s))
        server = url.split("/?")[0]
        with urllib.request.urlopen(server + "/metrics", timeout=5) as r:
            result["metrics"] = r.read().decode()
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
