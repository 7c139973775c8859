"""Windowed motion generation, shared by offline rendering and streaming (ARCHITECTURE.md §4).

Timeline in video frames (25 fps, 640 samples each). Window i generates the W new frames
[s, s + W) with s = i·W. Its inputs:

- audio: the video frames [s - C, s + W + L) ("segment": C context frames, the window, L
  look-ahead frames), as F feature frames per video frame. Frames before 0 are the feature row
  of digital silence (``engine.audio.silence_feature_row``); the window is ready as soon as the
  input holds (s + W + L)·640 samples. The speech encoder and variance adapter run over this
  segment only, so nothing beyond the look-ahead can change the window.
- known prefix: the K frames [s - K, s) already emitted. The denoiser runs on the K + W frames
  [s - K, s + W) with known_mask = 1 on the prefix (the prefix α's are inpainted by the sampler
  and given to the network through its "known" input) and 0 on the W new frames. Before K
  frames exist (the first windows), the missing prefix frames are the reference α: the stream
  starts as if the avatar had held the portrait's pose for K frames, and they count as known
  (mask 1). Training should therefore also show prefixes of the reference α repeated.
- reference α and h of the portrait (fixed per session), the per-frame controls of the segment
  frames, and the window's noise, (K + W, motion_dim), drawn from (seed, i) alone
  (``window_noise``), so chunking cannot change it, and scaled by ``stage2.noise_scale`` (the
  sampling temperature).

``generate_window`` is a pure function of these inputs. ``generate_offline`` loops it over a
whole clip; ``MotionStreamer`` runs the same calls as audio arrives, feeding a ``LogMelStream``.
Given the same audio, seed and controls both produce bit-identical α's on CPU. Offline rendering
pads the audio with zeros up to what the last window's look-ahead needs
(``offline_features``); a stream that ends does the same (``MotionStreamer.finish``).

Non-incremental front ends (HuBERT) cannot be computed once for the whole clip and then
streamed: use ``window_audio`` to cut each window's samples and compute features per segment,
both offline and live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.audio import (
    SAMPLES_PER_FRAME,
    AudioFrontend,
    LogMelFrontend,
    LogMelStream,
    silence_feature_row,
)
from engine.config import AudioConfig, Stage2Config
from engine.diffusion import AlphaNormalizer, DiffusionSchedule, ddim_sample
from engine.errors import UserError
from engine.session_api import Controls

CONTROL_DIM = 5  # location, scale, yaw, pitch, roll (engine.models.stage2.CONTROL_ATTRIBUTES)
CONTROL_MASKS = 3


class Stage2Backend(Protocol):
    """What windowing needs from a backend (``engine.models.stage2.Stage2Nets`` is one)."""

    motion_dim: int
    normalizer: AlphaNormalizer

    def encode(
        self, feats: torch.Tensor, control_values: torch.Tensor, control_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        speech: torch.Tensor,
        ref_alpha: torch.Tensor,
        ref_h: torch.Tensor,
        known: torch.Tensor,
        known_mask: torch.Tensor,
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# Plan: which frames, features and samples window i needs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowPlan:
    """Window geometry. All ``*_frames`` are video frames (25 fps)."""

    window_frames: int  # W, new frames per window
    prefix_frames: int  # K, known already-emitted frames given to the denoiser
    lookahead_frames: int  # L, audio after the window the speech encoder may see
    context_frames: int  # C >= K, audio before the window the speech encoder sees
    feature_frames_per_video_frame: int = 4  # F
    samples_per_frame: int = SAMPLES_PER_FRAME

    def __post_init__(self) -> None:
        if self.window_frames < 1:
            raise UserError(f"stage2.window_frames must be >= 1, got {self.window_frames}")
        if min(self.prefix_frames, self.lookahead_frames, self.context_frames) < 0:
            raise UserError("stage2 prefix/lookahead/context frames must be >= 0")
        if self.context_frames < self.prefix_frames:
            raise UserError(
                f"stage2.audio_context_frames ({self.context_frames}) must be >= "
                f"stage2.prefix_frames ({self.prefix_frames}): the prefix frames need speech"
            )
        if self.feature_frames_per_video_frame < 1:
            raise UserError("feature frames per video frame must be >= 1")

    @classmethod
    def from_config(cls, cfg: Stage2Config, feature_frames_per_video_frame: int) -> WindowPlan:
        if cfg.fps * SAMPLES_PER_FRAME != cfg.audio.sample_rate:
            raise UserError("stage2.fps must be 25 with 16 kHz audio (640 samples per frame)")
        return cls(
            cfg.window_frames,
            cfg.prefix_frames,
            cfg.lookahead_frames,
            cfg.audio_context_frames,
            feature_frames_per_video_frame,
        )

    @property
    def segment_frames(self) -> int:
        """C + W + L: video frames of audio one window's encoder sees."""
        return self.context_frames + self.window_frames + self.lookahead_frames

    @property
    def denoise_frames(self) -> int:
        """K + W: frames the denoiser runs on."""
        return self.prefix_frames + self.window_frames

    @property
    def latency_frames(self) -> int:
        """Frames between a sample arriving and its window becoming computable, worst case."""
        return self.window_frames + self.lookahead_frames

    @property
    def latency_samples(self) -> int:
        """``latency_frames`` in input samples (compute and pacing not included)."""
        return self.latency_frames * self.samples_per_frame

    def start_frame(self, i: int) -> int:
        return i * self.window_frames

    def segment(self, i: int) -> tuple[int, int]:
        """Video frames [lo, hi) of window i's audio segment (lo may be negative)."""
        s = self.start_frame(i)
        return s - self.context_frames, s + self.window_frames + self.lookahead_frames

    def feature_span(self, i: int) -> tuple[int, int]:
        """Feature frames [lo, hi) of window i's segment (lo may be negative)."""
        lo, hi = self.segment(i)
        f = self.feature_frames_per_video_frame
        return lo * f, hi * f

    def samples_needed(self, i: int) -> int:
        """Input samples that must have arrived before window i can run."""
        return self.segment(i)[1] * self.samples_per_frame

    def windows_ready(self, n_samples: int) -> int:
        """How many windows (0, 1, ...) the first ``n_samples`` input samples complete."""
        frames = n_samples // self.samples_per_frame - self.window_frames - self.lookahead_frames
        return 0 if frames < 0 else frames // self.window_frames + 1

    def num_windows(self, n_frames: int) -> int:
        """Windows needed to cover ``n_frames`` output frames."""
        return math.ceil(n_frames / self.window_frames)

    def total_samples(self, n_frames: int) -> int:
        """Samples (input zero-padded) that cover every window of an ``n_frames`` clip."""
        n = self.num_windows(n_frames)
        return self.samples_needed(n - 1) if n else 0


# --------------------------------------------------------------------------------------------
# Inputs of one window
# --------------------------------------------------------------------------------------------
def window_noise(seed: int, index: int, n_frames: int, dim: int) -> torch.Tensor:
    """Standard normal (n_frames, dim) float32 for window ``index``, a function of (seed, index)
    only (never of chunking or of how many windows ran before)."""
    if seed < 0 or index < 0:
        raise ValueError("seed and window index must be >= 0")
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed((int(hi) << 32) | int(lo))
    return torch.randn(n_frames, dim, generator=g)


def segment_features(
    feats: torch.Tensor, first_index: int, plan: WindowPlan, i: int, pad_row: torch.Tensor
) -> torch.Tensor:
    """Window i's audio features, (F·(C + W + L), D).

    feats: (T, D) feature frames with absolute indices first_index .. first_index + T - 1 (a
    stream may have dropped older ones). Frames before index 0 are ``pad_row`` (D,).
    """
    lo, hi = plan.feature_span(i)
    if hi > first_index + feats.shape[0] or max(lo, 0) < first_index:
        raise ValueError(
            f"window {i} needs feature frames [{lo}, {hi}), have "
            f"[{first_index}, {first_index + feats.shape[0]})"
        )
    parts = []
    if lo < 0:
        parts.append(pad_row.to(feats.dtype).expand(-lo, -1))
    parts.append(feats[max(lo, 0) - first_index : hi - first_index])
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def window_audio(samples: np.ndarray, plan: WindowPlan, i: int) -> np.ndarray:
    """Window i's input samples [(s - C)·640, (s + W + L)·640), zeros before sample 0 (for
    front ends that are computed per segment). samples: (N,) float32, N >= samples_needed(i)."""
    lo, hi = (f * plan.samples_per_frame for f in plan.segment(i))
    if hi > samples.shape[0]:
        raise ValueError(f"window {i} needs {hi} samples, have {samples.shape[0]}")
    head = np.zeros(max(0, -lo), np.float32)
    return np.concatenate([head, samples[max(lo, 0) : hi].astype(np.float32)])


def prefix_alpha(history: torch.Tensor, ref_alpha: torch.Tensor, prefix_frames: int):
    """The K known α's before a window: the last K emitted ones, the reference α in front while
    fewer than K exist. history: (n, motion_dim) raw; ref_alpha: (motion_dim,) raw.
    Returns (K, motion_dim)."""
    n = min(history.shape[0], prefix_frames)
    tail = history[history.shape[0] - n :]
    fill = ref_alpha.to(history.dtype).reshape(1, -1).expand(prefix_frames - n, -1)
    return torch.cat([fill, tail], dim=0)


def control_vectors(controls: Controls | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Controls`` -> (values (5,), mask (3,)) in the adapter's units: location as is, scale
    relative to the reference frame, pose degrees / 90; unset attributes get mask 0."""
    values = torch.zeros(CONTROL_DIM)
    mask = torch.zeros(CONTROL_MASKS)
    if controls is None:
        return values, mask
    if controls.location is not None:
        values[0], mask[0] = float(controls.location), 1.0
    if controls.scale is not None:
        values[1], mask[1] = float(controls.scale), 1.0
    if controls.pose_deg is not None:
        if len(controls.pose_deg) != 3:
            raise UserError("pose_deg must be (yaw, pitch, roll) in degrees")
        values[2:5] = torch.tensor([float(v) / 90.0 for v in controls.pose_deg])
        mask[2] = 1.0
    if not torch.isfinite(values).all():
        raise UserError("controls must be finite numbers")
    return values, mask


class ControlTrack:
    """Controls per absolute video frame: a list of changes, each in force from its frame on.

    A change at frame <= 0 also covers the padding frames before the stream start. Offline and
    streaming read the same track, so live control changes reproduce offline.
    """

    def __init__(self) -> None:
        self._changes: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def set(self, from_frame: int, controls: Controls | None, keep_from: int | None = None) -> None:
        """Controls in force from ``from_frame`` (a stream: the first frame not yet generated).

        keep_from: the earliest frame any future segment can still read (a stream: the next
        window's segment start); older changes that a later one fully supersedes are dropped,
        so an hour of slider moves does not make the track grow without bound."""
        values, mask = control_vectors(controls)
        self._changes = [c for c in self._changes if c[0] < from_frame]
        self._changes.append((from_frame, values, mask))
        if keep_from is not None:
            starts = [c[0] for c in self._changes]
            # change k is needed while its successor starts after keep_from
            self._changes = [
                c
                for k, c in enumerate(self._changes)
                if k + 1 == len(starts) or starts[k + 1] > keep_from
            ]

    def move_pending(self, to_frame: int) -> None:
        """Changes scheduled after ``to_frame`` take effect at ``to_frame`` instead (after an
        interrupt the timeline resumes at the played position; the latest change wins)."""
        later = [c for c in self._changes if c[0] > to_frame]
        if later:
            self._changes = [c for c in self._changes if c[0] < to_frame]
            self._changes.append((to_frame, later[-1][1], later[-1][2]))

    def __len__(self) -> int:
        return len(self._changes)

    def segment(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [lo, hi) -> (values (hi - lo, 5), mask (hi - lo, 3))."""
        values = torch.zeros(hi - lo, CONTROL_DIM)
        mask = torch.zeros(hi - lo, CONTROL_MASKS)
        for k, (start, v, m) in enumerate(self._changes):
            a = lo if start <= 0 else max(lo, start)
            b = hi if k + 1 == len(self._changes) else min(hi, self._changes[k + 1][0])
            if a < b:
                values[a - lo : b - lo] = v
                mask[a - lo : b - lo] = m
        return values, mask


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_window(
    nets: Stage2Backend,
    plan: WindowPlan,
    feats_segment: torch.Tensor,
    prefix: torch.Tensor,
    ref_alpha: torch.Tensor,
    ref_h: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    schedule: DiffusionSchedule,
    controls: tuple[torch.Tensor, torch.Tensor] | None = None,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    guidance: float = 0.0,
) -> torch.Tensor:
    """One window of motion; a pure function of its inputs.

    feats_segment: (F·(C + W + L), D) audio features of the segment (``segment_features``).
    prefix: (K, motion_dim) raw α of the K frames before the window (``prefix_alpha``).
    ref_alpha: (motion_dim,) raw α of the portrait; ref_h: (latent_dim,) its latent h.
    noise: (K + W, motion_dim) standard normal (``window_noise``).
    controls: (values (C + W + L, 5), mask (C + W + L, 3)) for the segment frames, or None.
    guidance: control guidance g (``stage2.control_guidance``): where a control is given, each
    denoiser call returns eps(c) + g * (eps(c) - eps(c_pred)); 0 or no control: one pass.
    Returns the W new frames' raw α, (W, motion_dim), on feats_segment's device.
    """
    k, w, c, s = plan.prefix_frames, plan.window_frames, plan.context_frames, plan.segment_frames
    dev = feats_segment.device
    if feats_segment.shape[0] != s * plan.feature_frames_per_video_frame:
        raise ValueError(
            f"feats_segment has {feats_segment.shape[0]} frames, the plan needs "
            f"{s * plan.feature_frames_per_video_frame}"
        )
    if prefix.shape[0] != k or noise.shape[0] != k + w:
        raise ValueError(f"prefix must have {k} frames and noise {k + w}")
    if controls is None:
        values, mask = torch.zeros(s, CONTROL_DIM), torch.zeros(s, CONTROL_MASKS)
    else:
        values, mask = controls
    speech, _ = nets.encode(feats_segment[None], values[None].to(dev), mask[None].to(dev))
    speech = speech[:, c - k : c + w]  # (1, K + W, d): the denoiser's frames [s - K, s + W)
    norm = nets.normalizer
    dim = noise.shape[1]
    known = torch.cat([norm.normalize(prefix.to(dev)), torch.zeros(w, dim, device=dev)])[None]
    known_mask = torch.cat([torch.ones(k, 1), torch.zeros(w, 1)]).to(dev)[None]
    ref_a = norm.normalize(ref_alpha.to(dev)).reshape(1, -1)
    ref_h = ref_h.to(dev).reshape(1, -1)

    free = None
    if guidance > 0 and bool(mask.any()):
        # the same segment with every control left to the adapter's own predictions
        free, _ = nets.encode(feats_segment[None], values[None].to(dev), 0 * mask[None].to(dev))
        free = free[:, c - k : c + w]

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = nets.denoise(x_t, t, speech, ref_a, ref_h, known, known_mask)
        if free is None:
            return eps
        eps_free = nets.denoise(x_t, t, free, ref_a, ref_h, known, known_mask)
        return eps + guidance * (eps - eps_free)

    x0 = ddim_sample(denoise, noise.to(dev)[None], schedule, steps, clamp, known, known_mask)
    return norm.denormalize(x0[0, k:])


def offline_features(
    frontend: AudioFrontend, samples: np.ndarray, plan: WindowPlan
) -> tuple[torch.Tensor, int]:
    """Features of a whole clip for ``generate_offline``: the audio is zero-padded to what the
    last window's look-ahead needs (as a finished stream is). samples: (N,) float32 16 kHz.
    Returns (features (T_feat, D), n_frames = ceil(N / 640))."""
    if not frontend.incremental:
        raise UserError("offline_features needs an incremental front end (log-mel)")
    n_frames = math.ceil(samples.shape[0] / plan.samples_per_frame)
    total = plan.total_samples(n_frames)
    padded = np.zeros(max(total, samples.shape[0]), np.float32)
    padded[: samples.shape[0]] = samples
    return frontend.features(padded), n_frames


@torch.no_grad()
def generate_offline(
    nets: Stage2Backend,
    plan: WindowPlan,
    feats: torch.Tensor,
    ref_alpha: torch.Tensor,
    ref_h: torch.Tensor,
    n_frames: int,
    *,
    seed: int,
    steps: int,
    schedule: DiffusionSchedule,
    pad_row: torch.Tensor,
    controls: ControlTrack | None = None,
    noise_scale: float = 1.0,
    control_guidance: float = 0.0,
) -> torch.Tensor:
    """Motion for a whole clip, window by window exactly as a stream would.

    feats: (T_feat, D) features from sample 0, covering ``plan.total_samples(n_frames)`` samples
    (``offline_features``). pad_row: (D,) silence features for frames before the start.
    noise_scale: the sampling temperature (``stage2.noise_scale``); control_guidance:
    ``stage2.control_guidance`` (``generate_window``'s guidance).
    Returns raw α, (n_frames, motion_dim).
    """
    runner = _WindowRunner(
        nets,
        plan,
        ref_alpha,
        ref_h,
        seed,
        steps,
        schedule,
        pad_row,
        controls,
        noise_scale,
        control_guidance,
    )
    emitted: list[torch.Tensor] = []
    history = torch.zeros(0, ref_alpha.shape[-1], device=feats.device)
    for i in range(plan.num_windows(n_frames)):
        alpha = runner.run(i, feats, 0, history)
        emitted.append(alpha)
        history = torch.cat([history, alpha])[-max(plan.prefix_frames, 1) :]
    if not emitted:
        return torch.zeros(0, ref_alpha.shape[-1])
    return torch.cat(emitted)[:n_frames]


@dataclass
class _WindowRunner:
    """What is fixed for a whole clip or stream; ``run`` is the one per-window code path that
    ``generate_offline`` and ``MotionStreamer`` share."""

    nets: Stage2Backend
    plan: WindowPlan
    ref_alpha: torch.Tensor
    ref_h: torch.Tensor
    seed: int
    steps: int
    schedule: DiffusionSchedule
    pad_row: torch.Tensor
    controls: ControlTrack | None
    noise_scale: float = 1.0
    control_guidance: float = 0.0

    def run(
        self, i: int, feats: torch.Tensor, first_index: int, history: torch.Tensor
    ) -> torch.Tensor:
        """Window i from features indexed from ``first_index`` and the emitted α history."""
        plan = self.plan
        seg = segment_features(feats, first_index, plan, i, self.pad_row)
        prefix = prefix_alpha(history, self.ref_alpha.to(history.device), plan.prefix_frames)
        # × 1.0 is exact: the plain sampler's noise is unchanged
        noise = window_noise(self.seed, i, plan.denoise_frames, self.ref_alpha.shape[-1])
        noise = noise * self.noise_scale
        ctrl = self.controls.segment(*plan.segment(i)) if self.controls is not None else None
        return generate_window(
            self.nets,
            plan,
            seg,
            prefix,
            self.ref_alpha,
            self.ref_h,
            noise,
            steps=self.steps,
            schedule=self.schedule,
            controls=ctrl,
            guidance=self.control_guidance,
        )


class MotionStreamer:
    """Live driver: push 16 kHz audio in any chunks, get each α window as soon as its audio
    (window + look-ahead) is in. State: the log-mel stream, the features still needed, the last
    K emitted α's and the next window index; ``reset`` is a fresh streamer.
    """

    def __init__(
        self,
        nets: Stage2Backend,
        plan: WindowPlan,
        ref_alpha: torch.Tensor,
        ref_h: torch.Tensor,
        *,
        seed: int,
        steps: int,
        schedule: DiffusionSchedule,
        audio_cfg: AudioConfig | None = None,
        pad_row: torch.Tensor | None = None,
        controls: ControlTrack | None = None,
        noise_scale: float = 1.0,
        control_guidance: float = 0.0,
    ) -> None:
        self.plan = plan
        self.ref_alpha = ref_alpha
        self.audio_cfg = audio_cfg or AudioConfig()
        if pad_row is None:
            pad_row = silence_feature_row(LogMelFrontend(self.audio_cfg))
        self.pad_row = pad_row
        self.runner = _WindowRunner(
            nets,
            plan,
            ref_alpha,
            ref_h,
            seed,
            steps,
            schedule,
            pad_row,
            controls,
            noise_scale,
            control_guidance,
        )
        self.reset()

    def reset(self) -> None:
        self.mel = LogMelStream(self.audio_cfg)
        self.feats = torch.zeros(0, self.pad_row.shape[0])
        self.feats_first = 0  # absolute feature index of self.feats[0]
        self.next_window = 0
        self.history = torch.zeros(0, self.ref_alpha.shape[-1])

    @property
    def next_frame(self) -> int:
        """First video frame not generated yet (where a control change takes effect)."""
        return self.plan.start_frame(self.next_window)

    def push_audio(self, samples: np.ndarray) -> list[torch.Tensor]:
        """samples: (n,) float32 mono 16 kHz. Returns the windows that became ready, each
        (W, motion_dim) raw α for frames [s, s + W), in order."""
        new = torch.from_numpy(self.mel.push(samples))
        self.feats = torch.cat([self.feats, new]) if new.shape[0] else self.feats
        out = []
        while self.plan.samples_needed(self.next_window) <= self.mel.samples_seen:
            alpha = self.runner.run(self.next_window, self.feats, self.feats_first, self.history)
            out.append(alpha)
            self.history = torch.cat([self.history, alpha])[-max(self.plan.prefix_frames, 1) :]
            self.next_window += 1
            self._drop_old_features()
        return out

    def finish(self) -> list[torch.Tensor]:
        """End of audio: pad with silence until every frame that holds input audio is covered
        (what ``offline_features`` does). The caller keeps the first ceil(N / 640) frames."""
        n_frames = math.ceil(self.mel.samples_seen / self.plan.samples_per_frame)
        missing = self.plan.total_samples(n_frames) - self.mel.samples_seen
        return self.push_audio(np.zeros(max(missing, 0), np.float32))

    def _drop_old_features(self) -> None:
        keep_from = max(self.plan.feature_span(self.next_window)[0], 0)
        if keep_from > self.feats_first:
            self.feats = self.feats[keep_from - self.feats_first :]
            self.feats_first = keep_from
