"""Identities of the synthetic world: who a face is, sampled deterministically from an id.

``sample_identity(world_seed, identity_id)`` draws every appearance attribute (head shape, skin,
hair, eyes, brows, nose, lips, beard, glasses, ears, clothes, background) from a random stream
seeded by ``SeedSequence([world_seed, IDENTITY_STREAM, identity_id])``, so identity 17 of world 0
is the same face on every machine, and thousands of ids give visibly distinct faces.

Split: ids ``0 .. cfg.identities - 1`` exist; the last ``cfg.heldout_identities`` of them are held
out for evaluation and never used in training (``train_ids`` / ``heldout_ids``).

Geometry is in head units: the cranium is an ellipsoid with half-height 1 centred at the origin,
x to the head's right as seen by the viewer, y up, z out of the face towards the camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import WorldConfig
from engine.errors import UserError

IDENTITY_STREAM = 1  # SeedSequence tag for identity appearance (clips use other tags)

HAIR_STYLES = ("bald", "short", "long", "bun", "bangs", "afro", "side")
BEARDS = ("none", "stubble", "full", "goatee", "moustache")
GLASSES = ("none", "round", "square")
BACKGROUNDS = ("solid", "vgrad", "hgrad", "blobs", "stripes")

RGB = tuple[float, float, float]

# Skin tones from light to dark; a face interpolates between two neighbours.
_SKIN = np.array(
    [
        [0.98, 0.86, 0.78],
        [0.95, 0.78, 0.66],
        [0.89, 0.70, 0.56],
        [0.80, 0.60, 0.45],
        [0.68, 0.48, 0.34],
        [0.55, 0.37, 0.26],
        [0.42, 0.28, 0.20],
        [0.32, 0.21, 0.15],
    ]
)
_HAIR = np.array(
    [
        [0.08, 0.06, 0.05],  # black
        [0.20, 0.13, 0.08],  # dark brown
        [0.40, 0.26, 0.14],  # brown
        [0.62, 0.45, 0.25],  # light brown
        [0.88, 0.75, 0.45],  # blonde
        [0.62, 0.25, 0.10],  # red
        [0.62, 0.62, 0.62],  # grey
        [0.92, 0.92, 0.90],  # white
        [0.20, 0.30, 0.70],  # dyed blue
        [0.85, 0.35, 0.60],  # dyed pink
    ]
)
_HAIR_P = np.array([0.2, 0.2, 0.15, 0.1, 0.1, 0.07, 0.07, 0.04, 0.035, 0.035])
_IRIS = np.array(
    [
        [0.30, 0.18, 0.08],  # brown
        [0.18, 0.10, 0.05],  # dark brown
        [0.25, 0.45, 0.70],  # blue
        [0.30, 0.50, 0.30],  # green
        [0.45, 0.50, 0.55],  # grey
        [0.50, 0.40, 0.20],  # hazel
    ]
)


@dataclass(frozen=True)
class Identity:
    """One face. Colours are linear-ish sRGB floats in [0, 1]; lengths are in head units."""

    identity_id: int
    # Head shape: cranium ellipsoid half-axes (width, 1, depth); jaw ellipsoid below it.
    head_w: float
    head_d: float
    jaw_w: float  # jaw half-width
    jaw_h: float  # jaw half-height; the chin is at jaw_y - jaw_h
    jaw_y: float
    skin: RGB
    blush: float  # cheek colour strength, 0..0.25
    hair_style: str
    hair: RGB
    beard_color: RGB
    hairline: float  # front hairline height on the unit cranium (0.2 low .. 0.6 high)
    hair_volume: float  # hair shell thickness as a fraction of the cranium
    part_x: float  # parting position on the unit cranium, -0.5..0.5
    eye_y: float
    eye_dx: float  # half the distance between eye centres
    eye_w: float  # eye half-width
    eye_h: float  # upper-lid height
    iris: RGB
    brow_thick: float
    brow_arch: float
    brow_len: float
    brow_gap: float  # brow height above the eye centre
    brow_color: RGB
    nose_len: float  # how far the nose tip stands out of the face
    nose_w: float
    nose_y: float
    mouth_y: float
    mouth_w: float  # lip half-width at neutral width
    lip_thick: float
    lip: RGB
    smile: float  # lip-corner curvature (+ up)
    beard: str
    glasses: str
    glasses_color: RGB
    ear_size: float
    shirt: RGB
    background: str
    bg0: RGB
    bg1: RGB
    bg_seed: int

    @property
    def chin_y(self) -> float:
        return self.jaw_y - self.jaw_h


def _rgb(x: np.ndarray) -> RGB:
    c = np.clip(x, 0.0, 1.0)
    return (float(c[0]), float(c[1]), float(c[2]))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV (all in [0, 1]) -> RGB (3,)."""
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def sample_identity(world_seed: int, identity_id: int) -> Identity:
    """The face with this id in this world (deterministic)."""
    rng = np.random.default_rng(np.random.SeedSequence([world_seed, IDENTITY_STREAM, identity_id]))
    u = rng.uniform

    head_w = u(0.74, 0.9)
    jaw_y = u(-0.42, -0.32)
    jaw_h = u(0.6, 0.72)
    jaw_w = head_w * u(0.6, 0.92)

    k = u(0, len(_SKIN) - 1)
    lo = int(k)
    skin = _SKIN[lo] + (_SKIN[min(lo + 1, len(_SKIN) - 1)] - _SKIN[lo]) * (k - lo)
    skin = skin * u(0.96, 1.04, 3)

    hair_k = int(rng.choice(len(_HAIR), p=_HAIR_P))
    hair = _HAIR[hair_k] * u(0.85, 1.15)
    style = str(rng.choice(HAIR_STYLES, p=[0.1, 0.22, 0.18, 0.1, 0.14, 0.08, 0.18]))
    hairline = u(0.3, 0.55)
    if style == "bangs":
        hairline = u(0.1, 0.22)
    volume = {"afro": u(0.22, 0.32), "bald": 0.0}.get(style, u(0.04, 0.1))

    eye_y = u(-0.05, 0.06)
    iris = _IRIS[rng.integers(len(_IRIS))] * u(0.85, 1.15)
    brow_color = hair * u(0.6, 0.9) if rng.random() < 0.8 else skin * 0.4
    if style == "bald" or np.mean(hair) > 0.7:
        brow_color = skin * u(0.35, 0.6)

    # Darker and redder than the skin, sometimes with a lipstick colour.
    lip = skin * np.array([0.85, 0.6, 0.6]) * u(0.8, 1.0)
    if rng.random() < 0.12:
        lip = _hsv(u(0.92, 1.0) % 1.0, u(0.5, 0.8), u(0.5, 0.8))

    beard = str(rng.choice(BEARDS, p=[0.62, 0.1, 0.12, 0.08, 0.08]))
    # Beards take the hair colour, except dyed hair: then a natural dark brown.
    beard_color = hair if rng.random() < 0.9 and hair_k < 8 else _HAIR[1] * u(0.8, 1.2)
    glasses = str(rng.choice(GLASSES, p=[0.7, 0.15, 0.15]))
    glasses_color = _hsv(u(), u(0, 0.8), u(0.05, 0.6))

    background = str(rng.choice(BACKGROUNDS))
    bg0 = _hsv(u(), u(0.05, 0.6), u(0.35, 0.95))
    bg1 = _hsv((u() + 0.5 * rng.random()) % 1.0, u(0.05, 0.6), u(0.35, 0.95))
    shirt = _hsv(u(), u(0.0, 0.8), u(0.15, 0.9))

    return Identity(
        identity_id=int(identity_id),
        head_w=float(head_w),
        head_d=float(u(0.8, 0.9)),
        jaw_w=float(jaw_w),
        jaw_h=float(jaw_h),
        jaw_y=float(jaw_y),
        skin=_rgb(skin),
        blush=float(u(0.0, 0.25)) if rng.random() < 0.5 else 0.0,
        hair_style=style,
        hair=_rgb(hair),
        beard_color=_rgb(beard_color),
        hairline=float(hairline),
        hair_volume=float(volume),
        part_x=float(u(-0.45, 0.45)),
        eye_y=float(eye_y),
        eye_dx=float(u(0.28, 0.35)),
        eye_w=float(u(0.11, 0.145)),
        eye_h=float(u(0.058, 0.085)),
        iris=_rgb(iris),
        brow_thick=float(u(0.018, 0.045)),
        brow_arch=float(u(0.0, 0.035)),
        brow_len=float(u(0.09, 0.13)),
        brow_gap=float(u(0.12, 0.18)),
        brow_color=_rgb(brow_color),
        nose_len=float(u(0.1, 0.2)),
        nose_w=float(u(0.045, 0.075)),
        nose_y=float(eye_y - u(0.27, 0.35)),
        mouth_y=float(eye_y - u(0.52, 0.62)),
        mouth_w=float(u(0.15, 0.22)),
        lip_thick=float(u(0.022, 0.045)),
        lip=_rgb(lip),
        smile=float(u(-0.3, 0.8)),
        beard=beard,
        glasses=glasses,
        glasses_color=_rgb(glasses_color),
        ear_size=float(u(0.85, 1.15)),
        shirt=_rgb(shirt),
        background=background,
        bg0=_rgb(bg0),
        bg1=_rgb(bg1),
        bg_seed=int(rng.integers(2**31)),
    )


def _check(cfg: WorldConfig) -> None:
    if cfg.identities <= 0:
        raise UserError(f"world.identities must be positive, got {cfg.identities}")
    if not 0 <= cfg.heldout_identities < cfg.identities:
        raise UserError(
            f"world.heldout_identities must be in [0, {cfg.identities}), "
            f"got {cfg.heldout_identities}"
        )


def train_ids(cfg: WorldConfig) -> np.ndarray:
    """Identity ids used for training: ``0 .. identities - heldout_identities - 1``; (N,) int64."""
    _check(cfg)
    return np.arange(cfg.identities - cfg.heldout_identities, dtype=np.int64)


def heldout_ids(cfg: WorldConfig) -> np.ndarray:
    """Identity ids held out for evaluation: the last ``heldout_identities`` ids; (M,) int64."""
    _check(cfg)
    return np.arange(cfg.identities - cfg.heldout_identities, cfg.identities, dtype=np.int64)


def get_identity(cfg: WorldConfig, identity_id: int) -> Identity:
    """``sample_identity`` with a range check against the config."""
    if not 0 <= int(identity_id) < cfg.identities:
        raise UserError(f"identity id {identity_id} out of range [0, {cfg.identities})")
    return sample_identity(cfg.seed, int(identity_id))
