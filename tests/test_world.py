"""Tests of the synthetic talking-head world (training/world): determinism, splits, alignment,
lip-sync of the ground truth, that the drawing obeys the controls, I/O and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.config import WorldConfig
from engine.errors import UserError
from training.world import speech
from training.world.clip import clip_motion_only, make_clip
from training.world.identity import get_identity, heldout_ids, sample_identity, train_ids
from training.world.io import read_clip, write_clip
from training.world.motion import (
    MOTION_DTYPE,
    MOTION_FIELDS,
    audio_features,
    motion_row,
    neutral_motion,
    perturb_motion,
    random_motion,
)
from training.world.render import (
    EYE_WHITE_RGB,
    INNER_MOUTH_RGB,
    landmarks,
    render_frame,
    render_frames,
)

CFG = WorldConfig()


@pytest.fixture(scope="module")
def clip_a():
    return make_clip(CFG, identity_id=11, seconds=2.0, size=64, seed=5)


def _no_glasses(start: int):
    """The first identity from ``start`` on without glasses (lenses tint the eye whites)."""
    return next(
        sample_identity(0, i)
        for i in range(start, start + 100)
        if sample_identity(0, i).glasses == "none"
    )


def _near(frames: np.ndarray, rgb: tuple[float, float, float], tol: float) -> np.ndarray:
    """Mask of pixels within tol (0..255, per channel) of a colour; (..., H, W) bool."""
    return np.abs(frames.astype(np.int16) - np.array(rgb) * 255).max(-1) <= tol


# --- determinism, splits, alignment ---------------------------------------------------------
def test_clip_is_deterministic(clip_a):
    again = make_clip(CFG, identity_id=11, seconds=2.0, size=64, seed=5)
    assert np.array_equal(again.frames, clip_a.frames)
    assert np.array_equal(again.audio, clip_a.audio)
    assert np.array_equal(again.motion, clip_a.motion)
    assert again.text == clip_a.text
    other = make_clip(CFG, identity_id=11, seconds=2.0, size=64, seed=6)
    assert not np.array_equal(other.audio, clip_a.audio)
    assert not np.array_equal(other.motion["yaw"], clip_a.motion["yaw"])


def test_identities_are_deterministic_and_distinct():
    assert sample_identity(0, 42) == sample_identity(0, 42)
    assert sample_identity(0, 42) != sample_identity(0, 43)
    assert sample_identity(0, 42) != sample_identity(1, 42)


def test_heldout_identities_disjoint_from_training():
    tr, ho = train_ids(CFG), heldout_ids(CFG)
    assert len(ho) == CFG.heldout_identities == 200
    assert len(tr) == CFG.identities - 200
    assert not set(tr.tolist()) & set(ho.tolist())
    assert sorted(tr.tolist() + ho.tolist()) == list(range(CFG.identities))
    assert ho.min() == CFG.identities - 200  # the last ids are held out


def test_heldout_sentences_disjoint_from_training():
    rng_t, rng_h = np.random.default_rng(0), np.random.default_rng(0)
    train = {speech.make_sentence(rng_t, "train") for _ in range(300)}
    held = {speech.make_sentence(rng_h, "heldout") for _ in range(300)}
    assert not train & held
    held_words = speech.sentence_words("heldout")
    for s in train:
        assert not {w.strip(".,?") for w in s.split()} & held_words, s
    for s in held:
        assert {w.strip(".,?") for w in s.split()} & held_words, s


def test_audio_and_video_aligned(clip_a):
    t = clip_a.num_frames
    assert t == 50 and clip_a.frames.shape == (50, 64, 64, 3)
    assert clip_a.frames.dtype == np.uint8
    assert clip_a.audio.dtype == np.float32 and clip_a.audio.shape == (t * 640,)
    odd = make_clip(CFG, identity_id=3, seconds=1.23, size=32, seed=1)
    assert len(odd.audio) == odd.num_frames * 640 == round(1.23 * 25) * 640
    assert len(odd.frames) == odd.num_frames


# --- speech and the ground-truth mouth ------------------------------------------------------
def test_mouth_open_follows_speech_envelope():
    for ident, seed in ((1, 0), (2, 1)):
        clip = make_clip(CFG, ident, seconds=4.0, size=32, seed=seed, render=False)
        rms = audio_features(clip.audio)["rms"]
        mo = clip.motion["mouth_open"]
        assert np.corrcoef(mo, rms)[0, 1] > 0.7
        silent = rms < 1e-4
        assert silent.any() and np.all(mo[silent] == 0.0)  # closed in silence (noise gate)
        assert mo.max() > 0.6  # and clearly open in speech


def test_motion_ranges_and_blinks():
    clip = make_clip(CFG, 4, seconds=12.0, size=32, seed=2, render=False)
    m = clip.motion
    assert np.abs(m["yaw"]).max() <= 35 / 90 and np.abs(m["pitch"]).max() <= 20 / 90
    assert np.abs(m["roll"]).max() <= 15 / 90
    for k in ("mouth_open", "mouth_width", "mouth_round", "blink_l", "blink_r", "brow"):
        assert m[k].min() >= 0.0 and m[k].max() <= 1.0, k
    closed = m["blink_l"] > 0.9
    starts = np.flatnonzero(closed[1:] & ~closed[:-1])
    assert 2 <= len(starts) <= 7  # a blink every 2-6 s over 12 s
    assert m["yaw"].std() > 0.005 and m["gaze_x"].std() > 0.02  # the head and eyes move


def test_motion_helpers_for_training():
    m = clip_motion_only(CFG, 7, 30, np.random.default_rng(3))
    assert m.dtype == MOTION_DTYPE and m.shape == (30,)
    assert np.array_equal(m, clip_motion_only(CFG, 7, 30, np.random.default_rng(3)))
    assert m["mouth_open"].max() > 0.3  # it talks
    r = random_motion(np.random.default_rng(0), 500)
    p = perturb_motion(np.random.default_rng(1), r, 0.15)
    assert np.abs(r["yaw"] - p["yaw"]).mean() < 0.05 < np.abs(r["yaw"] - r["yaw"][::-1]).mean()
    for k in ("mouth_open", "blink_l", "brow"):
        assert p[k].min() >= 0 and p[k].max() <= 1
    assert np.abs(p["yaw"]).max() <= 35 / 90


def test_missing_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install espeak-ng"):
        speech.synth_speech(np.random.default_rng(0), 1.0)
    with pytest.raises(UserError, match="espeak-ng not found"):
        make_clip(CFG, 0, seconds=1.0, size=32)


# --- the drawing obeys the controls ---------------------------------------------------------
def test_drawn_mouth_follows_ground_truth():
    for ident in (0, 3, 7, 10):
        clip = make_clip(CFG, ident, seconds=3.0, size=32, seed=1, render=False)
        m = clip.motion.copy()
        m["yaw"] = m["pitch"] = m["roll"] = m["loc_x"] = 0.0
        m["loc_y"], m["scale"] = 0.1, 0.36
        idn = get_identity(CFG, ident)
        frames = render_frames(idn, m, 128)
        x, y = landmarks(idn, m[0], 128)["mouth"].astype(int)
        box = frames[:, y - 20 : y + 20, x - 25 : x + 25]
        dark = _near(box, INNER_MOUTH_RGB, 8).sum((1, 2))
        assert np.corrcoef(dark, m["mouth_open"])[0, 1] > 0.8, ident
        assert dark[m["mouth_open"] == 0].max() == 0  # no inner mouth when closed


def test_yaw_moves_features():
    idn = _no_glasses(5)
    xs = []
    for yaw in (-0.3, 0.0, 0.3):
        img = render_frame(idn, motion_row(yaw=yaw), 256)
        ys_, xs_ = np.nonzero(_near(img, EYE_WHITE_RGB, 6))
        assert len(xs_) > 20
        xs.append(xs_.mean())
        # The nose tip is pinned to loc_x, so the eyes shift the other way around it.
        nose = landmarks(idn, motion_row(yaw=yaw), 256)["nose_tip"]
        assert abs(nose[0] - 127.5) < 1e-6
    assert xs[0] - xs[1] > 6 and xs[1] - xs[2] > 6  # eyes slide left as the nose turns right
    a = render_frame(idn, motion_row(yaw=-0.3), 128).astype(int)
    b = render_frame(idn, motion_row(yaw=0.3), 128).astype(int)
    assert np.abs(a - b).mean() > 3


CHANGES = {
    "scale": 0.08,
    "blink_l": 1.0,
    "blink_r": 1.0,
    "gaze_x": 1.0,
    "gaze_y": -1.0,
    "mouth_width": 0.5,
    "mouth_round": 1.0,
    "brow": 1.0,
    "mouth_open": 0.6,
}


@pytest.mark.parametrize("field", MOTION_FIELDS)
def test_every_control_changes_the_image(field):
    idn = _no_glasses(9)
    base = neutral_motion(2)
    base["mouth_open"] = 0.5 if field in ("mouth_width", "mouth_round") else 0.0
    base[field][1] += CHANGES.get(field, 0.3)
    a, b = render_frames(idn, base, 256).astype(int)
    assert np.abs(a - b).sum() > 255 * 40, field


def test_blink_closes_the_eyes_and_gaze_moves_pupils():
    idn = _no_glasses(12)
    white = _near(render_frame(idn, motion_row(), 256), EYE_WHITE_RGB, 6)
    shut = _near(render_frame(idn, motion_row(blink_l=1.0, blink_r=1.0), 256), EYE_WHITE_RGB, 6)
    assert white.sum() > 20 and shut.sum() == 0
    # Looking right leaves more white on the left of each iris: the white's centroid moves left.
    right = _near(render_frame(idn, motion_row(gaze_x=1.0), 256), EYE_WHITE_RGB, 6)
    assert np.nonzero(right)[1].mean() < np.nonzero(white)[1].mean() - 1


def test_identities_look_different():
    row = motion_row()
    imgs = [render_frame(sample_identity(0, i), row, 64).astype(np.int16) for i in range(8)]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).mean() > 10, (i, j)
    assert np.array_equal(imgs[0], render_frame(sample_identity(0, 0), row, 64))


def test_render_frames_matches_render_frame_and_sizes():
    idn = sample_identity(0, 21)
    m = random_motion(np.random.default_rng(0), 3)
    batch = render_frames(idn, m, 96)
    for t in range(3):
        assert np.array_equal(batch[t], render_frame(idn, m[t], 96))
    for size in (64, 100, 512):
        assert render_frame(idn, m[0], size).shape == (size, size, 3)


def test_cross_reenactment_has_drivers_motion(clip_a):
    a_with_b = make_clip(CFG, identity_id=30, motion_from=clip_a, size=64)
    assert np.array_equal(a_with_b.motion, clip_a.motion)
    assert np.array_equal(a_with_b.audio, clip_a.audio)
    assert a_with_b.identity_id == 30 and a_with_b.text == clip_a.text
    assert np.abs(a_with_b.frames.astype(int) - clip_a.frames).mean() > 10
    # The new face's nose lands where the driver's motion says.
    idn = get_identity(CFG, 30)
    for t in (0, 25, 49):
        row = clip_a.motion[t]
        nose = landmarks(idn, row, 64)["nose_tip"]
        want = ((row["loc_x"] + 1) * 32 - 0.5, (row["loc_y"] + 1) * 32 - 0.5)
        assert np.allclose(nose, want, atol=1e-3)


# --- bad options ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"seconds": 0.0},
        {"seconds": -2.0},
        {"size": 8},
        {"size": 64.5},
        {"split": "test"},
        {"identity_id": CFG.identities},
        {"seed": -1},
    ],
)
def test_bad_clip_options_raise_user_error(kwargs):
    args = {"identity_id": 0, "seconds": 1.0, "size": 32, "seed": 0, "split": "train"}
    args.update(kwargs)
    with pytest.raises(UserError):
        make_clip(CFG, **args)


# --- files and CLI --------------------------------------------------------------------------
def test_write_and_read_clip(tmp_path, clip_a):
    mp4, npz = write_clip(clip_a, tmp_path, "x")
    assert mp4.stat().st_size > 1000
    back = read_clip(npz)
    assert np.array_equal(back.motion, clip_a.motion)
    assert np.array_equal(back.audio, clip_a.audio)
    assert back.text == clip_a.text and back.identity_id == clip_a.identity_id
    assert back.frames.shape == clip_a.frames.shape
    assert np.abs(back.frames.astype(int) - clip_a.frames).mean() < 8  # lossy, but close
    import av

    with av.open(str(mp4)) as c:
        audio = c.streams.audio[0]
        assert audio.codec_context.name == "aac" and audio.rate == 16000


def test_cli_synth_and_sheet(tmp_path, capsys):
    from livehead.cli import main

    out = tmp_path / "synth"
    args = ["data", "synth", "--out", str(out), "--clips", "2", "--seconds", "1", "--size", "32"]
    assert main(args) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2
    entry = json.loads(lines[0])
    assert entry["identity_id"] in set(train_ids(CFG).tolist())
    assert (out / f"{entry['name']}.mp4").exists() and (out / f"{entry['name']}.npz").exists()
    sheet = ["data", "sheet", "--out", str(tmp_path / "s.png"), "--n", "4", "--size", "32"]
    assert main(sheet) == 0
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size[0] >= 64


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clips", "0"], "--clips"),
        (["--seconds", "0"], "--seconds"),
        (["--seconds", "-3"], "--seconds"),
        (["--size", "7"], "--size"),
        (["--size", "33"], "even"),
        (["--set", "world.nope=1"], "nope"),
    ],
)
def test_cli_bad_options(tmp_path, capsys, extra, message):
    from livehead.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
