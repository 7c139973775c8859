"""The WebSocket frame message as a client reads it (server/PROTOCOL.md, version 1).

Clients speak only the wire protocol, so this is written from the spec, not imported from the
server; ``tests/test_clients_wire.py`` checks that both sides agree."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"LHAV"
VERSION = 1
HEADER = struct.Struct("<4sBBHqqIHHHHI")  # 40 bytes, little-endian
FLAG_SPEECH = 0x01
FLAG_VIDEO = 0x02


class WireError(ValueError):
    """A binary message that is not a version-1 livehead frame."""


@dataclass
class Frame:
    """One received frame: 40 ms of audio and (unless the server dropped it) a JPEG image."""

    pts_samples: int  # output timeline, 16 kHz samples, contiguous (frame n: n * 640)
    played_samples: int  # this client's input samples played through the end of this frame
    sample_rate: int  # rate of ``pcm`` (16000)
    pcm: np.ndarray  # (n,) int16 mono
    width: int
    height: int
    jpeg: bytes | None
    speech: bool


def parse_frame(data: bytes) -> Frame:
    """Parse one binary message (raises WireError)."""
    if len(data) < HEADER.size:
        raise WireError(f"message of {len(data)} bytes is shorter than the 40-byte header")
    (
        magic,
        version,
        flags,
        header_len,
        pts,
        played,
        rate,
        n_samples,
        width,
        height,
        _reserved,
        jpeg_len,
    ) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if version != VERSION:
        raise WireError(f"unsupported frame version {version} (this client reads {VERSION})")
    if header_len < HEADER.size:
        raise WireError(f"header_len {header_len} < {HEADER.size}")
    pcm_end = header_len + 2 * n_samples
    if len(data) != pcm_end + jpeg_len:
        raise WireError(f"message is {len(data)} bytes; the header says {pcm_end + jpeg_len}")
    pcm = np.frombuffer(data, "<i2", count=n_samples, offset=header_len).astype(np.int16)
    jpeg = bytes(data[pcm_end:]) if flags & FLAG_VIDEO and jpeg_len else None
    return Frame(pts, played, rate, pcm, width, height, jpeg, bool(flags & FLAG_SPEECH))
