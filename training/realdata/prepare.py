"""Raw talking-face videos -> a stage-1/stage-2 training set, the way AniTalker prepares its data.

    manifest = prepare_videos([Path("videos/")], Path("data/real"), PrepareOptions(min_face=128))

AniTalker (and its released ``talking_face_preprocessing``) does not align faces: each clip gets
one fixed square crop, 1.6x the median face box, centred on the median box centre, so the
natural head motion stays in the video. The steps here:

1. Pass 1, per input: decode (resampled to 25 fps), detect the face every ``detect_every``
   frames (``detect.FaceDetector``: Haar cascades, yaw estimate, blur score), and cut the face
   track into segments where one face is continuously visible (gaps up to ``max_gap_s``; a jump
   in position or size, e.g. a shot cut or another person, starts a new segment). Segments are
   split evenly into clips of ``clip_seconds`` to ``2 x clip_seconds``.
2. Filter each candidate clip: median face box side below ``min_face`` (source pixels),
   ``yaw_percentile`` of |yaw| above ``max_yaw``, median blur score below ``blur_threshold``,
   the face leaving the fixed crop, or too few detections.
3. Select up to ``clips_per_identity`` clips per identity, round-robin over the identity's
   source videos (variety first), best clips first within a video.
4. Pass 2, per input with selected clips: decode again, crop, resize to ``size``², encode H.264
   at 25 fps with the clip's 16 kHz mono audio when the source had an audio stream.

The crop follows AniTalker's ffmpeg ``crop`` filter: side = min(1.6 x max(median w, median h),
frame width, frame height), shifted to stay inside the frame (no padding), so a face near the
border is not centred. Inputs that cannot be used (unreadable, empty, no video stream) are
recorded in the report and skipped; one bad file never stops a run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from engine.errors import UserError
from training.realdata.detect import (
    FaceDetector,
    FaceObservation,
    FaceTracker,
    interpolate_boxes,
)
from training.realdata.manifest import (
    CLIPS_DIR,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REPORT_NAME,
    Manifest,
)
from training.realdata.options import PrepareOptions
from training.realdata.video import (
    VIDEO_EXTENSIONS,
    BadInput,
    frame_to_rgb,
    iter_frames,
    probe,
    read_audio,
    write_clip,
)

# Order in which drop reasons are checked (a clip is counted under the first that applies).
DROP_REASONS = (
    "too_short",
    "face_too_small",
    "few_detections",
    "yaw",
    "blurry",
    "face_leaves_crop",
    "identity_quota",
)


@dataclass
class _Candidate:
    """A stretch of one video that may become a clip."""

    source: Path
    identity: str
    index: int  # within its video
    start: int  # 25-fps frames, [start, end)
    end: int
    obs: list[tuple[int, FaceObservation]]  # (frame, detection) inside [start, end)
    steps: int  # detection steps inside [start, end)
    frame_wh: tuple[int, int]
    reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    crop: tuple[int, int, int] = (0, 0, 0)  # x0, y0, side (source pixels)
    face_boxes: np.ndarray | None = None  # (end - start, 4) per frame, source pixels


# --------------------------------------------------------------------------------------------
# Inputs and identities
# --------------------------------------------------------------------------------------------
def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given (whatever their extension, so bad ones get reported) plus the video files
    (by extension) found under directories, recursively, sorted."""
    out: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in VIDEO_EXTENSIONS
            )
            out.extend(found)
        else:
            out.append(p)  # missing files are reported as skipped by the caller
    return list(dict.fromkeys(out))


def _sanitize(name: str) -> str:
    """A name safe for one path component."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return s or "unnamed"


def load_identity_map(path: Path) -> dict[str, str]:
    """``name<TAB or comma>identity`` per line; ``#`` comments and blank lines are ignored.
    ``name`` may be a file name, a file stem or a path as given on the command line."""
    if not path.is_file():
        raise UserError(f"identity map not found: {path}")
    mapping: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\t|,", line, maxsplit=1)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise UserError(f"{path}:{n}: expected 'name<TAB>identity' or 'name,identity'")
        mapping[parts[0].strip()] = parts[1].strip()
    return mapping


def identity_of(path: Path, opts: PrepareOptions, mapping: dict[str, str]) -> str:
    for key in (str(path), path.name, path.stem):
        if key in mapping:
            return _sanitize(mapping[key])
    if opts.identity_from == "parent":
        return _sanitize(path.resolve().parent.name)
    if opts.identity_from == "file":
        return _sanitize(path.stem)
    raise UserError(f"identity_from must be 'file' or 'parent', not {opts.identity_from!r}")


# --------------------------------------------------------------------------------------------
# Pass 1: detection, segments, candidate clips
# --------------------------------------------------------------------------------------------
def _is_jump(a: FaceObservation, b: FaceObservation) -> bool:
    """A different face or a shot cut between two consecutive detections."""
    sa, sb = a.size_px, b.size_px
    ca = 0.5 * (a.box[:2] + a.box[2:])
    cb = 0.5 * (b.box[:2] + b.box[2:])
    return bool(np.linalg.norm(ca - cb) > 0.5 * (sa + sb) / 2 or max(sa, sb) > 1.6 * min(sa, sb))


def segment_track(
    steps: list[tuple[int, FaceObservation | None]], every: int, num_frames: int, max_gap: int
) -> list[tuple[int, int, list[tuple[int, FaceObservation]]]]:
    """Cut per-step observations ``(frame, observation or None)`` into face segments
    ``(start, end, [(frame, observation), ...])``.

    A segment runs from its first detection to one detection period past its last (frames
    between detections are assumed to show the face, as the interpolation does), clipped to the
    video. Up to ``max_gap`` missed steps in a row are bridged."""
    segments: list[tuple[int, int, list[tuple[int, FaceObservation]]]] = []
    cur: list[tuple[int, FaceObservation]] = []
    gap = 0

    def close() -> None:
        if cur:
            segments.append((cur[0][0], min(cur[-1][0] + every, num_frames), list(cur)))
        cur.clear()

    for frame, o in steps:
        if o is None:
            if cur:
                gap += 1
                if gap > max_gap:
                    close()
            continue
        if cur and _is_jump(cur[-1][1], o):
            close()
        cur.append((frame, o))
        gap = 0
    close()
    return segments


def split_segment(start: int, end: int, clip_frames: int) -> list[tuple[int, int]]:
    """Even split into pieces of ``clip_frames`` to ``2 * clip_frames`` (one piece if shorter)."""
    n = max(1, (end - start) // clip_frames)
    bounds = [start + round(i * (end - start) / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def fixed_crop(boxes: np.ndarray, scale: float, frame_wh: tuple[int, int]) -> tuple[int, int, int]:
    """AniTalker's fixed crop ``(x0, y0, side)`` from face boxes (N, 4): ``scale`` x the median
    box side, centred on the median centre, shifted (not padded) to stay inside the frame."""
    w, h = frame_wh
    cx = float(np.median(0.5 * (boxes[:, 0] + boxes[:, 2])))
    cy = float(np.median(0.5 * (boxes[:, 1] + boxes[:, 3])))
    side_f = scale * max(
        float(np.median(boxes[:, 2] - boxes[:, 0])), float(np.median(boxes[:, 3] - boxes[:, 1]))
    )
    side = int(min(round(side_f), w, h))
    x0 = int(min(max(round(cx - side / 2), 0), w - side))
    y0 = int(min(max(round(cy - side / 2), 0), h - side))
    return x0, y0, side


def _judge(c: _Candidate, opts: PrepareOptions) -> None:
    """Fill in the candidate's crop and stats and its drop reason (None = keep)."""
    obs = [o for _, o in c.obs]
    boxes = np.stack([o.box for o in obs])
    c.crop = fixed_crop(boxes, opts.crop_scale, c.frame_wh)
    x0, y0, side = c.crop
    frames = np.array([f for f, _ in c.obs]) - c.start
    c.face_boxes = interpolate_boxes(frames, boxes, c.end - c.start)
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    yaw = np.array([o.yaw_deg for o in obs])
    blur = np.array([o.blur for o in obs])
    tol = 0.05 * np.median(sizes)  # Haar boxes jitter by a few percent
    fb = c.face_boxes
    inside = (
        (fb[:, 0] >= x0 - tol)
        & (fb[:, 1] >= y0 - tol)
        & (fb[:, 2] <= x0 + side + tol)
        & (fb[:, 3] <= y0 + side + tol)
    )
    yaw_abs_p = float(np.percentile(np.abs(yaw), opts.yaw_percentile))
    c.stats = {
        "face_size_px": round(float(np.median(sizes)), 1),
        "detected_fraction": round(len(c.obs) / max(1, c.steps), 3),
        "outside_fraction": round(float(1.0 - inside.mean()), 3),
        "yaw": {
            "estimator": "haar_frontal_eyes_profile",
            "mean": round(float(yaw.mean()), 1),
            "mean_abs": round(float(np.abs(yaw).mean()), 1),
            f"p{opts.yaw_percentile:g}_abs": round(yaw_abs_p, 1),
            "max_abs": round(float(np.abs(yaw).max()), 1),
            "profile_fraction": round(float(np.mean([o.kind == "profile" for o in obs])), 3),
        },
        "blur": {
            "median": round(float(np.median(blur)), 1),
            "min": round(float(blur.min()), 1),
        },
    }
    if c.stats["face_size_px"] < opts.min_face:
        c.reason = "face_too_small"
    elif c.stats["detected_fraction"] < opts.min_detected_fraction:
        c.reason = "few_detections"
    elif yaw_abs_p > opts.max_yaw:
        c.reason = "yaw"
    elif c.stats["blur"]["median"] < opts.blur_threshold:
        c.reason = "blurry"
    elif c.stats["outside_fraction"] > opts.max_outside_fraction:
        c.reason = "face_leaves_crop"


def scan_video(
    path: Path, identity: str, opts: PrepareOptions, detector: FaceDetector
) -> tuple[list[_Candidate], dict[str, Any]]:
    """Pass 1 on one input: candidate clips (judged) and facts about the input for the report.
    Raises BadInput for unusable files."""
    info = probe(path)
    every = opts.detect_every
    max_frames = None if opts.max_seconds is None else max(1, round(opts.max_seconds * opts.fps))
    max_gap = max(0, int(opts.max_gap_s * opts.fps / every))
    tracker = FaceTracker(detector, max_misses=max_gap)
    steps: list[tuple[int, FaceObservation | None]] = []
    num_frames = 0
    for j, frame in iter_frames(path, opts.fps, max_frames):
        num_frames = j + 1
        if j % every == 0:
            steps.append((j, tracker.step(frame.to_ndarray(format="gray"))))
    facts: dict[str, Any] = {
        "width": info.width,
        "height": info.height,
        "source_fps": round(info.fps, 3),
        "frames_25fps": num_frames,
        "seconds": round(num_frames / opts.fps, 2),
        "has_audio": info.has_audio,
        "detected_fraction": round(sum(o is not None for _, o in steps) / max(1, len(steps)), 3),
    }
    segments = segment_track(steps, every, num_frames, max_gap)
    clip_frames = max(1, round(opts.clip_seconds * opts.fps))
    min_frames = max(1, round(opts.min_clip_seconds * opts.fps))
    cands: list[_Candidate] = []
    for seg_start, seg_end, seg_obs in segments:
        if seg_end - seg_start < min_frames:
            c = _Candidate(path, identity, len(cands), seg_start, seg_end, [], 0, (0, 0))
            c.reason = "too_short"
            cands.append(c)
            continue
        for a, b in split_segment(seg_start, seg_end, clip_frames):
            obs = [(f, o) for f, o in seg_obs if a <= f < b]
            n_steps = len(range(a + (-a) % every, b, every))  # detection steps inside [a, b)
            c = _Candidate(
                path, identity, len(cands), a, b, obs, n_steps, (info.width, info.height)
            )
            if obs:
                _judge(c, opts)
            else:
                c.reason = "few_detections"
            cands.append(c)
    return cands, facts


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
def select_clips(cands: list[_Candidate], per_identity: int) -> None:
    """Keep up to ``per_identity`` passing clips per identity; mark the rest ``identity_quota``.

    Round-robin over the identity's source videos so that a person with several videos gets
    clips from several of them; within a video, the most frontal, best-tracked, sharpest first.
    """
    by_identity: dict[str, dict[Path, list[_Candidate]]] = defaultdict(dict)
    for c in cands:
        if c.reason is None:
            by_identity[c.identity].setdefault(c.source, []).append(c)
    for videos in by_identity.values():
        queues = [
            sorted(
                q,
                key=lambda c: (
                    c.stats["yaw"]["mean_abs"] // 10,  # 10-deg bins: ties go to the next keys
                    -c.stats["detected_fraction"],
                    -c.stats["blur"]["median"],
                    c.start,
                ),
            )
            for q in videos.values()
        ]
        kept = 0
        while any(queues):
            for q in queues:
                if not q:
                    continue
                c = q.pop(0)
                if kept < per_identity:
                    kept += 1
                else:
                    c.reason = "identity_quota"


# --------------------------------------------------------------------------------------------
# Pass 2: crop, resize, encode
# --------------------------------------------------------------------------------------------
def _crop_frame(rgb: np.ndarray, crop: tuple[int, int, int], size: int) -> np.ndarray:
    x0, y0, side = crop
    patch = rgb[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def write_video_clips(
    path: Path, clips: list[_Candidate], out_dir: Path, opts: PrepareOptions, bar: tqdm | None
) -> list[dict[str, Any]]:
    """Pass 2 on one input: write its selected clips; returns their manifest records."""
    clips = sorted(clips, key=lambda c: c.start)
    audio = read_audio(path, opts.sample_rate) if probe(path).has_audio else None
    spf = opts.sample_rate / opts.fps  # audio samples per video frame (640)
    records: list[dict[str, Any]] = []
    k = 0
    frames: list[np.ndarray] = []
    last_end = clips[-1].end
    for j, frame in iter_frames(path, opts.fps, last_end):
        c = clips[k]
        if j < c.start:
            continue
        frames.append(_crop_frame(frame_to_rgb(frame), c.crop, opts.size))
        if j == c.end - 1:
            records.append(_finish_clip(c, frames, audio, spf, out_dir, opts))
            if bar is not None:
                bar.update(1)
            frames = []
            k += 1
            if k == len(clips):
                break
    # The second decode ended early (the file changed or was truncated since pass 1): keep a
    # partial clip if it has frames, count the rest as dropped.
    if k < len(clips) and frames:
        clips[k].end = clips[k].start + len(frames)
        records.append(_finish_clip(clips[k], frames, audio, spf, out_dir, opts))
        k += 1
    for c in clips[k:]:
        c.reason = "unreadable_on_write"
    return records


def _finish_clip(
    c: _Candidate,
    frames: list[np.ndarray],
    audio: np.ndarray | None,
    spf: float,
    out_dir: Path,
    opts: PrepareOptions,
) -> dict[str, Any]:
    clip_audio = None
    rms_dbfs = None
    if audio is not None:
        a, b = round(c.start * spf), round(c.end * spf)
        clip_audio = audio[a:b]
        if len(clip_audio) < b - a:  # audio track shorter than the video
            clip_audio = np.concatenate([clip_audio, np.zeros(b - a - len(clip_audio), np.float32)])
        rms = float(np.sqrt(np.mean(np.square(clip_audio)))) if len(clip_audio) else 0.0
        rms_dbfs = round(float(20 * np.log10(max(rms, 1e-10))), 1)
    clip_id = f"{_sanitize(c.source.stem)}-{c.index:03d}"
    rel = Path(CLIPS_DIR) / c.identity / f"{clip_id}.mp4"
    (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    write_clip(out_dir / rel, frames, clip_audio, opts.fps, opts.sample_rate, opts.crf)
    x0, y0, side = c.crop
    record: dict[str, Any] = {
        "clip": clip_id,
        "identity": c.identity,
        "path": str(rel),
        "source": str(c.source.resolve()),
        "source_size": list(c.frame_wh),
        "crop_box": [x0, y0, x0 + side, y0 + side],
        "frame_range": [c.start, c.end],
        "time_range_s": [round(c.start / opts.fps, 3), round(c.end / opts.fps, 3)],
        "num_frames": len(frames),
        "fps": opts.fps,
        "size": opts.size,
        "has_audio": clip_audio is not None,
        "sample_rate": opts.sample_rate if clip_audio is not None else None,
        "num_samples": len(clip_audio) if clip_audio is not None else 0,
        "audio_rms_dbfs": rms_dbfs,
        **c.stats,
        # Interpolated Haar face box per output frame, in output pixels (x0, y0, x1, y1).
        "face_boxes": _output_boxes(c, len(frames), opts.size),
    }
    (out_dir / rel.with_suffix(".json")).write_text(_dumps(record))
    return record


def _output_boxes(c: _Candidate, num_frames: int, size: int) -> list[list[float]]:
    if c.face_boxes is None:
        return []
    x0, y0, side = c.crop
    boxes = (c.face_boxes[:num_frames] - np.array([x0, y0, x0, y0])) * (size / side)
    return [[round(float(v), 1) for v in b] for b in boxes]


def _dumps(obj: Any) -> str:
    return json.dumps(obj) + "\n"  # one line: face_boxes would take a line per number


# --------------------------------------------------------------------------------------------
# One video, no filtering (evaluation)
# --------------------------------------------------------------------------------------------
def crop_clip_frames(
    path: Path,
    size: int = 256,
    max_frames: int | None = None,
    min_face: int = 64,
    fps: int = 25,
    crop_scale: float = 1.6,
    detect_every: int = 5,
) -> np.ndarray | None:
    """The first ``max_frames`` frames (at ``fps``) of a raw video under one fixed AniTalker crop
    (1.6x the median face box), as uint8 (T, size, size, 3) RGB; None when the file cannot be
    read or a face is found on fewer than half of the detection frames.

    For evaluating on a few real videos directly: no segmenting, selection or size, blur and
    yaw filters (that is ``prepare_videos``). Two decodes (detect, then crop), so memory holds
    only output-size frames."""
    path = Path(path)
    try:
        info = probe(path)
        tracker = FaceTracker(FaceDetector(min_face_px=min_face))
        found: list[FaceObservation] = []
        steps = 0
        for j, frame in iter_frames(path, fps, max_frames):
            if j % detect_every == 0:
                steps += 1
                obs = tracker.step(frame.to_ndarray(format="gray"))
                if obs is not None:
                    found.append(obs)
        if not found or len(found) < 0.5 * steps:
            return None
        crop = fixed_crop(np.stack([o.box for o in found]), crop_scale, (info.width, info.height))
        frames = [
            _crop_frame(frame_to_rgb(frame), crop, size)
            for _, frame in iter_frames(path, fps, max_frames)
        ]
    except BadInput:
        return None
    return np.stack(frames)


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------
def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    existing = [out_dir / n for n in (MANIFEST_NAME, REPORT_NAME, CLIPS_DIR)]
    if any(p.exists() for p in existing):
        if not overwrite:
            raise UserError(
                f"{out_dir} already holds a prepared dataset; pass --overwrite to replace it"
            )
        for p in existing:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_options(opts: PrepareOptions) -> None:
    problems = []
    if opts.min_face < 1:
        problems.append("min_face must be >= 1")
    if opts.size < 16 or opts.size % 2:
        problems.append("size must be an even number >= 16 (H.264 4:2:0)")
    if opts.clip_seconds <= 0 or opts.min_clip_seconds <= 0:
        problems.append("clip_seconds and min_clip_seconds must be > 0")
    if opts.clips_per_identity < 1:
        problems.append("clips_per_identity must be >= 1")
    if opts.detect_every < 1:
        problems.append("detect_every must be >= 1")
    if opts.crop_scale < 1.0:
        problems.append("crop_scale must be >= 1")
    if opts.identity_from not in ("file", "parent"):
        problems.append("identity_from must be 'file' or 'parent'")
    if problems:
        raise UserError("bad data-prepare options: " + "; ".join(problems))


def prepare_videos(
    inputs: list[Path], out_dir: Path, opts: PrepareOptions | None = None
) -> Manifest:
    """Run the whole pipeline (module docstring) and write ``out_dir``; returns the manifest,
    whose ``report`` holds what was kept and dropped, per reason and per input."""
    opts = opts or PrepareOptions()
    _check_options(opts)
    out_dir = Path(out_dir)
    files = collect_inputs(inputs)
    if not files:
        raise UserError(
            "no video files found in "
            + ", ".join(str(p) for p in inputs)
            + f" (looked for {' '.join(VIDEO_EXTENSIONS)})"
        )
    mapping = load_identity_map(opts.identity_map) if opts.identity_map else {}
    _prepare_out_dir(out_dir, opts.overwrite)
    t_start = time.monotonic()
    detector = FaceDetector(min_face_px=opts.min_face)

    per_input: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    cands: list[_Candidate] = []
    seconds_read = 0.0
    bar = tqdm(files, desc="detect", unit="video", disable=not opts.verbose, dynamic_ncols=True)
    for path in bar:
        bar.set_postfix_str(path.name[-40:], refresh=False)
        entry: dict[str, Any] = {"path": str(path)}
        try:
            if not path.exists():
                raise BadInput("not_found", str(path))
            identity = identity_of(path, opts, mapping)
            found, facts = scan_video(path, identity, opts, detector)
        except BadInput as e:
            skipped[e.reason] += 1
            entry.update(status="skipped", reason=e.reason, detail=e.detail)
            per_input.append(entry)
            if opts.verbose:
                tqdm.write(f"skipped {path}: {e.reason}")
            continue
        seconds_read += facts["seconds"]
        entry.update(status="read", identity=identity, **facts)
        if not found:
            entry["status"] = "no_face"
            skipped["no_face"] += 1
        cands.extend(found)
        per_input.append(entry)
    bar.close()

    select_clips(cands, opts.clips_per_identity)
    chosen: dict[Path, list[_Candidate]] = defaultdict(list)
    for c in cands:
        if c.reason is None:
            chosen[c.source].append(c)

    records: list[dict[str, Any]] = []
    wbar = tqdm(
        total=sum(len(v) for v in chosen.values()),
        desc="write",
        unit="clip",
        disable=not opts.verbose,
        dynamic_ncols=True,
    )
    for path, clips in chosen.items():
        try:
            records.extend(write_video_clips(path, clips, out_dir, opts, wbar))
        except BadInput as e:  # changed on disk since pass 1
            for c in clips:
                c.reason = "unreadable_on_write"
            if opts.verbose:
                tqdm.write(f"could not write clips of {path}: {e}")
    wbar.close()

    dropped = Counter(c.reason for c in cands if c.reason is not None)
    for entry in per_input:
        mine = [c for c in cands if str(c.source) == entry["path"]]
        if entry.get("status") in ("read", "no_face"):
            entry["candidates"] = len(mine)
            entry["kept"] = sum(c.reason is None for c in mine)
            entry["dropped"] = dict(Counter(c.reason for c in mine if c.reason is not None))
    elapsed = time.monotonic() - t_start
    report = {
        "format_version": FORMAT_VERSION,
        "options": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()
        },
        "inputs": {
            "files": len(files),
            "read": sum(e["status"] in ("read", "no_face") for e in per_input),
            "skipped": dict(sorted(skipped.items())),
        },
        "clips": {
            "candidates": len(cands),
            "kept": len(records),
            "dropped": {
                r: dropped[r] for r in (*DROP_REASONS, "unreadable_on_write") if dropped[r]
            },
        },
        "identities": {
            "seen": len({c.identity for c in cands}),
            "kept": len({r["identity"] for r in records}),
        },
        "seconds": {
            "read": round(seconds_read, 1),
            "kept": round(sum(r["num_frames"] for r in records) / opts.fps, 1),
            "elapsed": round(elapsed, 1),
        },
        "per_input": per_input,
    }
    manifest = Manifest(out_dir, records, report)
    manifest.save()
    if opts.verbose:
        print(format_summary(report))
    return manifest


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines from a report (what the CLI prints)."""
    ins, clips, secs = report["inputs"], report["clips"], report["seconds"]
    speed = secs["read"] / secs["elapsed"] if secs["elapsed"] > 0 else 0.0
    lines = [
        f"kept {clips['kept']} clips ({secs['kept']:.0f} s) of {report['identities']['kept']} "
        f"identities from {ins['files']} inputs ({secs['read']:.0f} s of video) in "
        f"{secs['elapsed']:.0f} s ({speed:.1f}x real time)",
    ]

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    lines.append(f"skipped inputs: {counts(ins['skipped'])}")
    lines.append(f"dropped clips ({clips['candidates']} candidates): {counts(clips['dropped'])}")
    return "\n".join(lines)
