"""Per-frame motion of the synthetic world: the ground-truth controls and how clips get them.

Every frame of a clip is drawn from one row of a structured array with ``MOTION_DTYPE``: 14
float32 fields, all ground truth the renderer obeys exactly.

| field | unit / range | meaning |
|---|---|---|
| ``yaw`` | degrees/90 (±0.33 = ±30°) | head turn; + moves the nose to the image right |
| ``pitch`` | degrees/90 | head nod; + lifts the face (nose moves up) |
| ``roll`` | degrees/90 | head tilt; + turns the head counter-clockwise on screen |
| ``loc_x``, ``loc_y`` | [-1, 1] image coords (x right, y down) | where the nose tip is drawn |
| ``scale`` | fraction of image height | brow-to-chin distance (3D; ~0.83 of it shows frontally) |
| ``mouth_open`` | [0, 1] | lip opening (0 closed) |
| ``mouth_width`` | [0, 1] | lip-corner spread (0.5 neutral) |
| ``mouth_round`` | [0, 1] | lip rounding ("oo") |
| ``blink_l``, ``blink_r`` | [0 open, 1 closed] | eyelids (the head's left and right eye) |
| ``brow`` | [0, 1] | brow raise |
| ``gaze_x``, ``gaze_y`` | [-1, 1] (±1 ≈ ±30° eye turn) | pupils; + is image right / up |

Head translation and size are motion too: the renderer places and sizes the head so that the
nose tip lands on (loc_x, loc_y) and the brow-to-chin distance (the 3D one, in the head's own
frame, depth included) equals ``scale`` of the image height for every identity and pose.
Motion synthesis walks head offset and size and records the resulting loc/scale, so the recorded
values are exactly what each frame shows, and a different identity driven by the same rows
(cross-reenactment) shows the same nose position and face size (the frontal height of two faces
of one ``scale`` differs by ~2 %, the part of their depth a frontal view does not show).

Clip motion (``clip_motion``): the mouth follows the audio deterministically (``mouth_track``);
head pose, position and size are slow random walks (Ornstein-Uhlenbeck, smoothed) with nods on
speech onsets; blinks every 2-6 s; brow raises on emphasis; gaze saccades. In silence the mouth
closes and the head moves less, but blinks and gaze continue.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

from training.world.identity import Identity
from training.world.render import nose_from_pivot

MOTION_FIELDS = (
    "yaw",
    "pitch",
    "roll",
    "loc_x",
    "loc_y",
    "scale",
    "mouth_open",
    "mouth_width",
    "mouth_round",
    "blink_l",
    "blink_r",
    "brow",
    "gaze_x",
    "gaze_y",
)
# the face's own motions (everything after head pose, place and scale)
EXPRESSION_FIELDS = MOTION_FIELDS[MOTION_FIELDS.index("mouth_open") :]
HEAD_FIELDS = MOTION_FIELDS[: MOTION_FIELDS.index("mouth_open")]  # pose, place and scale
MOTION_DTYPE = np.dtype([(name, np.float32) for name in MOTION_FIELDS])

YAW_LIMIT = 35.0 / 90.0
PITCH_LIMIT = 20.0 / 90.0
ROLL_LIMIT = 15.0 / 90.0
SCALE_RANGE = (0.26, 0.46)  # brow-to-chin as a fraction of image height

SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
_SUB_HOP = 160  # 4 analysis sub-frames per video frame
_WIN = 512

# Mouth mapping from band energy (dB; a full-scale sinusoid reads ~0 dB) and the low/high band
# ratio. Calibrated on espeak-ng voices at their default amplitude: speech frames span about
# -46..-5 dB, the ratio about -5..20 dB.
OPEN_FLOOR_DB = -46.0  # at or below: mouth closed (noise gate)
OPEN_SPAN_DB = 38.0  # floor + span: fully open
ROUND_CENTER_DB = 12.0  # low/high band ratio at which rounding is 0.5
ROUND_SPAN_DB = 8.0


def neutral_motion(frames: int) -> np.ndarray:
    """(frames,) MOTION_DTYPE: frontal, centred, mouth closed, eyes open, looking ahead."""
    m = np.zeros(frames, MOTION_DTYPE)
    m["loc_y"] = 0.12
    m["scale"] = 0.36
    m["mouth_width"] = 0.5
    return m


def as_array(motion: np.ndarray) -> np.ndarray:
    """Structured (T,) MOTION_DTYPE -> (T, 14) float32 in MOTION_FIELDS order (model targets)."""
    return np.stack([motion[k] for k in MOTION_FIELDS], axis=-1).astype(np.float32)


def from_array(values: np.ndarray) -> np.ndarray:
    """(T, 14) float array in MOTION_FIELDS order -> (T,) MOTION_DTYPE."""
    values = np.asarray(values, np.float32)
    if values.ndim != 2 or values.shape[1] != len(MOTION_FIELDS):
        raise ValueError(f"expected (T, {len(MOTION_FIELDS)}) values, got {values.shape}")
    m = np.zeros(len(values), MOTION_DTYPE)
    for i, k in enumerate(MOTION_FIELDS):
        m[k] = values[:, i]
    return m


def motion_row(**values: float) -> np.void:
    """One MOTION_DTYPE row: neutral, with the given fields replaced (e.g. ``yaw=0.2``)."""
    m = neutral_motion(1)
    for k, v in values.items():
        if k not in MOTION_FIELDS:
            raise KeyError(f"unknown motion field {k!r} (known: {', '.join(MOTION_FIELDS)})")
        m[k] = v
    return m[0]


# --------------------------------------------------------------------------------------------
# Time-independent samples (stage-1 training pairs)
# --------------------------------------------------------------------------------------------
def mouth_width_for(rounding: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lip-corner spread that goes with a rounding (narrower when rounded), with a little
    noise: (n,) -> (n,) in [0, 1]."""
    return np.clip(0.6 - 0.5 * rounding + rng.normal(0, 0.1, len(rounding)), 0, 1)


def random_motion(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) MOTION_DTYPE rows, each an independent plausible pose and expression."""
    m = np.zeros(n, MOTION_DTYPE)
    m["yaw"] = np.clip(rng.normal(0, 0.15, n), -YAW_LIMIT, YAW_LIMIT)
    m["pitch"] = np.clip(rng.normal(0, 0.07, n), -PITCH_LIMIT, PITCH_LIMIT)
    m["roll"] = np.clip(rng.normal(0, 0.05, n), -ROLL_LIMIT, ROLL_LIMIT)
    m["loc_x"] = rng.normal(0, 0.07, n)
    m["loc_y"] = 0.12 + rng.normal(0, 0.05, n)
    m["scale"] = rng.uniform(0.3, 0.42, n)
    # About a third of the rows have a closed mouth, as speech with pauses does.
    speaking = rng.random(n) > 0.33
    m["mouth_open"] = np.where(speaking, rng.beta(1.5, 2.0, n), 0.0)
    m["mouth_round"] = np.where(speaking, rng.beta(1.0, 2.5, n), 0.0)
    m["mouth_width"] = mouth_width_for(m["mouth_round"], rng)
    closed = rng.random(n) < 0.1
    squint = rng.beta(1.0, 6.0, n)
    m["blink_l"] = np.where(closed, 1.0, squint)
    m["blink_r"] = np.where(closed, 1.0, np.clip(squint + rng.normal(0, 0.03, n), 0, 1))
    m["brow"] = rng.beta(1.2, 3.0, n)
    m["gaze_x"] = np.clip(rng.normal(0, 0.35, n), -1, 1)
    m["gaze_y"] = np.clip(rng.normal(0, 0.25, n), -1, 1)
    return m


# Typical spread of each field in ``random_motion`` (what "amount" in ``perturb_motion`` scales).
_SPREAD = {
    "yaw": 0.15, "pitch": 0.07, "roll": 0.05, "loc_x": 0.07, "loc_y": 0.05, "scale": 0.035,
    "mouth_open": 0.3, "mouth_width": 0.2, "mouth_round": 0.25, "blink_l": 0.15,
    "blink_r": 0.15, "brow": 0.2, "gaze_x": 0.35, "gaze_y": 0.25,
}  # fmt: skip
_RANGES = {
    "yaw": (-YAW_LIMIT, YAW_LIMIT), "pitch": (-PITCH_LIMIT, PITCH_LIMIT),
    "roll": (-ROLL_LIMIT, ROLL_LIMIT), "loc_x": (-0.6, 0.6), "loc_y": (-0.5, 0.6),
    "scale": SCALE_RANGE, "gaze_x": (-1.0, 1.0), "gaze_y": (-1.0, 1.0),
}  # fmt: skip


def perturb_motion(rng: np.random.Generator, motion: np.ndarray, amount: float) -> np.ndarray:
    """A nearby motion, as between neighbouring video frames: each field moves by Gaussian
    noise of ``amount`` times its typical spread, then is clipped to its valid range.

    motion: (T,) MOTION_DTYPE; returns a new (T,) MOTION_DTYPE.
    """
    out = motion.copy()
    n = len(motion)
    for k in MOTION_FIELDS:
        lo, hi = _RANGES.get(k, (0.0, 1.0))
        out[k] = np.clip(motion[k] + rng.normal(0.0, amount * _SPREAD[k], n), lo, hi)
    # A closed mouth mostly stays closed between neighbouring frames.
    closed = motion["mouth_open"] == 0
    out["mouth_open"][closed & (rng.random(n) < 0.7)] = 0.0
    return out


def resting_pivot(
    identity: Identity,
    scale: float,
    rng: np.random.Generator,
    jitter: tuple[float, float] = (0.0, 0.0),
) -> tuple[float, float]:
    """Where a clip's neck pivot rests: where a frontal head of this ``scale`` puts its nose at a
    random resting spot (x ~ N(0, 0.06), y ~ 0.12 + N(0, 0.04)), plus optional Gaussian
    ``jitter`` (standard deviations in x, y)."""
    rest = neutral_motion(1)
    rest["scale"] = scale
    nx, ny = nose_from_pivot(identity, rest, np.zeros(1), np.zeros(1))
    x = rng.normal(0, 0.06) - nx[0]
    if jitter[0] > 0:
        x = x + rng.normal(0, jitter[0])
    y = 0.12 + rng.normal(0, 0.04) - ny[0]
    if jitter[1] > 0:
        y = y + rng.normal(0, jitter[1])
    return float(x), float(y)


def place_like_a_clip(
    identity: Identity,
    motion: np.ndarray,
    rng: np.random.Generator,
    pivot: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """Put the head where a talking clip would (``clip_motion``), in place: the neck pivot at a
    resting spot (``resting_pivot``, with a little jitter in place of a clip's walk), the nose
    (loc_x, loc_y) where the pose then puts it. In clips the nose moves with the turn (~0.012
    image widths per degree of yaw), so strong turns come with the nose far off centre;
    ``random_motion`` draws the nose independently of the pose and rarely goes there.
    motion: (T,) MOTION_DTYPE; pivot: reuse a pivot (another frame of the same "clip");
    returns the pivot used."""
    if pivot is None:
        pivot = resting_pivot(identity, float(motion["scale"][0]), rng, jitter=(0.03, 0.02))
    n = len(motion)
    motion["loc_x"], motion["loc_y"] = nose_from_pivot(
        identity, motion, np.full(n, pivot[0]), np.full(n, pivot[1])
    )
    return pivot


def random_motion_row(rng: np.random.Generator) -> np.void:
    """One plausible pose/expression, independent of time (see ``random_motion``)."""
    return random_motion(rng, 1)[0]


# --------------------------------------------------------------------------------------------
# Mouth from audio
# --------------------------------------------------------------------------------------------
def audio_features(audio: np.ndarray, sample_rate: int = 16000, fps: int = 25) -> dict:
    """Per-video-frame band energies of 16 kHz mono audio.

    Frame n covers samples [n*640, (n+1)*640); it averages four 512-sample Hann windows centred
    at n*640 + 80, 240, 400, 560. Returns (T,) float32 arrays: ``band_db`` (300-3000 Hz power),
    ``ratio_db`` (250-1000 Hz over 1000-3500 Hz), ``rms`` (linear RMS of the frame's samples).
    """
    spf = sample_rate // fps
    if spf != SAMPLES_PER_FRAME or sample_rate != 16000:
        raise ValueError("audio_features is calibrated for 16 kHz audio at 25 fps")
    t = len(audio) // spf
    a = np.asarray(audio[: t * spf], np.float32)
    padded = np.pad(a, (_WIN // 2, _WIN // 2))
    n_sub = 4 * t
    starts = np.arange(n_sub) * _SUB_HOP + _SUB_HOP // 2
    idx = starts[:, None] + np.arange(_WIN)[None, :]
    win = np.hanning(_WIN).astype(np.float32)
    spec = np.abs(np.fft.rfft(padded[idx] * win, axis=1)) ** 2
    # Normalise so a full-scale sinusoid reads about 0 dB.
    spec *= 4.0 / float(win.sum()) ** 2
    freqs = np.fft.rfftfreq(_WIN, 1.0 / sample_rate)

    def band(lo: float, hi: float) -> np.ndarray:
        sel = (freqs >= lo) & (freqs < hi)
        return spec[:, sel].sum(1).reshape(t, 4).mean(1)

    eps = 1e-12
    mid = band(300, 3000)
    low = band(250, 1000)
    high = band(1000, 3500)
    return {
        "band_db": (10 * np.log10(mid + eps)).astype(np.float32),
        "ratio_db": (10 * np.log10(low + eps) - 10 * np.log10(high + eps)).astype(np.float32),
        "rms": np.sqrt((a.reshape(t, spf) ** 2).mean(1)).astype(np.float32),
    }


def _smooth3(x: np.ndarray) -> np.ndarray:
    """Centred [1, 2, 1]/4 smoothing with edge replication; (T,) -> (T,)."""
    if len(x) < 3:
        return x.copy()
    p = np.pad(x, 1, mode="edge")
    return (0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]).astype(np.float32)


def mouth_track(audio: np.ndarray, sample_rate: int = 16000, fps: int = 25) -> dict:
    """Ground-truth mouth per video frame, a deterministic function of the audio alone.

    Returns (T,) float32 arrays in [0, 1]: ``mouth_open`` (band energy in dB above a noise gate,
    0 in silence), ``mouth_round`` (low/high band ratio: "oo"/"o" have most energy below 1 kHz),
    ``mouth_width`` (spread when open and unrounded, narrow when rounded), plus ``band_db``.
    """
    f = audio_features(audio, sample_rate, fps)
    band_db = _smooth3(f["band_db"])
    opening = np.clip((band_db - OPEN_FLOOR_DB) / OPEN_SPAN_DB, 0.0, 1.0)
    voiced = np.clip((band_db - OPEN_FLOOR_DB) / 4.0, 0.0, 1.0)
    ratio = _smooth3(f["ratio_db"])
    rounding = np.clip(0.5 + (ratio - ROUND_CENTER_DB) / (2 * ROUND_SPAN_DB), 0.0, 1.0) * voiced
    width = np.clip(0.5 + 0.25 * opening * (1 - rounding) - 0.45 * rounding, 0.0, 1.0)
    return {
        "mouth_open": opening.astype(np.float32),
        "mouth_round": rounding.astype(np.float32),
        "mouth_width": width.astype(np.float32),
        "band_db": band_db,
    }


# --------------------------------------------------------------------------------------------
# Head, eyes and brows over time
# --------------------------------------------------------------------------------------------
def _smooth_walk(
    rng: np.random.Generator, t: int, std: float, tau_frames: float, gain: np.ndarray | None = None
) -> np.ndarray:
    """Ornstein-Uhlenbeck walk passed through a second identical one-pole filter (so velocity is
    smooth too), with stationary standard deviation ``std``; (t,) float64.

    ``gain`` (t,) scales the driving noise per frame (less motion in silence).
    """
    a = float(np.exp(-1.0 / tau_frames))
    # Stationary variance of two cascaded one-pole filters driven by unit white noise.
    var = (1 + a * a) / (1 - a * a) ** 3
    warm = int(4 * tau_frames)  # run-in so the walk starts in its stationary distribution
    noise = rng.normal(0.0, 1.0, t + warm)
    if gain is not None:
        noise[warm:] *= gain
    x = lfilter([1.0], [1.0, -a], lfilter([1.0], [1.0, -a], noise))
    return x[warm:] * (std / np.sqrt(var))


def _bumps(t: int, centers: np.ndarray, amps: np.ndarray, sigma_frames: float) -> np.ndarray:
    """Sum of Gaussian bumps; (t,) float64."""
    out = np.zeros(t)
    if len(centers) == 0:
        return out
    frames = np.arange(t)[:, None]
    out += (amps[None, :] * np.exp(-0.5 * ((frames - centers[None, :]) / sigma_frames) ** 2)).sum(1)
    return out


def _soft_limit(x: np.ndarray, limit: float) -> np.ndarray:
    """Squash into (-limit, limit), nearly linear well inside it."""
    return limit * np.tanh(x / limit)


def clip_motion(
    rng: np.random.Generator,
    audio: np.ndarray,
    identity: Identity,
    sample_rate: int = 16000,
    fps: int = 25,
) -> np.ndarray:
    """Motion for a clip whose audio is ``audio`` ((T*640,) float32, 16 kHz); (T,) MOTION_DTYPE.

    The mouth comes from the audio alone; everything else from ``rng``, modulated by speech
    activity (nods on onsets, brow raises on loud syllables, calmer head in silence). The
    identity's geometry only converts the walked neck position into the recorded nose position.
    """
    mouth = mouth_track(audio, sample_rate, fps)
    t = len(mouth["mouth_open"])
    m = np.zeros(t, MOTION_DTYPE)
    for k in ("mouth_open", "mouth_round", "mouth_width"):
        m[k] = mouth[k]

    # Speech activity, smoothed over ~0.5 s, drives how lively the head is.
    speaking = (mouth["band_db"] > OPEN_FLOOR_DB).astype(np.float64)
    # (padded so clips shorter than the kernel keep their length: mode="same" would not)
    activity = np.convolve(np.pad(speaking, 6, mode="edge"), np.ones(13) / 13, mode="valid")
    gain = 0.45 + 0.8 * activity

    # Per-clip resting pose, then slow walks around it.
    yaw0 = rng.normal(0, 0.09)
    pitch0 = rng.normal(0, 0.04)
    roll0 = rng.normal(0, 0.03)
    yaw = yaw0 + _smooth_walk(rng, t, 0.09, 1.2 * fps, gain)
    pitch = pitch0 + _smooth_walk(rng, t, 0.04, 0.6 * fps, gain)
    roll = roll0 + _smooth_walk(rng, t, 0.035, 1.5 * fps, gain)

    # Nods: a downward pitch bump shortly after energy onsets (start of a loud stretch).
    energy = mouth["band_db"]
    rise = np.diff(energy, prepend=energy[:1])
    onsets = np.flatnonzero((rise > 9.0) & (energy > OPEN_FLOOR_DB + 8))
    onsets = _min_spacing(onsets, int(0.5 * fps))
    keep = rng.random(len(onsets)) < 0.6
    onsets = onsets[keep]
    pitch -= _bumps(t, onsets + 0.1 * fps, rng.uniform(0.02, 0.06, len(onsets)), 0.12 * fps)

    m["yaw"] = _soft_limit(yaw, YAW_LIMIT)
    m["pitch"] = _soft_limit(pitch, PITCH_LIMIT)
    m["roll"] = _soft_limit(roll, ROLL_LIMIT)

    # Size, then position: the neck pivot walks (a head turns and nods on its neck) and the nose
    # position this gives is recorded. The walk starts where a frontal head would put the nose
    # at a random resting spot.
    scale0 = rng.uniform(0.3, 0.41)
    scale = scale0 * np.exp(_smooth_walk(rng, t, 0.03, 3.0 * fps))
    m["scale"] = np.clip(scale, *SCALE_RANGE)
    rest_x, rest_y = resting_pivot(identity, scale0, rng)
    pivot_x = rest_x + _smooth_walk(rng, t, 0.03, 2.0 * fps, gain)
    pivot_y = rest_y + _smooth_walk(rng, t, 0.02, 2.0 * fps, gain)
    m["loc_x"], m["loc_y"] = nose_from_pivot(identity, m, pivot_x, pivot_y)

    # Blinks every 2-6 s, ~160 ms each; a resting lid level per clip.
    lid0 = rng.beta(1.0, 8.0) * 0.3
    blink = np.full(t, lid0) + np.abs(_smooth_walk(rng, t, 0.02, 1.0 * fps))
    profile = np.array([0.5, 1.0, 1.0, 0.45])
    pos = rng.uniform(0.2, 3.0) * fps
    while pos < t:
        start = int(pos)
        seg = profile[: t - start]
        blink[start : start + len(seg)] = np.maximum(blink[start : start + len(seg)], seg)
        pos += rng.uniform(2.0, 6.0) * fps
    blink = np.clip(blink, 0, 1)
    asym = rng.normal(0, 0.02, t)
    m["blink_l"] = np.clip(blink + asym, 0, 1)
    m["blink_r"] = np.clip(blink - asym, 0, 1)

    # Brows: a resting level plus raises on loud syllables (emphasis).
    brow = rng.uniform(0.05, 0.3) + _smooth_walk(rng, t, 0.05, 1.5 * fps)
    loud = np.flatnonzero(
        (energy > OPEN_FLOOR_DB + 0.8 * OPEN_SPAN_DB)
        & (energy >= np.maximum(np.roll(energy, 1), np.roll(energy, -1)))
    )
    loud = _min_spacing(loud, int(1.0 * fps))
    loud = loud[rng.random(len(loud)) < 0.35]
    brow += _bumps(t, loud.astype(np.float64), rng.uniform(0.3, 0.6, len(loud)), 0.25 * fps)
    m["brow"] = np.clip(brow, 0, 1)

    # Gaze: fixations lasting 0.4-2.5 s, often on the camera (eyes counter-rotate the head turn:
    # gaze ±1 is about ±30° of eye turn, yaw ±1 is ±90°), 2-frame saccades, slight jitter.
    gx = np.zeros(t)
    gy = np.zeros(t)
    pos = 0
    while pos < t:
        length = max(1, int(rng.uniform(0.4, 2.5) * fps))
        if rng.random() < 0.55:
            tx = -3.0 * m["yaw"][pos] + rng.normal(0, 0.05)
            ty = -3.0 * m["pitch"][pos] + rng.normal(0, 0.05)
        else:
            tx, ty = rng.normal(0, 0.4), rng.normal(0, 0.25)
        gx[pos : pos + length] = tx
        gy[pos : pos + length] = ty
        pos += length
    saccade = np.array([0.5, 0.5])
    gx = lfilter(saccade, [1.0], np.concatenate([gx[:1], gx]))[1:]
    gy = lfilter(saccade, [1.0], np.concatenate([gy[:1], gy]))[1:]
    m["gaze_x"] = np.clip(gx + rng.normal(0, 0.015, t), -1, 1)
    m["gaze_y"] = np.clip(gy + rng.normal(0, 0.015, t), -1, 1)
    return m


def _min_spacing(idx: np.ndarray, spacing: int) -> np.ndarray:
    """Keep increasing indices at least ``spacing`` apart (greedy from the start)."""
    out: list[int] = []
    for i in idx:
        if not out or i - out[-1] >= spacing:
            out.append(int(i))
    return np.asarray(out, dtype=np.int64)
