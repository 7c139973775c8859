"""Settings of the real-data pipeline, in a module of their own so that building the CLI parser
does not import OpenCV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class PrepareOptions:
    """Pipeline settings; defaults follow AniTalker except where noted."""

    min_face: int = 256  # smallest median face box side kept, source pixels (paper: 256)
    size: int = 256  # output side, pixels
    fps: int = 25
    sample_rate: int = 16000
    crop_scale: float = 1.6  # crop side / median face box side
    clip_seconds: float = 4.0  # clips are this long up to twice this long
    min_clip_seconds: float = 2.0  # shorter face segments are dropped
    clips_per_identity: int = 3  # paper: 2-3
    max_yaw: float = 60.0  # degrees
    yaw_percentile: float = 90.0  # a clip's yaw is this percentile of |yaw| over detections
    blur_threshold: float = 20.0  # variance of Laplacian at output scale (AniTalker: 20)
    detect_every: int = 5  # detect on every k-th 25-fps frame (5 per second)
    max_gap_s: float = 0.6  # a face missing longer than this ends a segment
    min_detected_fraction: float = 0.5  # of the detection steps inside a clip
    max_outside_fraction: float = 0.1  # of detections whose box leaves the fixed crop
    identity_from: str = "file"  # "file" (file stem) or "parent" (parent folder name)
    identity_map: Path | None = None  # lines "name<TAB or comma>identity" override the above
    max_seconds: float | None = None  # only read the first N seconds of each input
    crf: int = 18
    overwrite: bool = False
    verbose: bool = True  # progress bars and the printed summary
