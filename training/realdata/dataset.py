"""Random access to a prepared real-video dataset (``livehead data prepare`` output).

    data = RealClips("data/real")
    pair = data.sample_pair(np.random.default_rng(0))
    pair.source, pair.target   # uint8 (256, 256, 3): two frames of one clip (same identity)
    pair.other                 # uint8 (256, 256, 3): a frame of another identity

Stage 1 reconstructs ``target`` from ``source`` (identity from one frame, motion from the
other) and uses ``other`` as the negative for the identity contrastive loss; stage 2 reads
whole clips with their audio (``clip_frames``, ``clip_audio``).

Clips are decoded whole with PyAV and kept in a small LRU cache: a clip is a few seconds
(~100-200 frames, ~20-40 MB decoded), and sampling several pairs from a cached clip is much
cheaper than seeking in H.264.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine.errors import UserError
from training.realdata.manifest import Manifest
from training.realdata.video import read_clip_audio, read_clip_frames


class RealPair(NamedTuple):
    """One stage-1 training sample from real video (a tuple, so ``src, tgt, neg, a, b, *_ =
    pair`` works too)."""

    source: np.ndarray  # uint8 (H, W, 3) RGB, frame ``source_frame`` of clip ``clip``
    target: np.ndarray  # uint8 (H, W, 3) RGB, frame ``target_frame`` of the same clip
    other: np.ndarray  # uint8 (H, W, 3) RGB, a frame of clip ``other_clip`` (another identity)
    identity: str  # identity name of source/target (RealClips.identity_index maps it to int)
    other_identity: str  # != identity
    clip: int
    other_clip: int
    source_frame: int
    target_frame: int


class RealClips:
    """The clips of a prepared dataset, indexed 0..num_clips-1 in manifest order."""

    def __init__(self, out_dir: Path | str, cache_clips: int = 8):
        self.manifest = Manifest.load(Path(out_dir))
        if not self.manifest.clips:
            raise UserError(
                f"{out_dir} has no clips (see its report.json for what was dropped and why)"
            )
        self.identities: list[str] = self.manifest.identities
        self.identity_index = {name: i for i, name in enumerate(self.identities)}
        self.clip_identity = np.array(
            [self.identity_index[c["identity"]] for c in self.manifest.clips]
        )
        # Clips per identity, to sample identities uniformly whatever their clip count.
        self._by_identity = [
            np.flatnonzero(self.clip_identity == i) for i in range(len(self.identities))
        ]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_clips = max(1, cache_clips)

    @property
    def num_clips(self) -> int:
        return len(self.manifest.clips)

    def __len__(self) -> int:
        return self.num_clips

    def record(self, i: int) -> dict:
        """The clip's manifest record (crop box, frame range, yaw and blur stats, ...)."""
        return self.manifest.clips[i]

    def clip_frames(self, i: int) -> np.ndarray:
        """uint8 (T, H, W, 3) RGB frames of clip ``i``; the returned array is shared with the
        cache, so treat it as read-only."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        frames = read_clip_frames(self.manifest.clip_path(i))
        frames.flags.writeable = False
        self._cache[i] = frames
        while len(self._cache) > self._cache_clips:
            self._cache.popitem(last=False)
        return frames

    def clip_audio(self, i: int) -> np.ndarray | None:
        """float32 mono audio of clip ``i`` at its ``sample_rate`` (16 kHz), exactly
        ``num_frames * sample_rate / fps`` samples long; None when the source had none."""
        rec = self.manifest.clips[i]
        if not rec.get("has_audio"):
            return None
        num = round(rec["num_frames"] * rec["sample_rate"] / rec["fps"])
        return read_clip_audio(self.manifest.clip_path(i), num, rec["sample_rate"])

    def sample_pair(self, rng: np.random.Generator) -> RealPair:
        """Identity uniformly, then one of its clips, then two different frames of that clip;
        ``other`` is a random frame of a random clip of a different identity."""
        if len(self.identities) < 2:
            raise UserError(
                "sample_pair needs clips of at least 2 identities for the negative frame; "
                f"this dataset has {len(self.identities)}"
            )
        ident = int(rng.integers(len(self.identities)))
        clip = int(rng.choice(self._by_identity[ident]))
        frames = self.clip_frames(clip)
        t = len(frames)
        src = int(rng.integers(t))
        # A different frame when the clip has more than one (it always does in practice).
        tgt = int((src + 1 + rng.integers(t - 1)) % t) if t > 1 else src
        other_ident = int(
            (ident + 1 + rng.integers(len(self.identities) - 1)) % len(self.identities)
        )
        other_clip = int(rng.choice(self._by_identity[other_ident]))
        other_frames = self.clip_frames(other_clip)
        return RealPair(
            source=frames[src],
            target=frames[tgt],
            other=other_frames[int(rng.integers(len(other_frames)))],
            identity=self.identities[ident],
            other_identity=self.identities[other_ident],
            clip=clip,
            other_clip=other_clip,
            source_frame=src,
            target_frame=tgt,
        )
