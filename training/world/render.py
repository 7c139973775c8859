"""2.5D renderer of the synthetic world: one identity + one motion row -> one RGB frame.

The head is a cranium ellipsoid joined smoothly to a jaw ellipsoid, rotated by yaw/pitch/roll and
projected orthographically. Its silhouette and shading are computed per pixel analytically (the
projection of an ellipsoid is an ellipse; the visible surface point follows from a quadratic), so
the outline turns with the head. Facial features (eyes, brows, nose, mouth, ears, glasses,
cheeks) are flat shapes on planes tangent to the head at fixed anchors: each anchor and its
tangent axes are rotated and projected, and the shape is evaluated in its own plane through the
inverse of the projected 2x2 frame, which gives foreshortening for free; features fade out as
their plane turns away. Hair is a second, larger ellipsoid shell painted where a hairline
predicate on the surface point (rotated back into the head's frame) holds, so the hairline and
parting turn with the head too.

Edges are anti-aliased analytically: every shape has an approximate signed distance d, scaled to
pixels, and covers ``clip(0.5 - d, 0, 1)`` of a pixel. Per-pixel work is restricted to each
shape's bounding box and vectorised with numpy in float32 (Python float scalars keep it float32).
The image is drawn as three float planes (3, H, W) in [0, 255] (compositing over a trailing axis
of 3 is ~5x slower in numpy) and converted to (H, W, 3) uint8 once.

Conventions: image x right, y down; head-local x to the image right (frontal), y up, z towards
the camera; ``blink_l`` is the eye on the image right in a frontal view (the head's own left).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from engine.errors import UserError
from training.world.identity import Identity

try:  # the clip ufunc: ~4x less call overhead than np.clip on the small arrays used here
    from numpy._core.umath import clip as _clip  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older numpy
    _clip = np.clip

INNER_MOUTH_RGB = (0.30, 0.06, 0.08)  # colour of the open mouth's interior (tests look for it)
TEETH_RGB = (0.96, 0.94, 0.88)
TONGUE_RGB = (0.78, 0.33, 0.36)
EYE_WHITE_RGB = (0.96, 0.95, 0.93)
LASH_RGB = (0.10, 0.07, 0.07)
MIN_SIZE, MAX_SIZE = 16, 2048

_LIGHT = (-0.35 / 1.0155, 0.5 / 1.0155, 0.8 / 1.0155)  # unit vector, from the upper left
_F32 = np.float32

Row = np.void | Mapping[str, float]


def _c255(rgb: tuple[float, float, float] | np.ndarray, k: float = 1.0) -> np.ndarray:
    """Colour in [0, 1] (3,) times k -> float32 (3, 1, 1) in [0, 255] (broadcasts over planes)."""
    c = np.clip(np.asarray(rgb, np.float64) * k, 0.0, 1.0) * 255.0
    return c.astype(_F32).reshape(3, 1, 1)


_INNER = _c255(INNER_MOUTH_RGB)
_TEETH = _c255(TEETH_RGB)
_TONGUE = _c255(TONGUE_RGB)
_WHITE = _c255(EYE_WHITE_RGB)
_LASH = _c255(LASH_RGB)
_PUPIL = _c255((0.03, 0.03, 0.04))
_GLINT = _c255((1.0, 1.0, 1.0))
_BLUSH = _c255((0.9, 0.35, 0.4))
_LENS = _c255((0.9, 0.95, 1.0))


# --------------------------------------------------------------------------------------------
# Per-identity rig: feature anchors in head-local coordinates, and colours (both cached)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rig:
    names: dict[str, int]
    frames: np.ndarray  # (4F, 3) float64: F anchor points, then F u, F v, F normal vectors
    brow_chin: float  # 3D distance between the brow midpoint and the chin, head units
    colors: dict[str, np.ndarray]  # float32 (3, 1, 1) in [0, 255]


def _ellipsoids(idn: Identity) -> tuple[tuple, tuple]:
    """(centre, half-axes) of the cranium and the jaw, head units."""
    cran = ((0.0, 0.0, 0.0), (idn.head_w, 1.0, idn.head_d))
    jaw = ((0.0, idn.jaw_y, 0.04), (idn.jaw_w, idn.jaw_h, idn.head_d * 0.86))
    return cran, jaw


def _surface(idn: Identity, x: float, y: float) -> tuple[np.ndarray, np.ndarray]:
    """Front-most point of the head at local (x, y) and its unit normal, both (3,)."""
    best = None
    for (cx, cy, cz), (a, b, c) in _ellipsoids(idn):
        q = 1.0 - ((x - cx) / a) ** 2 - ((y - cy) / b) ** 2
        if q <= 0:
            continue
        z = cz + c * math.sqrt(q)
        if best is None or z > best[0][2]:
            n = np.array([(x - cx) / a**2, (y - cy) / b**2, (z - cz) / c**2])
            best = (np.array([x, y, z]), n / np.linalg.norm(n))
    if best is None:
        raise ValueError(f"({x}, {y}) is outside the head")
    return best


def _tangents(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tangent axes at a surface normal: u along local x projected onto the plane, v = n x u."""
    u = np.array([1.0, 0.0, 0.0]) - n * n[0]
    u /= np.linalg.norm(u)
    return u, np.cross(n, u)


@lru_cache(maxsize=4096)
def _rig(idn: Identity) -> _Rig:
    names: dict[str, int] = {}
    rows: list[tuple[np.ndarray, ...]] = []

    def add(name: str, p: np.ndarray, n: np.ndarray, u=None, v=None) -> None:
        if u is None:
            u, v = _tangents(n)
        names[name] = len(rows)
        rows.append((p, u, v, n))

    up = np.array([0.0, 1.0, 0.0])
    for side, s in (("r", -1.0), ("l", 1.0)):
        p, n = _surface(idn, s * idn.eye_dx, idn.eye_y)
        add(f"eye_{side}", p, n)
        add(f"glass_{side}", p + n * 0.07, n)
        p, n = _surface(idn, s * idn.eye_dx * 1.03, idn.eye_y + idn.brow_gap)
        add(f"brow_{side}", p, n)
        p, n = _surface(idn, s * idn.head_w * 0.55, idn.nose_y - 0.05)
        add(f"cheek_{side}", p, n)
        # Ears sit on the sides of the cranium, on planes turned 55° out of the face plane.
        ear = np.array([s * (idn.head_w * 0.96 + 0.05), idn.eye_y - 0.12, -0.08])
        add(f"ear_{side}", ear, np.array([s * 0.82, 0.0, 0.57]), np.array([0.57, 0, -s * 0.82]), up)
        n = np.array([s, 0.0, 0.0])
        add(f"side_{side}", n * idn.head_w, n, np.array([0.0, 0.0, -s]), up)
    p, n = _surface(idn, 0.0, idn.nose_y)
    add("nose_base", p, n)
    add("nose_tip", p + n * idn.nose_len, n)
    p, n = _surface(idn, 0.0, idn.eye_y - 0.06)
    add("nose_bridge", p, n)
    p, n = _surface(idn, 0.0, idn.mouth_y)
    add("mouth", p, n)
    p, n = _surface(idn, 0.0, idn.eye_y + idn.brow_gap)
    add("brow_mid", p, n)
    chin = np.array([0.0, idn.chin_y, 0.04])
    add("chin", chin, np.array([0.0, 0.0, 1.0]))
    frames = np.concatenate([np.stack(c) for c in zip(*rows)])  # (4F, 3)
    colors = {
        "skin": _c255(idn.skin),
        "skin_ear": _c255(idn.skin, 0.93),
        "skin_ear_in": _c255(idn.skin, 0.7),
        "neck": _c255(idn.skin, 0.8),
        "shadow": _c255(idn.skin, 0.72),
        "nose_hi": _c255(idn.skin, 1.12),
        "nostril": _c255(idn.skin, 0.35),
        "hair": _c255(idn.hair),
        "hair_back": _c255(idn.hair, 0.78),
        "beard": _c255(idn.beard_color, 0.9),
        "moustache": _c255(idn.beard_color, 0.85),
        "lip": _c255(idn.lip),
        "lip_line": _c255(idn.lip, 0.45),
        "iris": _c255(idn.iris),
        "brow": _c255(idn.brow_color),
        "shirt": _c255(idn.shirt),
        "glasses": _c255(idn.glasses_color),
    }
    brow_chin = float(np.linalg.norm(frames[names["brow_mid"]] - chin))
    return _Rig(names, frames, brow_chin, colors)


# --------------------------------------------------------------------------------------------
# Backgrounds (static per identity; cached per size)
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _background_cached(idn: Identity, size: int) -> np.ndarray:
    rng = np.random.default_rng(idn.bg_seed)
    c0, c1 = _c255(idn.bg0), _c255(idn.bg1)
    t = (np.arange(size, dtype=_F32) + 0.5) / size  # (S,) in (0, 1): same look at any size
    kind = idn.background
    w: np.ndarray
    if kind == "solid":
        w = np.zeros((size, size), _F32)
    elif kind == "vgrad":
        w = np.broadcast_to(t[:, None], (size, size))
    elif kind == "hgrad":
        w = np.broadcast_to(t[None, :], (size, size))
    elif kind == "stripes":
        ang = rng.uniform(0, np.pi)
        freq = rng.uniform(2.0, 7.0)
        ph = t[None, :] * math.cos(ang) + t[:, None] * math.sin(ang)
        w = 0.5 + 0.5 * np.sin(2 * np.pi * freq * ph + rng.uniform(0, 6.3))
    else:  # blobs: soft blurred discs
        w = np.zeros((size, size), _F32)
        for _ in range(int(rng.integers(4, 9))):
            cx, cy = rng.uniform(0, 1, 2)
            r = rng.uniform(0.08, 0.3)
            d2 = (t[None, :] - cx) ** 2 + (t[:, None] - cy) ** 2
            w += rng.uniform(0.4, 1.0) * np.exp(-d2 / (2 * r * r))
        w = np.clip(w, 0, 1)
    out = (c0 + (c1 - c0) * np.asarray(w, _F32)[None]).astype(_F32)
    out.setflags(write=False)
    return out  # (3, S, S)


def background(idn: Identity, size: int) -> np.ndarray:
    """The identity's static background; (size, size, 3) uint8."""
    out = np.empty((size, size, 3), np.uint8)
    _to_uint8(_background_cached(idn, check_size(size)).copy(), out)
    return out


# --------------------------------------------------------------------------------------------
# Frame placement and drawing primitives
# --------------------------------------------------------------------------------------------
def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation (local -> camera axes) for angles in degrees/90; (3, 3) float64.

    Yaw first (+ turns the nose to the image right), then pitch (+ lifts the face), then roll
    (+ counter-clockwise on screen).
    """
    y, p, r = (v * math.pi / 2 for v in (yaw, pitch, roll))
    cy, sy = math.cos(y), math.sin(y)
    cp, sp = math.cos(p), math.sin(p)
    cr, sr = math.cos(r), math.sin(r)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def rotations(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """``rotation`` for (T,) arrays of angles; (T, 3, 3) float64."""
    y, p, r = (np.asarray(v, np.float64) * (np.pi / 2) for v in (yaw, pitch, roll))
    z, o = np.zeros_like(y), np.ones_like(y)
    cy, sy, cp, sp, cr, sr = np.cos(y), np.sin(y), np.cos(p), np.sin(p), np.cos(r), np.sin(r)
    ry = np.stack([np.stack(m, -1) for m in ([cy, z, sy], [z, o, z], [-sy, z, cy])], -2)
    rx = np.stack([np.stack(m, -1) for m in ([o, z, z], [z, cp, sp], [z, -sp, cp])], -2)
    rz = np.stack([np.stack(m, -1) for m in ([cr, -sr, z], [sr, cr, z], [z, z, o])], -2)
    return rz @ rx @ ry


def neck_pivot(idn: Identity) -> np.ndarray:
    """Head-local point the head turns about (top of the neck, behind the jaw); (3,)."""
    return np.array([0.0, idn.chin_y + 0.1, -0.35])


def nose_from_pivot(
    idn: Identity, motion: np.ndarray, pivot_x: np.ndarray, pivot_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Where the nose tip lands (loc_x, loc_y), given where the neck pivot is drawn.

    motion: (T,) MOTION_DTYPE (yaw, pitch, roll and scale are used); pivot_x, pivot_y: (T,)
    image coords in [-1, 1]. Returns two (T,) float32 arrays. Motion synthesis walks the pivot,
    as a head turns on its neck, and records the nose position this gives.
    """
    rig = _rig(idn)
    tip = rig.frames[rig.names["nose_tip"]]
    d = rotations(motion["yaw"], motion["pitch"], motion["roll"]) @ (tip - neck_pivot(idn))
    k = 2.0 * np.asarray(motion["scale"], np.float64) / rig.brow_chin  # image units / head unit
    return (pivot_x + k * d[:, 0]).astype(_F32), (pivot_y - k * d[:, 1]).astype(_F32)


@dataclass
class _Box:
    """A pixel box and the in-plane coordinates (head units) of every pixel centre in it."""

    sl: tuple[slice, slice]
    u: np.ndarray  # (h, w) float32, along the plane's u axis
    v: np.ndarray  # (h, w) float32, along the plane's v axis
    px: float  # pixels per head unit in the plane (geometric mean of the projection)
    vis: float  # 0..1: fades as the plane turns away from the camera


def _fade(nz: float) -> float:
    """Visibility of a plane from the z component of its normal."""
    return min(max((nz - 0.05) * 4.0, 0.0), 1.0)


class _Frame:
    """One head placed in one image: rotation, pixels per head unit, origin, projected rig."""

    def __init__(self, idn: Identity, row: Row, size: int, img: np.ndarray | None = None):
        # (3, size, size) float32 in [0, 255], drawn into in place (empty: geometry only).
        self.img = img if img is not None else np.empty((3, 0, 0), _F32)
        self.size = size
        self.idn = idn
        self.rig = rig = _rig(idn)
        self.col = rig.colors
        R = rotation(float(row["yaw"]), float(row["pitch"]), float(row["roll"]))
        self.R = R
        self.Rl = R.tolist()
        rf = (rig.frames @ R.T).tolist()  # python floats: cheaper than numpy scalars here
        f = len(rig.names)
        self.P, self.U, self.V, self.N = rf[:f], rf[f : 2 * f], rf[2 * f : 3 * f], rf[3 * f :]
        # Size: the brow-to-chin distance (3D, in head units, so independent of the pose) must
        # be `scale` of the image height. Its depth part (0.80 +- 0.03 head units) does not show
        # in a frontal view; a frontal-height definition was measured in session 18 and read
        # no better (model card).
        self.K = float(row["scale"]) * size / rig.brow_chin  # pixels per head unit
        # Origin: the nose tip must land on (loc_x, loc_y).
        tip = self.P[rig.names["nose_tip"]]
        self.ox = (float(row["loc_x"]) + 1.0) * size / 2 - 0.5 - self.K * tip[0]
        self.oy = (float(row["loc_y"]) + 1.0) * size / 2 - 0.5 + self.K * tip[1]

    def project(self, p: list[float] | np.ndarray) -> tuple[float, float]:
        """Camera-axes point (3,) in head units relative to the head origin -> pixel (x, y)."""
        return self.ox + self.K * float(p[0]), self.oy - self.K * float(p[1])

    def point(self, name: str, du: float = 0.0, dv: float = 0.0) -> tuple[float, float]:
        """Pixel position of an anchor moved by (du, dv) head units in its plane."""
        i = self.rig.names[name]
        p, u, v = self.P[i], self.U[i], self.V[i]
        return (
            self.ox + self.K * (p[0] + du * u[0] + dv * v[0]),
            self.oy - self.K * (p[1] + du * u[1] + dv * v[1]),
        )

    def facing(self, name: str) -> float:
        return self.N[self.rig.names[name]][2]

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[int, int, int, int] | None:
        s = self.size
        ix0, iy0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
        ix1, iy1 = min(int(math.ceil(x1)) + 2, s), min(int(math.ceil(y1)) + 2, s)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        return ix0, ix1, iy0, iy1

    def grid(self, b: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Camera-axes offsets (head units) of pixel centres from the origin: X (1, w), Y (h, 1)."""
        ix0, ix1, iy0, iy1 = b
        k = 1.0 / self.K
        X = (np.arange(ix0, ix1, dtype=_F32) - self.ox) * k
        Y = (self.oy - np.arange(iy0, iy1, dtype=_F32)) * k
        return X[None, :], Y[:, None]

    def feature(
        self, name: str, eu: float, ev: float, dv: float = 0.0, always: bool = False
    ) -> _Box | None:
        """Plane coordinates around an anchor (shifted by ``dv`` along v), over the box of
        [-eu, eu] x [-ev, ev]. Fades as the plane turns away unless ``always``."""
        i = self.rig.names[name]
        vis = 1.0 if always else _fade(self.N[i][2])
        if vis <= 0:
            return None
        K = self.K
        U, V = self.U[i], self.V[i]
        ax, ay = self.point(name, 0.0, dv)
        j00, j01, j10, j11 = K * U[0], K * V[0], -K * U[1], -K * V[1]  # d(pixel)/d(u, v)
        det = j00 * j11 - j01 * j10
        if abs(det) < 1e-6:
            return None
        hx, hy = abs(j00) * eu + abs(j01) * ev, abs(j10) * eu + abs(j11) * ev
        b = self.box(ax - hx, ax + hx, ay - hy, ay + hy)
        if b is None:
            return None
        ix0, ix1, iy0, iy1 = b
        dx = (np.arange(ix0, ix1, dtype=_F32) - ax)[None, :]
        dy = (np.arange(iy0, iy1, dtype=_F32) - ay)[:, None]
        inv = 1.0 / det
        u = (j11 * inv) * dx + (-j01 * inv) * dy
        v = (-j10 * inv) * dx + (j00 * inv) * dy
        return _Box((slice(iy0, iy1), slice(ix0, ix1)), u, v, math.sqrt(abs(det)), vis)

    def blend(self, sl: tuple[slice, slice], alpha: np.ndarray, color: np.ndarray) -> None:
        """img[:, sl] <- img + alpha * (color - img); alpha (h, w), color (3, 1, 1) or (3, h, w)."""
        region = self.img[:, sl[0], sl[1]]
        region += alpha * (color - region)


def _cov(d: np.ndarray, px: float) -> np.ndarray:
    """Pixel coverage of a shape from its signed distance d (plane units, < 0 inside)."""
    return _clip(0.5 - d * px, 0.0, 1.0)


def _ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse with half-axes (a, b): the
    implicit function divided by its gradient length (exact at the boundary)."""
    ia, ib = 1.0 / (a * a), 1.0 / (b * b)
    ua, vb = u * ia, v * ib
    q = u * ua + v * vb - 1.0
    return q / (2.0 * np.sqrt(ua * ua + vb * vb) + 1e-6)


def _circle(u: np.ndarray, v: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.sqrt((u - cx) ** 2 + (v - cy) ** 2) - r


def _segment(fr: _Frame, a: tuple[float, float], b: tuple[float, float], r_px: float):
    """(slices, alpha) of an anti-aliased capsule between pixel points a and b, or None."""
    bb = fr.box(
        min(a[0], b[0]) - r_px,
        max(a[0], b[0]) + r_px,
        min(a[1], b[1]) - r_px,
        max(a[1], b[1]) + r_px,
    )
    if bb is None:
        return None
    ix0, ix1, iy0, iy1 = bb
    px = (np.arange(ix0, ix1, dtype=_F32) - a[0])[None, :]
    py = (np.arange(iy0, iy1, dtype=_F32) - a[1])[:, None]
    bx, by = b[0] - a[0], b[1] - a[1]
    k = 1.0 / (bx * bx + by * by + 1e-9)
    h = _clip(px * (bx * k) + py * (by * k), 0.0, 1.0)
    d = np.sqrt((px - h * bx) ** 2 + (py - h * by) ** 2) - r_px
    return (slice(iy0, iy1), slice(ix0, ix1)), _clip(0.5 - d, 0.0, 1.0)


class _Ellipsoid:
    """An ellipsoid (head-local centre, half-axes) seen through the frame's rotation."""

    def __init__(self, fr: _Frame, center, axes):
        R = fr.R
        self.c = (R @ np.asarray(center, np.float64)).tolist()
        A = (R * (1.0 / np.asarray(axes, np.float64) ** 2)) @ R.T
        # Silhouette: the Schur complement gives the projected ellipse x^T M x = 1.
        a22 = A[2, 2]
        m00 = A[0, 0] - A[0, 2] * A[2, 0] / a22
        m01 = A[0, 1] - A[0, 2] * A[2, 1] / a22
        m11 = A[1, 1] - A[1, 2] * A[2, 1] / a22
        self.m = (float(m00), float(m01), float(m11))
        det = m00 * m11 - m01 * m01
        self.hx, self.hy = math.sqrt(m11 / det), math.sqrt(m00 / det)  # extents: sqrt(diag M^-1)
        self.zlin = (float(A[2, 0] / a22), float(A[2, 1] / a22), float(1.0 / a22))
        # n.l with the normal's length taken as for a sphere of the mean radius (a few percent
        # off for these near-spheres, invisible in shading, and 5x cheaper than normalising).
        r_mean = float(np.prod(axes)) ** (1.0 / 3.0)
        self.wl = ((A @ np.array(_LIGHT)) * r_mean).tolist()
        self.cx, self.cy = fr.project(self.c)
        self.K = fr.K

    def bounds(self) -> tuple[float, float, float, float]:
        hx, hy = self.hx * self.K, self.hy * self.K
        return self.cx - hx, self.cx + hx, self.cy - hy, self.cy + hy

    def eval(self, X: np.ndarray, Y: np.ndarray):
        """X (1, w), Y (h, 1): camera-axes offsets (head units) from the frame origin.

        Returns (d, inside, Xe, Ye, Zr), all (h, w) or broadcastable: approximate signed
        distance to the silhouette (head units), s <= 1 mask, offsets from the centre, and the
        depth of the visible surface relative to the centre.
        """
        Xe = X - self.c[0]
        Ye = Y - self.c[1]
        m00, m01, m11 = self.m
        s = (m00 * Xe * Xe + m11 * Ye * Ye) + (2.0 * m01 * Ye) * Xe
        gx = m00 * Xe + m01 * Ye
        gy = m01 * Xe + m11 * Ye
        d = (s - 1.0) / (2.0 * np.sqrt(gx * gx + gy * gy) + 1e-6)
        l0, l1, inv22 = self.zlin
        Zr = np.sqrt(np.maximum(1.0 - s, 0.0) * inv22) - (l0 * Xe + l1 * Ye)
        return d, s <= 1.0, Xe, Ye, Zr

    def ndotl(self, Xe, Ye, Zr) -> np.ndarray:
        w0, w1, w2 = self.wl
        return (w0 * Xe + w1 * Ye) + w2 * Zr


def _to_local(fr: _Frame, X, Y, Z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Camera-axes offsets -> head-local axes (R^T applied per pixel)."""
    (r00, r01, r02), (r10, r11, r12), (r20, r21, r22) = fr.Rl
    return (r00 * X + r10 * Y + r20 * Z, r01 * X + r11 * Y + r21 * Z, r02 * X + r12 * Y + r22 * Z)


# --------------------------------------------------------------------------------------------
# Layers, back to front
# --------------------------------------------------------------------------------------------
def _draw_back_hair(fr: _Frame) -> None:
    idn = fr.idn
    shapes = []
    if idn.hair_style == "long":
        shapes.append(((0.0, -0.42, -0.3), (idn.head_w * 1.32, 1.45, idn.head_d * 0.95)))
    elif idn.hair_style == "bun":
        shapes.append(((0.0, 0.88, -0.42), (0.36, 0.34, 0.36)))
    elif idn.hair_style == "afro":
        v = 1.0 + idn.hair_volume
        shapes.append(((0.0, -0.05, -0.2), (idn.head_w * v * 1.08, v * 1.02, idn.head_d * v)))
    for center, axes in shapes:
        e = _Ellipsoid(fr, center, axes)
        b = fr.box(*e.bounds())
        if b is None:
            continue
        d, _, Xe, Ye, Zr = e.eval(*fr.grid(b))
        shade = _clip(0.8 + 0.25 * e.ndotl(Xe, Ye, Zr), 0.0, 1.0)
        ix0, ix1, iy0, iy1 = b
        fr.blend((slice(iy0, iy1), slice(ix0, ix1)), _cov(d, fr.K), shade * fr.col["hair_back"])


def _draw_body(fr: _Frame) -> None:
    idn = fr.idn
    K = fr.K
    # The torso hangs below the neck pivot and does not turn with the head (a little lean with
    # the roll); the neck joins the turning jaw to it.
    px, py = fr.project(fr.R @ neck_pivot(idn))
    tx = px + K * 0.25 * fr.Rl[1][0]
    ty = py + K * 1.45
    top = fr.project(fr.R @ np.array([0.0, idn.jaw_y - 0.1, -0.25]))
    seg = _segment(fr, top, (tx, ty - K * 0.55), K * idn.jaw_w * 0.5)
    if seg is not None:
        fr.blend(seg[0], seg[1], fr.col["neck"])
    b = fr.box(tx - K * 1.75, tx + K * 1.75, ty - K * 0.95, ty + K * 0.95)
    if b is not None:
        ix0, ix1, iy0, iy1 = b
        u = ((np.arange(ix0, ix1, dtype=_F32) - tx) * (1 / K))[None, :]
        v = ((np.arange(iy0, iy1, dtype=_F32) - ty) * (1 / K))[:, None]
        fr.blend(
            (slice(iy0, iy1), slice(ix0, ix1)), _cov(_ellipse(u, v, 1.75, 0.95), K), fr.col["shirt"]
        )


def _draw_ear(fr: _Frame, side: str, front: bool) -> None:
    """Ears are drawn behind the head, and again over it (fading in) as that side of the head
    turns towards the camera."""
    if front:
        alpha_k = min(max((fr.facing(f"side_{side}") - 0.15) / 0.3, 0.0), 1.0)
        if alpha_k <= 0:
            return
    else:
        alpha_k = 1.0
    k = fr.idn.ear_size
    b = fr.feature(f"ear_{side}", 0.1 * k, 0.17 * k, always=not front)
    if b is None:
        return
    fr.blend(
        b.sl, _cov(_ellipse(b.u, b.v, 0.085 * k, 0.15 * k), b.px) * alpha_k, fr.col["skin_ear"]
    )
    s = 1.0 if side == "l" else -1.0
    a_in = _cov(_ellipse(b.u + 0.012 * s * k, b.v + 0.01, 0.045 * k, 0.1 * k), b.px)
    fr.blend(b.sl, a_in * (0.6 * alpha_k), fr.col["skin_ear_in"])


def _draw_head(fr: _Frame) -> None:
    idn = fr.idn
    cran_def, jaw_def = _ellipsoids(idn)
    cran = _Ellipsoid(fr, *cran_def)
    jaw = _Ellipsoid(fr, *jaw_def)
    b1, b2 = cran.bounds(), jaw.bounds()
    b = fr.box(min(b1[0], b2[0]), max(b1[1], b2[1]), min(b1[2], b2[2]), max(b1[3], b2[3]))
    if b is None:
        return
    X, Y = fr.grid(b)
    d1, in1, X1, Y1, Z1 = cran.eval(X, Y)
    d2, in2, X2, Y2, Z2 = jaw.eval(X, Y)
    # Smooth union of the two silhouettes (rounds the cheek-jaw joint).
    k = 0.12
    h = _clip(0.5 + (0.5 / k) * (d2 - d1), 0.0, 1.0)
    d = d2 + (d1 - d2) * h - k * h * (1.0 - h)
    # Visible surface: whichever ellipsoid is in front; the normals are blended over a small
    # depth band so the intersection does not show as a crease in the shading.
    z1 = np.where(in1, Z1 + cran.c[2], -9.0)
    z2 = np.where(in2, Z2 + jaw.c[2], -9.0)
    w = _clip(0.5 + (z1 - z2) * 6.0, 0.0, 1.0)
    n2 = jaw.ndotl(X2, Y2, Z2)
    ndl = n2 + w * (cran.ndotl(X1, Y1, Z1) - n2)
    shade = _clip(0.8 + 0.28 * ndl, 0.66, 1.0)
    color = shade * fr.col["skin"]
    if idn.beard in ("full", "stubble", "goatee"):
        Lx, Ly, Lz = _to_local(fr, X, Y, np.maximum(z1, z2))
        beard = _beard_alpha(idn, Lx, Ly, Lz, fr.K)
        color += beard * (shade * fr.col["beard"] - color)
    ix0, ix1, iy0, iy1 = b
    fr.blend((slice(iy0, iy1), slice(ix0, ix1)), _cov(d, fr.K), color)


def _beard_alpha(idn: Identity, Lx, Ly, Lz, K: float) -> np.ndarray:
    """Beard opacity on the head surface from head-local coordinates; fuzzy edges."""
    soft = K / 3.0
    front = _clip((Lz + 0.1) * (K / 4.0), 0.0, 1.0)
    if idn.beard == "goatee":
        q = (Lx * (1 / 0.17)) ** 2 + ((Ly - (idn.chin_y + 0.17)) * (1 / 0.15)) ** 2
        return _clip((1.0 - q) * (K * 0.05), 0.0, 1.0) * front * 0.8
    # Beard line rises from the lower cheek towards the sideburns at the ears; stubble sits
    # lower with a softer edge.
    if idn.beard == "full":
        top = (idn.mouth_y + 0.1) + (0.32 / idn.head_w**2) * Lx * Lx
        return _clip(0.5 + (top - Ly) * soft, 0.0, 1.0) * front * 0.85
    top = (idn.mouth_y + 0.02) + (0.3 / idn.head_w**2) * Lx * Lx
    return _clip(0.5 + (top - Ly) * (0.4 * soft), 0.0, 1.0) * front * 0.25


def _draw_cheeks(fr: _Frame) -> None:
    blush = fr.idn.blush
    if blush <= 0:
        return
    for side in ("l", "r"):
        b = fr.feature(f"cheek_{side}", 0.14, 0.1)
        if b is None:
            continue
        q = (b.u * (1 / 0.13)) ** 2 + (b.v * (1 / 0.09)) ** 2
        fr.blend(b.sl, _clip(1.0 - q, 0.0, 1.0) * (blush * b.vis), _BLUSH)


def _draw_nose(fr: _Frame) -> None:
    idn = fr.idn
    nw = idn.nose_w
    vis = _fade(fr.facing("nose_base"))
    if vis <= 0:
        return
    # Ridge: a soft line from the bridge to the tip on the shadow side; the tip stands out of
    # the face, so the line swings with the head (parallax).
    seg = _segment(
        fr,
        fr.point("nose_bridge", 0.3 * nw),
        fr.point("nose_tip", 0.5 * nw),
        max(0.6, 0.012 * fr.K),
    )
    if seg is not None:
        fr.blend(seg[0], seg[1] * (0.45 * vis), fr.col["shadow"])
    b = fr.feature("nose_tip", nw * 1.4, nw * 1.2)
    if b is None:
        return
    u, v, px = b.u, b.v, b.px
    fr.blend(b.sl, _cov(_ellipse(u, v, nw, nw * 0.75), px) * (0.35 * b.vis), fr.col["shadow"])
    hi = _cov(_circle(u, v, -0.3 * nw, 0.25 * nw, 0.28 * nw), px) * (0.35 * b.vis)
    fr.blend(b.sl, hi, fr.col["nose_hi"])
    for s in (-1.0, 1.0):
        d = _ellipse(u - s * 0.5 * nw, v + 0.45 * nw, 0.3 * nw, 0.17 * nw)
        fr.blend(b.sl, _cov(d, px) * (0.85 * b.vis), fr.col["nostril"])


def _draw_mouth(fr: _Frame, row: Row) -> None:
    idn = fr.idn
    mo = min(max(float(row["mouth_open"]), 0.0), 1.0)
    mw = min(max(float(row["mouth_width"]), 0.0), 1.0)
    mr = min(max(float(row["mouth_round"]), 0.0), 1.0)
    W = idn.mouth_w * (0.7 + 0.6 * mw) * (1.0 - 0.3 * mr)  # lip half-width
    H = 0.26 * mo * (1.0 + 0.2 * mr)  # opening height
    lt = idn.lip_thick * (1.0 + 0.3 * mr)  # rounded lips pout
    # The jaw drops the lower lip more than the upper lip rises.
    v_top, v_bot = 0.3 * H, -0.7 * H
    vc, hh = 0.5 * (v_top + v_bot), 0.5 * H
    b = fr.feature("mouth", W + 0.05, hh + lt + 0.1, dv=vc)
    if b is None:
        return
    u, px, vis = b.u, b.px, b.vis
    # Bend the plane so the lip corners follow the identity's smile (less when rounded); v is
    # measured from the opening's centre.
    curve = idn.smile * 0.05 * (1.0 - mr) / (W * W)
    v = b.v - curve * u * u
    fr.blend(b.sl, _cov(_ellipse(u, v, W, hh + lt), px) * vis, fr.col["lip"])
    # Where the lips meet: a dark line at least a pixel wide, visible when closed.
    line = np.maximum(np.abs(v) - max(0.006, 0.6 / px), np.abs(u) - W * 0.93)
    fr.blend(b.sl, _cov(line, px) * (0.8 * vis), fr.col["lip_line"])
    if H * px > 0.05:
        wi = W * 0.9
        # An opening thinner than a pixel covers less: scale by the opening in pixels.
        inner = _cov(_ellipse(u, v, wi, hh), px) * (min(1.0, H * px) * vis)
        fr.blend(b.sl, inner, _INNER)
        teeth_h = min(0.05, 0.45 * H)
        teeth = inner * _clip(0.5 + (v - (hh - teeth_h)) * px, 0.0, 1.0)
        fr.blend(b.sl, teeth, _TEETH)
        tongue = _cov(_ellipse(u, v + (hh - 0.05 * H), wi * 0.6, 0.32 * H), px)
        fr.blend(b.sl, inner * tongue, _TONGUE)
    if idn.beard in ("full", "moustache", "goatee"):
        d = _ellipse(u, v - (hh + lt + 0.03), W + 0.035, 0.035)
        fr.blend(b.sl, _cov(d, px) * (0.9 * vis), fr.col["moustache"])


def _draw_eye(fr: _Frame, side: str, row: Row) -> None:
    idn = fr.idn
    ew, eh = idn.eye_w, idn.eye_h
    eh_lo = 0.7 * eh
    b = fr.feature(f"eye_{side}", ew * 1.15, eh * 1.3)
    if b is None:
        return
    blink = min(max(float(row["blink_l" if side == "l" else "blink_r"]), 0.0), 1.0)
    u, v, px = b.u, b.v, b.px
    f = np.maximum(1.0 - (u * (1.0 / ew)) ** 2, 0.0)  # almond profile, 1 at the centre
    shape = np.maximum(np.where(v > 0, v - eh * f, -v - eh_lo * f), np.abs(u) - ew)
    lid = f * (eh - blink * (eh + eh_lo))  # upper lid edge; at blink=1 it meets the lower one
    open_h = (eh + eh_lo) * (1.0 - blink)
    visible = _cov(np.maximum(shape, v - lid), px) * (min(1.0, open_h * px) * b.vis)
    fr.blend(b.sl, visible, _WHITE)
    gx = min(max(float(row["gaze_x"]), -1.0), 1.0)
    gy = min(max(float(row["gaze_y"]), -1.0), 1.0)
    ri = eh * 0.8
    icx, icy = gx * ew * 0.5, gy * eh * 0.6
    fr.blend(b.sl, _cov(_circle(u, v, icx, icy, ri), px) * visible, fr.col["iris"])
    fr.blend(b.sl, _cov(_circle(u, v, icx, icy, ri * 0.45), px) * visible, _PUPIL)
    glint = _cov(_circle(u, v, icx - ri * 0.35, icy + ri * 0.35, ri * 0.2), px) * visible
    fr.blend(b.sl, glint, _GLINT)
    # Upper lash line along the lid, tapering to the corners.
    lash_r = max(0.008 + 0.004 * blink, 0.6 / px)
    lash = np.maximum(np.abs(v - lid) - lash_r * (f + 0.3), np.abs(u) - ew)
    fr.blend(b.sl, _cov(lash, px) * (0.9 * b.vis), _LASH)


def _draw_brow(fr: _Frame, side: str, row: Row) -> None:
    idn = fr.idn
    raise_ = min(max(float(row["brow"]), 0.0), 1.0)
    bl, bt = idn.brow_len, idn.brow_thick
    arch = idn.brow_arch + 0.025 * raise_
    b = fr.feature(f"brow_{side}", bl * 1.2, bt + arch + 0.04, dv=0.07 * raise_)
    if b is None:
        return
    s = 1.0 if side == "l" else -1.0  # so that +u points away from the nose for both brows
    u = b.u * s
    t = u * (1.0 / bl)  # -1 inner end .. +1 outer end
    centre = arch * (1.0 - (t - 0.25) ** 2) - 0.015 * t
    half = (0.5 * bt) * (1.0 - 0.3 * t)
    d = np.maximum(np.abs(b.v - centre) - half, np.abs(u) - bl)
    fr.blend(b.sl, _cov(d, b.px) * b.vis, fr.col["brow"])


_HAIR_DROP = {"long": 1.5, "afro": 1.25, "bun": 1.2, "bangs": 1.0}


def _draw_hair(fr: _Frame) -> None:
    idn = fr.idn
    style = idn.hair_style
    if style == "bald":
        return
    vol = 1.0 + idn.hair_volume
    axes = (idn.head_w * vol, vol, idn.head_d * vol)
    e = _Ellipsoid(fr, (0.0, 0.02, -0.02), axes)
    b = fr.box(*e.bounds())
    if b is None:
        return
    d, _, Xe, Ye, Zr = e.eval(*fr.grid(b))
    # The surface point in head-local axes, on the unit sphere.
    xh, yh, zh = _to_local(fr, Xe, Ye, Zr)
    xh *= 1.0 / axes[0]
    yh *= 1.0 / axes[1]
    zh *= 1.0 / axes[2]
    # Hair above a hairline that is highest at the forehead and drops towards the back.
    drop = 0.5 * _HAIR_DROP.get(style, 0.95)
    line = (idn.hairline - drop) + 0.15 * xh * xh + drop * zh
    if style == "side":
        line += (0.12 if idn.part_x >= 0 else -0.12) * xh
    elif style == "bangs":
        line += 0.035 * np.sin(28.0 * xh)
    else:  # a slightly irregular hairline, different per identity
        line += 0.02 * np.sin(17.0 * xh + 10.0 * idn.part_x)
    g = yh - line
    a = _cov(d, fr.K) * _clip(0.5 + g * (0.7 * fr.K), 0.0, 1.0)
    shade = _clip(0.7 + 0.35 * e.ndotl(Xe, Ye, Zr), 0.45, 1.0)
    if style == "afro":
        tex = 0.9 + 0.1 * np.sin(45.0 * xh) * np.sin(45.0 * yh)
    else:
        # Strands: two incommensurate ripples, so it reads as hair rather than a knitted cap.
        tex = 0.94 + 0.035 * np.sin(53.0 * xh + 7.0 * yh) + 0.025 * np.sin(131.0 * xh - 11.0 * zh)
        if style in ("short", "long", "bun", "side"):
            part = _clip(1.0 - np.abs(xh - idn.part_x) * 40.0, 0.0, 1.0)
            part *= _clip((g - 0.25) * 10.0, 0.0, 1.0)
            tex *= 1.0 - 0.4 * part
    ix0, ix1, iy0, iy1 = b
    fr.blend((slice(iy0, iy1), slice(ix0, ix1)), a, (shade * tex) * fr.col["hair"])


def _draw_glasses(fr: _Frame) -> None:
    idn = fr.idn
    if idn.glasses == "none":
        return
    gw = idn.eye_w * 1.45
    gh = idn.eye_w * (1.35 if idn.glasses == "round" else 1.0)
    col = fr.col["glasses"]
    th = max(0.012, 0.6 / fr.K)
    for side in ("l", "r"):
        b = fr.feature(f"glass_{side}", gw + th * 2, gh + th * 2)
        if b is None:
            continue
        if idn.glasses == "round":
            d = _ellipse(b.u, b.v, gw, gh)
        else:  # rounded rectangle
            r = 0.03
            qx = np.abs(b.u) - (gw - r)
            qy = np.abs(b.v) - (gh - r)
            d = (
                np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
                + np.minimum(np.maximum(qx, qy), 0.0)
                - r
            )
        fr.blend(b.sl, _cov(d, b.px) * (0.12 * b.vis), _LENS)
        fr.blend(b.sl, _cov(np.abs(d) - th, b.px) * b.vis, col)
    # Bridge between the lenses, and the temples back to the ears on sides that face us.
    seg = _segment(fr, fr.point("glass_l", -gw), fr.point("glass_r", gw), th * fr.K)
    if seg is not None:
        fr.blend(seg[0], seg[1] * _fade(fr.facing("nose_base")), col)
    for side, sgn in (("l", 1.0), ("r", -1.0)):
        facing = fr.facing(f"side_{side}")
        if facing <= 0.05:
            continue
        seg = _segment(
            fr, fr.point(f"glass_{side}", sgn * gw), fr.point(f"ear_{side}", 0, 0.04), th * fr.K
        )
        if seg is not None:
            fr.blend(seg[0], seg[1] * min(1.0, (facing - 0.05) / 0.2), col)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def check_size(size: int) -> int:
    """Validate an output size in pixels; returns it as int."""
    if isinstance(size, bool) or int(size) != size or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise UserError(f"image size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    return int(size)


def _draw(img: np.ndarray, idn: Identity, row: Row) -> None:
    fr = _Frame(idn, row, img.shape[1], img)
    _draw_back_hair(fr)
    _draw_body(fr)
    _draw_ear(fr, "l", front=False)
    _draw_ear(fr, "r", front=False)
    _draw_head(fr)
    _draw_ear(fr, "l", front=True)
    _draw_ear(fr, "r", front=True)
    _draw_cheeks(fr)
    _draw_nose(fr)
    _draw_mouth(fr, row)
    _draw_eye(fr, "l", row)
    _draw_eye(fr, "r", row)
    _draw_brow(fr, "l", row)
    _draw_brow(fr, "r", row)
    _draw_hair(fr)
    _draw_glasses(fr)


def _to_uint8(img: np.ndarray, out: np.ndarray) -> None:
    """(3, H, W) float in [0, 255] -> out (H, W, 3) uint8, rounded; clobbers img.

    Casting planes first and interleaving bytes after is ~3x faster than a strided float copy.
    """
    img += 0.5  # the cast truncates
    _clip(img, 0.0, 255.0, out=img)
    planes = img.astype(np.uint8)
    for k in range(3):
        out[..., k] = planes[k]


def _base(identity: Identity, size: int, bg: np.ndarray | None) -> np.ndarray:
    """(3, S, S) float32 starting image."""
    if bg is None:
        return _background_cached(identity, size)
    if bg.shape != (size, size, 3):
        raise ValueError(f"background must be ({size}, {size}, 3), got {bg.shape}")
    return np.ascontiguousarray(np.moveaxis(np.asarray(bg, _F32), -1, 0))


def render_frame(
    identity: Identity, motion_row: Row, size: int = 256, bg: np.ndarray | None = None
) -> np.ndarray:
    """Draw one frame.

    identity: the face; motion_row: one MOTION_DTYPE row (or a mapping with those names);
    bg: optional (size, size, 3) background (uint8, or float in [0, 255]) instead of the
    identity's own. Returns (size, size, 3) uint8 RGB.
    """
    size = check_size(size)
    img = _base(identity, size, bg).copy()
    _draw(img, identity, motion_row)
    out = np.empty((size, size, 3), np.uint8)
    _to_uint8(img, out)
    return out


def render_frames(
    identity: Identity, motion: np.ndarray, size: int = 256, bg: np.ndarray | None = None
) -> np.ndarray:
    """Draw a batch of frames of one identity over one fixed background.

    motion: (T,) MOTION_DTYPE; bg as in ``render_frame``. Returns (T, size, size, 3) uint8.
    """
    size = check_size(size)
    base = _base(identity, size, bg)
    out = np.empty((len(motion), size, size, 3), np.uint8)
    img = np.empty((3, size, size), _F32)
    for t in range(len(motion)):
        np.copyto(img, base)
        _draw(img, identity, motion[t])
        _to_uint8(img, out[t])
    return out


def landmarks(identity: Identity, motion_row: Row, size: int = 256) -> dict[str, np.ndarray]:
    """Pixel positions (x, y) of the rig anchors in this frame: ``eye_l``, ``eye_r``,
    ``mouth``, ``nose_tip``, ``brow_mid``, ``chin``, ... each a (2,) float64 array."""
    fr = _Frame(identity, motion_row, check_size(size))
    return {n: np.array(fr.point(n)) for n in fr.rig.names}


def face_regions(identity: Identity, motion_row: Row, size: int = 256) -> np.ndarray:
    """Where speech and blinks show in this frame, from one placement of the head: (7,)
    float64 -- mouth, left eye, right eye pixel (x, y), then pixels per head unit."""
    fr = _Frame(identity, motion_row, check_size(size))
    return np.array([*fr.point("mouth"), *fr.point("eye_l"), *fr.point("eye_r"), fr.K])


def head_pixel_scale(identity: Identity, motion_row: Row, size: int = 256) -> float:
    """Pixels per head unit in this frame (the cranium's half-height is one head unit)."""
    return _Frame(identity, motion_row, check_size(size)).K
