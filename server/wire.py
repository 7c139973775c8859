"""The WebSocket frame message (server -> client), version 1. PROTOCOL.md is the reference;
``clients/wire.py`` parses the same layout without importing this module."""

from __future__ import annotations

import struct

MAGIC = b"LHAV"
VERSION = 1
# magic, version, flags, header_len, pts_samples, played_samples, sample_rate, n_samples,
# width, height, reserved, jpeg_len; little-endian, 40 bytes.
HEADER = struct.Struct("<4sBBHqqIHHHHI")
FLAG_SPEECH = 0x01  # the frame carries presenter audio (not idle silence)
FLAG_VIDEO = 0x02  # a JPEG follows the PCM (else the client keeps showing the last image)


def pack_frame(
    pts_samples: int,
    played_samples: int,
    sample_rate: int,
    pcm_s16le: bytes,
    width: int,
    height: int,
    jpeg: bytes | None,
    speech: bool,
) -> bytes:
    """One binary message: header, then n_samples x int16 LE mono PCM, then the JPEG (if any)."""
    flags = (FLAG_SPEECH if speech else 0) | (FLAG_VIDEO if jpeg else 0)
    header = HEADER.pack(
        MAGIC,
        VERSION,
        flags,
        HEADER.size,
        pts_samples,
        played_samples,
        sample_rate,
        len(pcm_s16le) // 2,
        width,
        height,
        0,
        len(jpeg) if jpeg else 0,
    )
    return b"".join((header, pcm_s16le, jpeg or b""))
