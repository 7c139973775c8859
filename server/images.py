"""Avatar images from untrusted bytes: validated, decoded once and cached by content hash."""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import UserError

# Formats PIL decodes safely and users actually upload; anything else is refused before decoding.
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"}
# Portraits are used at 256-512 px; keep prepared images small so a cache of them is cheap.
MAX_PREPARED_SIDE = 1024


class ImageRejected(UserError):
    """An upload that is not an acceptable image. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Avatar:
    """A prepared portrait: ``rgb`` is (H, W, 3) uint8, ``id`` the hex digest of the upload."""

    id: str
    rgb: np.ndarray


def decode_avatar(data: bytes, max_bytes: int, max_pixels: int) -> Avatar:
    """Validate and decode an image upload into an RGB portrait (at most MAX_PREPARED_SIDE px).

    Raises ImageRejected (413 too large, 415 not a supported image, 422 unusable image)."""
    if len(data) > max_bytes:
        raise ImageRejected(
            f"avatar upload is {len(data)} bytes; the limit is {max_bytes} "
            "(server.max_upload_bytes)",
            413,
        )
    if not data:
        raise ImageRejected("avatar upload is empty", 415)
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except (UnidentifiedImageError, OSError) as e:
        raise ImageRejected(f"avatar upload is not a readable image ({e})", 415) from None
    if img.format not in ALLOWED_FORMATS:
        raise ImageRejected(
            f"avatar format {img.format} is not accepted (use one of: "
            f"{', '.join(sorted(ALLOWED_FORMATS))})",
            415,
        )
    w, h = img.size
    # Checked before decoding so a small file declaring a huge image (a "bomb") costs nothing.
    if w * h > max_pixels:
        raise ImageRejected(
            f"avatar is {w}x{h} = {w * h} pixels; the limit is {max_pixels} "
            "(server.max_image_pixels)",
            413,
        )
    if min(w, h) < 32:
        raise ImageRejected(f"avatar is {w}x{h}; it must be at least 32 px on each side", 422)
    try:
        out: Image.Image = ImageOps.exif_transpose(img)
        if out.mode in ("RGBA", "LA", "P"):
            out = out.convert("RGBA")
            flat = Image.new("RGBA", out.size, (255, 255, 255, 255))
            out = Image.alpha_composite(flat, out)
        out = out.convert("RGB")
        out.thumbnail((MAX_PREPARED_SIDE, MAX_PREPARED_SIDE), Image.Resampling.LANCZOS)
        rgb = np.asarray(out, dtype=np.uint8).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageRejected(f"avatar image could not be decoded ({e})", 422) from None
    return Avatar(hashlib.sha256(data).hexdigest()[:16], rgb)


def load_avatar_file(path: str | Path, max_pixels: int = 64_000_000) -> np.ndarray:
    """Read a portrait from disk (the server's default avatar); raises UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"avatar file '{p}' not found")
    data = p.read_bytes()
    try:
        return decode_avatar(data, max_bytes=max(len(data), 1), max_pixels=max_pixels).rgb
    except ImageRejected as e:
        raise UserError(f"avatar file '{p}': {e}") from None


class AvatarCache:
    """The last few prepared avatars by id, so controls can switch to an uploaded one by id."""

    def __init__(self, capacity: int = 8) -> None:
        self._items: OrderedDict[str, Avatar] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def put(self, avatar: Avatar) -> None:
        with self._lock:
            self._items[avatar.id] = avatar
            self._items.move_to_end(avatar.id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def get(self, avatar_id: str) -> Avatar | None:
        with self._lock:
            return self._items.get(avatar_id)
