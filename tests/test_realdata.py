"""Real-video data pipeline: detection, fixed crops, filters, outputs and the dataset reader.

Detection tests read a few short clips of the local real corpus (../shared/data/real/video) and
skip when it is absent; error paths and the reader use synthetic videos. Everything is written
under pytest's tmp_path, never into the repository (the corpus' licences forbid copies).
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from engine.errors import UserError
from training.realdata.cli import add_prepare_args
from training.realdata.dataset import RealClips
from training.realdata.detect import FaceObservation, interpolate_boxes
from training.realdata.manifest import Manifest
from training.realdata.options import PrepareOptions
from training.realdata.prepare import (
    crop_clip_frames,
    fixed_crop,
    prepare_videos,
    segment_track,
    split_segment,
)
from training.realdata.video import iter_frames, read_audio, read_clip_frames, write_clip

REAL_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "video"
# Small, short, frontal: two with speech (16 kHz stereo; 44.1 kHz stereo at 29.97 fps, 720p)
# and one silent 256² clip.
REAL_FILES = [
    "SadTalker__examples__ref_video__WDA_AlexandriaOcasioCortez_000.mp4",
    "talking_face_preprocessing__data_processing__raw_data__FAzSK8PLmGI.mp4",
    "dreamtalk__data__style_clip__video__M030_front_angry_level3_001.mp4",
]
WITH_SPEECH = {REAL_FILES[0], REAL_FILES[1]}


# --------------------------------------------------------------------------------------------
# Synthetic inputs
# --------------------------------------------------------------------------------------------
def write_ellipse_video(
    path: Path, num_frames: int = 45, fps: int = 30, size: tuple[int, int] = (160, 120)
) -> None:
    """A bright ellipse moving over noise (no face for Haar), with a 44.1 kHz stereo tone that
    has a click at exactly 0.5 s."""
    w, h = size
    rng = np.random.default_rng(0)
    sr = 44100
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = out.add_stream("aac", rate=sr, layout="stereo")
        for i in range(num_frames):
            img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            cv2.ellipse(img, (20 + 2 * i, h // 2), (18, 26), 0, 0, 360, (250, 250, 250), -1)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        n = int(sr * num_frames / fps)
        pcm = 0.05 * np.sin(2 * np.pi * 220 * np.arange(n) / sr).astype(np.float32)
        pcm[sr // 2 : sr // 2 + 40] = 0.9
        stereo = np.stack([pcm, pcm])
        for start in range(0, n, 1024):
            af = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(stereo[:, start : start + 1024]),
                format="fltp",
                layout="stereo",
            )
            af.sample_rate, af.pts, af.time_base = sr, start, Fraction(1, sr)
            out.mux(aus.encode(af))
        out.mux(aus.encode(None))


def test_resample_to_25fps_and_audio_alignment(tmp_path: Path) -> None:
    src = tmp_path / "ellipse.mp4"
    write_ellipse_video(src, num_frames=45, fps=30)  # 1.5 s
    frames = [j for j, _ in iter_frames(src, fps=25)]
    assert frames == list(range(len(frames)))
    assert abs(len(frames) - 1.5 * 25) <= 1
    audio = read_audio(src, 16000)
    assert audio is not None and audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 1.5 * 16000) < 0.05 * 16000
    # The click at 0.5 s lands within 2 ms of sample 8000 (AAC adds a little filter delay).
    assert abs(int(np.argmax(np.abs(audio))) - 8000) < 32


def test_write_clip_roundtrip(tmp_path: Path) -> None:
    frames = [np.full((64, 64, 3), 10 * i, np.uint8) for i in range(20)]
    audio = np.zeros(20 * 640, np.float32)
    write_clip(tmp_path / "c.mp4", frames, audio, fps=25, sample_rate=16000)
    back = read_clip_frames(tmp_path / "c.mp4")
    assert back.shape == (20, 64, 64, 3)
    assert np.abs(back.astype(int).mean(axis=(1, 2, 3)) - 10 * np.arange(20)).max() < 3
    assert not list(tmp_path.glob("*.part"))


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------
def _obs(x: float, y: float, s: float) -> FaceObservation:
    return FaceObservation(np.array([x, y, x + s, y + s]), "frontal", 0.0, True, 50.0)


def test_segment_track_bridges_gaps_and_splits_on_jumps() -> None:
    every = 5
    steps: list[tuple[int, FaceObservation | None]] = []
    for k in range(20):
        f = k * every
        if k in (4, 5):  # two missed steps: bridged
            steps.append((f, None))
        elif k < 12:
            steps.append((f, _obs(100 + k, 100, 80)))
        else:  # another face elsewhere: a new segment
            steps.append((f, _obs(400, 100, 80)))
    segs = segment_track(steps, every, num_frames=100, max_gap=3)
    assert [(a, b) for a, b, _ in segs] == [(0, 60), (60, 100)]
    assert len(segs[0][2]) == 10 and len(segs[1][2]) == 8


def test_split_segment_and_fixed_crop() -> None:
    pieces = split_segment(10, 260, 100)
    assert pieces == [(10, 135), (135, 260)]
    assert split_segment(0, 50, 100) == [(0, 50)]
    # Face near the right border: the 1.6x crop is shifted inside the frame, not padded.
    boxes = np.array([[560.0, 100.0, 640.0, 180.0]] * 3)
    x0, y0, side = fixed_crop(boxes, 1.6, (640, 480))
    assert side == 128 and x0 == 640 - 128 and y0 == 140 - 64
    # Crop larger than the frame: clamped to the short side, as AniTalker's ffmpeg crop.
    x0, y0, side = fixed_crop(np.array([[0.0, 0.0, 200.0, 200.0]]), 1.6, (300, 240))
    assert side == 240 and (x0, y0) == (0, 0)
    per_frame = interpolate_boxes(np.array([0, 10]), np.array([[0.0] * 4, [10.0] * 4]), 12)
    assert per_frame[5, 0] == 5.0 and per_frame[11, 0] == 10.0


# --------------------------------------------------------------------------------------------
# Bad inputs never crash a run
# --------------------------------------------------------------------------------------------
def test_bad_inputs_are_reported_and_skipped(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "empty.mp4").write_bytes(b"")
    (inputs / "notes.mp4").write_text("not a video")
    (inputs / "readme.txt").write_text("ignored: not a video extension")
    write_ellipse_video(inputs / "ellipse.mov")
    out = tmp_path / "out"
    m = prepare_videos(
        [inputs, tmp_path / "missing.mp4"],
        out,
        PrepareOptions(min_face=32, min_clip_seconds=0.5, verbose=False),
    )
    assert m.clips == []
    rep = json.loads((out / "report.json").read_text())
    assert rep["inputs"]["files"] == 4  # the .txt in the folder is not picked up
    assert rep["inputs"]["skipped"] == {
        "empty_file": 1,
        "no_face": 1,
        "not_found": 1,
        "unreadable": 1,
    }
    assert (out / "manifest.jsonl").read_text() == ""
    status = {Path(e["path"]).name: e["status"] for e in rep["per_input"]}
    assert status == {
        "ellipse.mov": "no_face",
        "empty.mp4": "skipped",
        "notes.mp4": "skipped",
        "missing.mp4": "skipped",
    }
    # An existing dataset is not overwritten silently; a folder without videos is an error.
    with pytest.raises(UserError, match="overwrite"):
        prepare_videos([inputs], out, PrepareOptions(verbose=False))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no video files"):
        prepare_videos([tmp_path / "nothing"], tmp_path / "o2", PrepareOptions(verbose=False))


def test_cli_on_bad_inputs_returns_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.webm").write_bytes(b"")
    parser = argparse.ArgumentParser()
    add_prepare_args(parser)
    args = parser.parse_args([str(tmp_path / "empty.webm"), "--out", str(tmp_path / "o")])
    assert args.func(args) == 1
    out = capsys.readouterr()
    assert "empty_file 1" in out.out and "no clips kept" in out.err


# --------------------------------------------------------------------------------------------
# Dataset reader (synthetic dataset written by hand)
# --------------------------------------------------------------------------------------------
def _fake_dataset(out: Path) -> None:
    """Three clips, two identities; pixel value = 8 * frame index + identity offset."""
    records = []
    for k, (ident, n, has_audio) in enumerate(
        [("ann", 12, True), ("ann", 10, False), ("bob", 8, True)]
    ):
        frames = [
            np.full((32, 32, 3), 8 * t + (0 if ident == "ann" else 100), np.uint8) for t in range(n)
        ]
        rel = Path("clips") / ident / f"c{k}.mp4"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        audio = np.full(n * 640, 0.1, np.float32) if has_audio else None
        write_clip(out / rel, frames, audio)
        records.append(
            {
                "clip": f"c{k}",
                "identity": ident,
                "path": str(rel),
                "num_frames": n,
                "fps": 25,
                "has_audio": has_audio,
                "sample_rate": 16000 if has_audio else None,
            }
        )
    Manifest(out, records, {}).save()


def test_real_clips_reader_on_synthetic_dataset(tmp_path: Path) -> None:
    _fake_dataset(tmp_path)
    data = RealClips(tmp_path, cache_clips=2)
    assert data.num_clips == 3 and data.identities == ["ann", "bob"]
    frames = data.clip_frames(0)
    assert frames.shape == (12, 32, 32, 3) and frames.dtype == np.uint8
    assert data.clip_frames(0) is frames  # cached
    audio = data.clip_audio(2)
    assert audio is not None and audio.dtype == np.float32 and audio.shape == (8 * 640,)
    assert data.clip_audio(1) is None
    rng = np.random.default_rng(0)
    for _ in range(10):
        p = data.sample_pair(rng)
        assert p.source_frame != p.target_frame
        clip = data.clip_frames(p.clip)
        np.testing.assert_array_equal(p.source, clip[p.source_frame])
        np.testing.assert_array_equal(p.target, clip[p.target_frame])
        assert p.identity != p.other_identity
        assert p.identity == data.record(p.clip)["identity"]
        assert p.other_identity == data.record(p.other_clip)["identity"]
        src, tgt, other, ident, other_ident, *_ = p  # the tuple form stage1_data.py uses
        assert ident in data.identity_index and other_ident in data.identity_index


def test_real_clips_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="prepare"):
        RealClips(tmp_path)


# --------------------------------------------------------------------------------------------
# The real corpus
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = [REAL_VIDEO / n for n in REAL_FILES]
    if not all(f.is_file() for f in files):
        pytest.skip("real corpus not available (../shared/data/real/video)")
    out = tmp_path_factory.mktemp("real") / "data"
    opts = PrepareOptions(
        min_face=128,  # the local clips are small; the paper's 256 would drop most of them
        clip_seconds=2.0,
        min_clip_seconds=1.0,
        clips_per_identity=2,
        max_seconds=4.0,
        verbose=False,
    )
    prepare_videos(files, out, opts)
    return out


def test_real_clips_format(real_out: Path) -> None:
    m = Manifest.load(real_out)
    assert len(m.identities) == 3, m.report["clips"]
    for rec in m.clips:
        with av.open(str(real_out / rec["path"])) as c:
            v = c.streams.video[0]
            assert (v.codec_context.width, v.codec_context.height) == (256, 256)
            assert v.codec_context.name == "h264" and v.average_rate == 25
            n = sum(1 for _ in c.decode(v))
        assert n == rec["num_frames"] == rec["frame_range"][1] - rec["frame_range"][0]
        speech = Path(rec["source"]).name in WITH_SPEECH
        assert rec["has_audio"] == speech
        if speech:
            with av.open(str(real_out / rec["path"])) as c:
                a = c.streams.audio[0].codec_context
                assert (a.sample_rate, a.channels) == (16000, 1)
            assert rec["num_samples"] == rec["num_frames"] * 640
            assert rec["audio_rms_dbfs"] > -40  # speech, not silence
        assert rec["blur"]["median"] >= 20 and rec["yaw"]["p90_abs"] <= 60
        assert rec["face_size_px"] >= 128
        assert len(rec["face_boxes"]) == rec["num_frames"]


def test_real_crop_is_fixed_within_clip(real_out: Path) -> None:
    """Every output frame is the same source window (crop_box) resized: compare first, middle
    and last frame of a clip with the source cropped by hand."""
    m = Manifest.load(real_out)
    rec = next(r for r in m.clips if Path(r["source"]).name == REAL_FILES[0])
    clip = read_clip_frames(real_out / rec["path"])
    x0, y0, x1, y1 = rec["crop_box"]
    assert x1 - x0 == y1 - y0
    start, end = rec["frame_range"]
    want = {start, (start + end) // 2, end - 1}
    for j, frame in iter_frames(Path(rec["source"]), 25, end):
        if j in want:
            src = frame.to_ndarray(format="rgb24")[y0:y1, x0:x1]
            ref = cv2.resize(src, (256, 256), interpolation=cv2.INTER_AREA)
            diff = np.abs(ref.astype(int) - clip[j - start].astype(int)).mean()
            assert diff < 4.0, (j, diff)  # H.264 at crf 18 only


def test_real_manifest_and_report_agree(real_out: Path) -> None:
    m = Manifest.load(real_out)
    rep = m.report
    assert rep["clips"]["kept"] == len(m.clips) == len(list(real_out.glob("clips/*/*.mp4")))
    dropped = sum(rep["clips"]["dropped"].values())
    assert dropped + rep["clips"]["kept"] == rep["clips"]["candidates"]
    assert rep["inputs"] == {"files": 3, "read": 3, "skipped": {}}
    per_identity: dict[str, int] = {}
    for rec in m.clips:
        per_identity[rec["identity"]] = per_identity.get(rec["identity"], 0) + 1
        side = json.loads((real_out / rec["path"]).with_suffix(".json").read_text())
        assert side == rec
    assert max(per_identity.values()) <= 2
    kept_by_input = {Path(e["path"]).name: e["kept"] for e in rep["per_input"]}
    assert sum(kept_by_input.values()) == len(m.clips)


def test_real_sample_pair(real_out: Path) -> None:
    data = RealClips(real_out)
    rng = np.random.default_rng(1)
    for _ in range(4):
        p = data.sample_pair(rng)
        assert p.source.shape == p.target.shape == p.other.shape == (256, 256, 3)
        assert p.other_identity != p.identity
        assert data.record(p.clip)["identity"] == p.identity
        assert data.record(p.other_clip)["identity"] == p.other_identity


def test_crop_clip_frames_for_evaluation(tmp_path: Path) -> None:
    (tmp_path / "empty.mp4").write_bytes(b"")
    write_ellipse_video(tmp_path / "ellipse.mp4")
    assert crop_clip_frames(tmp_path / "empty.mp4") is None
    assert crop_clip_frames(tmp_path / "ellipse.mp4", min_face=32) is None  # no face
    src = REAL_VIDEO / REAL_FILES[2]
    if not src.is_file():
        pytest.skip("real corpus not available (../shared/data/real/video)")
    clip = crop_clip_frames(src, size=128, max_frames=20)
    assert clip is not None and clip.shape == (20, 128, 128, 3) and clip.dtype == np.uint8
