"""Face boxes, a coarse head-yaw estimate and a blur score, with OpenCV's Haar cascades.

The cascades ship inside ``opencv-python-headless`` 4.x (``cv2.data.haarcascades``), so no
weights are downloaded. They are weak detectors by today's standards, and this module is built
around what they can and cannot do:

- Detection runs on a downscaled grey frame (the smallest face we keep is mapped to about
  ``det_face_px`` pixels, ~3x the cascades' 24-px window, and the long side to at most 640 px)
  every ``k``-th frame; ``interpolate_boxes`` fills the frames between detections linearly.
  AniTalker's own preprocessing detects once a second and only uses the median box, so sparse
  detection loses nothing that matters for a fixed crop.
- Multiple faces: the first detection picks the largest face, later steps follow the one that
  overlaps the previous box most (like AniTalker's "largest width" rule, but stable when a
  second, larger face walks in).

Yaw estimator (degrees; positive = the face points to the right side of the image):

1. The frontal cascade (``frontalface_alt2``) is tried first; it responds up to roughly
   35-45 deg of yaw. Only where it finds nothing is the profile cascade (``profileface``) run,
   on the image and on its mirror (it is trained on faces pointing one way: the image's left).
   A profile-only face gets |yaw| = 75, the centre of the range (45-90 deg) where the profile
   cascade fires and the frontal one does not. The profile cascade is not run on faces the
   frontal one found: there it fires almost as often as on real profiles.
2. Frontal faces: the eyes (``haarcascade_eye`` on the face box rescaled to 160 px) give a
   continuous estimate, ``yaw = asin(u / EYE_GAIN)`` with ``u`` the eyes' midpoint offset from
   the box centre in half box widths (a cylinder head model: the eyes sit on the front of the
   head and move by ``r sin(yaw)``). No two eyes found (closed, glasses, blur) -> 0.

Limits, measured on the local corpus (almost all frontal): the Haar frontal box follows the
eyes, so ``u`` shrinks with the box and the eye estimate *under-reads* yaw (a visibly ~15 deg
turn reads 5-12 deg); in practice it separates "frontal" from "clearly turned" and no more.
The 60-deg rule therefore acts as "more than 10% of the clip's detections are profile-only";
moderate turns (30-60 deg) that the frontal cascade still finds pass. Pitch and roll are not
estimated; a raised chin can fool the profile cascade (seen on 4% of the frames of one video);
Haar detection itself fails on strong roll (> ~20 deg), very dark or very small faces,
paintings and some cartoons. Sign conventions were checked on a few frames by eye, not against
a pose estimator. A landmark-based estimator (dlib 68 points, mediapipe mesh; see
ENVIRONMENT.md) would replace this class-and-eyes scheme behind the same ``yaw_deg`` field.

Blur score: variance of the Laplacian (AniTalker's ``blur_detection.py``, threshold 20) over the
central half of the *output* crop, i.e. the central 0.8 x 0.8 of the face box, rescaled to the
pixels it will have in a 256-px output (128 px). Measuring at output scale makes the score
independent of the source resolution and counts upscaling blur, which the model will see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from engine.errors import UserError

FRONTAL_CASCADE = "haarcascade_frontalface_alt2.xml"  # fewer false positives than _default
PROFILE_CASCADE = "haarcascade_profileface.xml"
EYE_CASCADE = "haarcascade_eye.xml"

PROFILE_YAW_DEG = 75.0  # class centre for "profile cascade only" (45-90 deg)

EYE_GAIN = 0.9  # eye midpoint offset (half box widths) at a 90-deg turn, cylinder model
EYE_FACE_PX = 160  # face box width when looking for eyes (haar eye window is 20 px)
BLUR_PATCH_PX = 128  # central half of a 256-px output crop


def _cascade(name: str) -> cv2.CascadeClassifier:
    folder = getattr(getattr(cv2, "data", None), "haarcascades", "")  # absent in OpenCV 5
    path = folder + name
    c = cv2.CascadeClassifier(path)
    if not folder or c.empty():
        raise UserError(
            f"OpenCV Haar cascade {name} not found (OpenCV {cv2.__version__}); "
            "install opencv-python-headless==4.14.0.94, which ships them"
        )
    return c


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes (x0, y0, x1, y1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class FaceObservation:
    """One detected face on one frame, in source pixel coordinates."""

    box: np.ndarray  # float (4,) x0, y0, x1, y1
    kind: str  # "frontal" or "profile"
    yaw_deg: float  # signed estimate, see the module docstring
    eyes_found: bool
    blur: float  # variance of Laplacian at output scale

    @property
    def size_px(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


class FaceDetector:
    """Haar face detection tuned to a minimum face size.

    ``min_face_px`` is the smallest face (box side, source pixels) the caller will keep; faces
    down to 0.6x of it are still detected so that box jitter around the threshold does not
    break tracks. The frame is downscaled so that size maps to ``det_face_px`` pixels."""

    def __init__(self, min_face_px: int = 256, det_face_px: int = 64, max_side_px: int = 640):
        self.min_face_px = min_face_px
        self.det_face_px = det_face_px
        self.max_side_px = max_side_px
        self.frontal = _cascade(FRONTAL_CASCADE)
        self.profile = _cascade(PROFILE_CASCADE)
        self.eye = _cascade(EYE_CASCADE)

    def scale_for(self, width: int, height: int) -> float:
        """Downscale factor for detection (never upscales): the smallest kept face maps to
        ``det_face_px`` and the long side to at most ``max_side_px``, which bounds the cost of
        the cascade's sliding window on 1080p sources."""
        return min(
            1.0,
            self.det_face_px / max(1.0, float(self.min_face_px)),
            self.max_side_px / max(width, height),
        )

    def detect(
        self, gray: np.ndarray, prev_box: np.ndarray | None = None
    ) -> FaceObservation | None:
        """A face on one full-resolution grey frame (uint8 (H, W)), or None.

        Without ``prev_box``: the largest face in the whole frame (acquisition). With it
        (tracking): only a face near it, searched in a window of 3x the box with sizes
        0.7x-1.4x, else None. Tracking never jumps to another face or to a false hit inside
        the face (Haar fires on single eyes now and then); ``FaceTracker`` re-acquires after a
        few misses."""
        h, w = gray.shape
        s = self.scale_for(w, h)
        small = gray
        if s < 1.0:
            small = cv2.resize(gray, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        # No histogram equalisation: on the local corpus it lost real faces and added false hits
        # (the cascades normalise each window's variance themselves).
        min_px = max(24, int(0.6 * self.min_face_px * s))
        prev_s = prev_box * s if prev_box is not None else None
        roi = _roi(prev_s, small.shape) if prev_s is not None else None
        found = self._search(small, roi, prev_s, min_px)
        if found is None:
            return None
        box_s, kind, sign = found
        box = box_s / s
        if kind == "frontal":
            yaw, eyes_found = self._eye_yaw(gray, box)
        else:
            yaw, eyes_found = PROFILE_YAW_DEG * sign, False
        return FaceObservation(box, kind, yaw, eyes_found, blur_score(gray, box))

    def _search(
        self,
        small: np.ndarray,
        roi: tuple[int, int, int, int] | None,
        prev_s: np.ndarray | None,
        min_px: int,
    ) -> tuple[np.ndarray, str, float] | None:
        """Frontal first; the profile cascade only where the frontal one finds nothing, because
        on frontal faces it fires almost as often as on profiles."""
        x0, y0, x1, y1 = roi if roi is not None else (0, 0, small.shape[1], small.shape[0])
        img = small[y0:y1, x0:x1]
        lo, hi = min_px, 0
        if roi is not None and prev_s is not None:
            side = float(max(prev_s[2] - prev_s[0], prev_s[3] - prev_s[1]))
            # Faces do not change size by more than ~1.4x in a detection period (0.2 s); the
            # bound also stops the track from collapsing onto a false hit inside the face.
            lo, hi = max(min_px, int(0.7 * side)), int(1.4 * side) + 1
        off = np.array([x0, y0, x0, y0], dtype=np.float64)
        frontal = _drop_nested(self._run(self.frontal, img, lo, hi, 4))
        cands = [(b + off, "frontal", 0.0) for b in frontal]
        if not cands:
            # The profile cascade finds faces looking to the image's left; mirror for the right.
            cands = [(b + off, "profile", -1.0) for b in self._run(self.profile, img, lo, hi, 5)]
            for b in self._run(self.profile, img[:, ::-1], lo, hi, 5):
                mirrored = np.array([img.shape[1] - b[2], b[1], img.shape[1] - b[0], b[3]])
                cands.append((mirrored + off, "profile", 1.0))
        if not cands:
            return None
        if prev_s is not None:
            best = max(cands, key=lambda c: box_iou(c[0], prev_s))
            return best if box_iou(best[0], prev_s) > 0.3 else None
        return max(cands, key=lambda c: float(c[0][2] - c[0][0]))

    @staticmethod
    def _run(
        c: cv2.CascadeClassifier, img: np.ndarray, min_px: int, max_px: int, nbrs: int
    ) -> list[np.ndarray]:
        if min(img.shape[:2]) < min_px:
            return []
        found = c.detectMultiScale(
            np.ascontiguousarray(img),
            scaleFactor=1.1,
            minNeighbors=nbrs,
            minSize=(min_px, min_px),
            maxSize=(max_px, max_px) if max_px > 0 else (0, 0),
        )
        return [np.array([x, y, x + bw, y + bh], dtype=np.float64) for x, y, bw, bh in found]

    def _eye_yaw(self, gray: np.ndarray, box: np.ndarray) -> tuple[float, bool]:
        """Yaw from the eyes' horizontal offset inside a frontal box (see module docstring)."""
        patch = _crop_resized(gray, box, EYE_FACE_PX, EYE_FACE_PX)
        upper = patch[: int(EYE_FACE_PX * 0.6)]
        eyes = self.eye.detectMultiScale(upper, scaleFactor=1.1, minNeighbors=5, minSize=(18, 18))
        if len(eyes) < 2:
            return 0.0, False
        # The two largest detections, one on each side of the box centre.
        eyes = sorted(eyes, key=lambda e: -int(e[2]))[:3]
        centres = sorted(float(x + ew / 2) for x, _, ew, _ in eyes)
        left = [c for c in centres if c < EYE_FACE_PX / 2]
        right = [c for c in centres if c >= EYE_FACE_PX / 2]
        if not left or not right:
            return 0.0, False
        mid = 0.5 * (left[-1] + right[0])
        u = (mid - EYE_FACE_PX / 2) / (EYE_FACE_PX / 2)  # -1..1, half box widths
        return math.degrees(math.asin(max(-1.0, min(1.0, u / EYE_GAIN)))), True


class FaceTracker:
    """Follows one face through a video, one ``step`` per detection frame.

    The first face is the largest; later steps only accept a face overlapping the last good
    box. After more than ``max_misses`` steps in a row without one the track is dropped and the
    next step acquires again (a shot cut, the person leaving, a long occlusion)."""

    def __init__(self, detector: FaceDetector, max_misses: int = 3):
        self.detector = detector
        self.max_misses = max_misses
        self.box: np.ndarray | None = None
        self.misses = 0

    def step(self, gray: np.ndarray) -> FaceObservation | None:
        obs = self.detector.detect(gray, self.box)
        if obs is None and self.box is not None and self.misses >= self.max_misses:
            # The track is lost for good: try the whole frame on this same step.
            self.box = None
            obs = self.detector.detect(gray, None)
        if obs is None:
            self.misses += 1
        else:
            self.box, self.misses = obs.box, 0
        return obs


def _drop_nested(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """Remove boxes lying mostly (70%) inside a larger one: Haar fires on single eyes and on
    the eyes-and-nose region inside a face it has also found whole."""
    keep = []
    for b in boxes:
        area = (b[2] - b[0]) * (b[3] - b[1])
        nested = False
        for o in boxes:
            if o is b or (o[2] - o[0]) <= (b[2] - b[0]):
                continue
            ix = max(0.0, min(b[2], o[2]) - max(b[0], o[0]))
            iy = max(0.0, min(b[3], o[3]) - max(b[1], o[1]))
            nested = nested or ix * iy >= 0.7 * area
        if not nested:
            keep.append(b)
    return keep


def _roi(box: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A window of 3x ``box`` around its centre, clipped to an image of ``shape``."""
    cx, cy = 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])
    half = 1.5 * max(box[2] - box[0], box[3] - box[1])
    return (
        max(0, int(cx - half)),
        max(0, int(cy - half)),
        min(shape[1], int(cx + half) + 1),
        min(shape[0], int(cy + half) + 1),
    )


def _crop_resized(gray: np.ndarray, box: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``box`` cut from ``gray`` (edge pixels repeated where it leaves the frame), resized with
    area averaging when shrinking (a plain warp would alias and inflate the blur score)."""
    h, w = gray.shape[:2]
    x0, y0 = int(math.floor(box[0])), int(math.floor(box[1]))
    x1, y1 = max(x0 + 1, int(math.ceil(box[2]))), max(y0 + 1, int(math.ceil(box[3])))
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if cx1 <= cx0 or cy1 <= cy0:
        return np.zeros((out_h, out_w), gray.dtype)
    patch = gray[cy0:cy1, cx0:cx1]
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        patch = cv2.copyMakeBorder(
            patch, cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1, borderType=cv2.BORDER_REPLICATE
        )
    shrink = patch.shape[1] > out_w or patch.shape[0] > out_h
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(patch, (out_w, out_h), interpolation=interp)


def blur_score(gray: np.ndarray, face_box: np.ndarray) -> float:
    """Variance of the Laplacian over the central 0.8x of ``face_box``, at output scale."""
    x0, y0, x1, y1 = face_box
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    half = 0.4 * max(x1 - x0, y1 - y0)
    patch = _crop_resized(
        gray, np.array([cx - half, cy - half, cx + half, cy + half]), BLUR_PATCH_PX, BLUR_PATCH_PX
    )
    return float(cv2.Laplacian(patch, cv2.CV_64F).var())


def interpolate_boxes(frames: np.ndarray, boxes: np.ndarray, num_frames: int) -> np.ndarray:
    """Per-frame boxes (num_frames, 4) from boxes (N, 4) detected on increasing ``frames`` (N,):
    linear between detections, held constant before the first and after the last."""
    t = np.arange(num_frames, dtype=np.float64)
    out = np.empty((num_frames, 4), dtype=np.float64)
    for k in range(4):
        out[:, k] = np.interp(t, frames.astype(np.float64), boxes[:, k])
    return out
