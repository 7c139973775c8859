"""Fixtures for the browser test: a private network namespace (Chromium gathers no ICE
candidates on loopback alone, and traffic to the host's own address is not allowed here; see
ENVIRONMENT.md), created and deleted by the fixture. Needs root (and Debian's chromium or
firefox-esr)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

CHROMIUM = os.environ.get("LIVEHEAD_CHROMIUM", "/usr/bin/chromium")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh namespace with loopback up, a veth pair (10.213.0.1 <-> 10.213.0.2) and a default
    route over it."""
    if os.geteuid() != 0:
        pytest.skip("the browser test needs root (network namespace)")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    name = f"lhtest{os.getpid()}"
    created = _ip("netns", "add", name)
    if created.returncode:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    try:
        for args in (
            ("link", "set", "lo", "up"),
            ("link", "add", "v0", "type", "veth", "peer", "name", "v1"),
            ("addr", "add", "10.213.0.1/24", "dev", "v0"),
            ("addr", "add", "10.213.0.2/24", "dev", "v1"),
            ("link", "set", "v0", "up"),
            ("link", "set", "v1", "up"),
            # Firefox gathers no ICE candidates at all without a default route.
            ("route", "add", "default", "via", "10.213.0.2", "dev", "v0"),
        ):
            r = _ip("-n", name, *args)
            assert r.returncode == 0, f"ip -n {name} {' '.join(args)}: {r.stderr}"
        yield name
    finally:
        _ip("netns", "del", name)
