"""The streaming engine: shared weights, cheap per-session state, frames with pts out.

    engine = Engine.load()                          # weights once (bundled by default)
    session = engine.session(engine.prepare_avatar(rgb), seed=0)
    session.push_audio(pcm, 48000)                  # any chunk size, rate, int16/float
    for frame in session.pull(): send(frame.image, frame.audio, frame.pts_samples)

Pipeline per session (ARCHITECTURE.md §6, STREAMING.md):

    push_audio -> mono float -> stateful resampler (PyAV) -> 16 kHz timeline
      -> MotionStreamer (log-mel, window ready once its audio + look-ahead is in,
         speech encoder + adapter, DDIM over the known prefix) -> α window (W frames)
      -> renderer, one batch of W frames against the avatar's cached h and feature pyramid
      -> OutputFrame(pts = n·640, image, the 640 input samples of frame n) -> bounded queue
      -> pull()

Streaming == offline: the motion comes from ``engine.windowing`` (each window a pure function
of its audio segment, prefix, noise(seed, window) and controls; the log-mel stream is chunking
invariant), each window is rendered in one batch of exactly its W frames, and incoming audio
is split at window boundaries so every window runs the same calls whatever the chunking. The
offline renderer (``engine.render``) is this session fed a whole file. At 16 kHz no resampling
happens, so the result is bit-identical on the PyTorch CPU backend; other rates go through one
stateful resampler per session, which PyAV/libswresample makes chunking invariant too.

Audio is never dropped or stretched: each frame carries exactly its 640 input samples, so the
output audio is the input delayed by the engine's latency. A consumer that stops pulling loses
*video* only: past ``stream.output_queue_frames`` queued frames the oldest give up their image
(they repeat the image before them; ``dropped_frames`` counts them) but keep their audio and
pts, so the played audio stays continuous. Frames that would lose their image before they are
even pulled are not rendered at all. Un-pulled audio is bounded too: a push that would take
the backlog past ``stream.max_backlog_s`` is refused with a UserError (pull, or interrupt).
A live deployment on a slow machine may set ``stream.render_deadline_ms``: a window whose images
would be done more than that after its newest audio came in (``push_audio``'s or
``push_silence``'s ``arrived``, or the push; the wait so far plus the recent render time) is
not rendered (video repeats, audio and motion go on), so the stream catches up instead of
falling further behind. With ``stream.fast_draft`` and a trained draft exit
(``stage1.fast_head``) a window that a full render would make late but the draft would not is
drawn by the draft instead (frames marked ``fast``; ``frames_fast`` counts them). The deadline
is off by default, since it makes the output depend on timing; ``livehead serve``'s rooms use
``server.render_deadline_ms`` (on by default), counted from the media clock's schedule.

Interrupt (barge-in) drops everything not yet pulled (queued frames, pending input audio and
features, generated motion) and returns the position of the next unplayed sample; new audio
continues the timeline from there. Motion stays continuous: the next windows take the last K
*pulled* α's as their known prefix. They start a new "epoch": a fresh feature stream (silence
before it), window noise from (seed, epoch), controls read at the absolute frame.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.audio import LogMelFrontend, silence_feature_row
from engine.backends import (
    Stage1Backend,
    TimedStage2,
    check_device,
    make_backends,
)
from engine.config import (
    Config,
    ServerConfig,
    check_sampling,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)
from engine.diffusion import DiffusionSchedule
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.models.stage2 import Stage2Nets
from engine.session_api import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, Controls, OutputFrame
from engine.tensors import to_tensor, to_uint8
from engine.windowing import ControlTrack, MotionStreamer, Stage2Backend, WindowPlan

# Under a render deadline, the draft exit (stage1.fast_head) is used only where it would be
# done this much before the deadline: drawn right up to it, the stream runs at the edge and a
# slower draft stalls the clock (measured: livehead serve on 2 cores, BENCHMARKS.md).
FAST_MARGIN_S = 0.03
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 192000
MAX_CHANNELS = 32
# Stage-2 keys that only change how windows are cut and sampled, not the networks' shapes: a
# run may set them; every other stage1/stage2 key is fixed by the weights.
RUNTIME_STAGE2_KEYS = frozenset(
    {
        "sample_steps",
        "noise_scale",
        "control_guidance",
        "window_frames",
        "prefix_frames",
        "lookahead_frames",
        "audio_context_frames",
    }
)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def runtime_config(model_cfg: Config, base: Config, overrides: list[str] | None = None) -> Config:
    """The config a run uses: the networks' sections (stage1, stage2) from the weights
    (``model_cfg``), everything else and the runtime stage-2 keys from ``base``, then
    ``overrides`` ("key=value"); an override of a key the weights fix is a UserError."""
    data = to_dict(base)
    data["stage1"] = to_dict(model_cfg.stage1)
    s2 = to_dict(model_cfg.stage2)
    for k in RUNTIME_STAGE2_KEYS:
        s2[k] = getattr(base.stage2, k)
    data["stage2"] = s2
    fixed = {"stage1": data["stage1"], "stage2": {k: v for k, v in s2.items()}}
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    cfg = from_dict(data, where="overrides")
    for section in ("stage1", "stage2"):
        now = to_dict(getattr(cfg, section))
        for k, v in fixed[section].items():
            if section == "stage2" and k in RUNTIME_STAGE2_KEYS:
                continue
            if now[k] != v:
                allowed = ", ".join(f"stage2.{x}" for x in sorted(RUNTIME_STAGE2_KEYS))
                raise UserError(
                    f"{section}.{k} is fixed by the weights ({v!r}); only {allowed} and the "
                    "non-model sections can change at run time"
                )
    return cfg


def plan_dict(cfg: Config) -> dict[str, int]:
    """The window plan of ``cfg`` as plain numbers (the shapes exported stage-2 graphs have)."""
    fpv = LogMelFrontend(cfg.stage2.audio).frames_per_video_frame
    return dataclasses.asdict(WindowPlan.from_config(cfg.stage2, fpv))


def _is_real(v: object) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def validate_controls(controls: Controls) -> Controls:
    """Range checks (UserError): pose within ±90°, location in [-1, 1], scale in (0, 4]."""
    if not isinstance(controls, Controls):
        raise UserError(f"controls must be engine.session_api.Controls, got {type(controls)}")
    if controls.pose_deg is not None:
        pose = tuple(controls.pose_deg)
        if len(pose) != 3:
            raise UserError("pose must be (yaw, pitch, roll) in degrees")
        for name, v in zip(("yaw", "pitch", "roll"), pose):
            if not _is_real(v) or not math.isfinite(v) or abs(v) > 90:
                raise UserError(f"pose {name} must be a number of degrees in [-90, 90], got {v!r}")
    if controls.location is not None and not (
        _is_real(controls.location) and -1.0 <= controls.location <= 1.0
    ):
        raise UserError(
            f"location must be in [-1, 1] (x of the nose tip), got {controls.location!r}"
        )
    if controls.scale is not None and not (
        _is_real(controls.scale) and 0.0 < controls.scale <= 4.0
    ):
        raise UserError(f"scale must be in (0, 4] (1 = the avatar's own), got {controls.scale!r}")
    return controls


# --------------------------------------------------------------------------------------------
# Engine: weights shared by every session
# --------------------------------------------------------------------------------------------
@dataclass
class Avatar:
    """A portrait, encoded once and reused for every frame.

    image: (S, S, 3) uint8, the portrait as the model sees it (square crop, resized).
    h, feats: the encoder's latent (1, latent_dim) and feature pyramid, on the backend device.
    ref_h: (latent_dim,) and ref_alpha: (motion_dim,) float32 CPU, stage 2's reference.
    source: (1, 3, S, S) float32 CPU in [-1, 1], the image as the encoder (and the draft exit,
    ``render_fast``) reads it."""

    image: np.ndarray
    h: torch.Tensor
    feats: list[torch.Tensor]
    ref_h: torch.Tensor
    ref_alpha: torch.Tensor
    source: torch.Tensor


class Engine:
    """Shared, read-only after construction: stage-1 and stage-2 runners, window plan,
    diffusion schedule and config. ``session()`` is cheap; sessions never touch each other."""

    def __init__(
        self,
        stage1: Stage1Backend,
        stage2: Stage2Backend,
        cfg: Config,
        info: dict[str, Any] | None = None,
    ) -> None:
        s2 = cfg.stage2
        if s2.audio.frontend != "logmel":
            raise UserError(
                f"the streaming engine needs the incremental 'logmel' front end; these weights "
                f"use '{s2.audio.frontend}'"
            )
        if stage1.motion_dim != stage2.motion_dim:
            raise UserError(
                f"stage 1 has motion_dim {stage1.motion_dim}, stage 2 {stage2.motion_dim}: "
                "use the stage-1 weights stage 2 was trained on"
            )
        check_sampling(s2)
        st = cfg.stream
        if st.output_queue_frames < s2.window_frames:
            raise UserError(
                f"stream.output_queue_frames ({st.output_queue_frames}) must hold at least one "
                f"window ({s2.window_frames} frames)"
            )
        if st.max_push_s <= 0 or st.max_backlog_s < st.max_push_s:
            raise UserError("need 0 < stream.max_push_s <= stream.max_backlog_s")
        self.cfg = cfg
        self.stage1 = stage1
        self.stage2 = stage2
        self.frontend = LogMelFrontend(s2.audio)
        self.plan = WindowPlan.from_config(s2, self.frontend.frames_per_video_frame)
        self.schedule = DiffusionSchedule.linear(s2.timesteps, s2.beta_start, s2.beta_end)
        self.pad_row = silence_feature_row(self.frontend)
        self.image_size = stage1.image_size
        self.info = dict(info or {})
        self._default_avatar: Avatar | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        stage1: str | Path | None = None,
        stage2: str | Path | None = None,
        *,
        config: Config | str | Path | None = None,
        overrides: list[str] | None = None,
        backend: str | None = None,
        device: str | None = None,
        threads: int | None = None,
    ) -> Engine:
        """Load weights (default: the bundled ones in weights/). The networks' config comes
        from the weights; ``config`` (a Config, a name in configs/ or a .toml) supplies the
        rest (stream, server, the runtime stage-2 keys; default: the stage-2 file's own), then
        ``overrides``. backend/device/threads default to the config's ``stream`` section."""
        from engine.loading import load_stage1, load_stage2
        from engine.weights import DEFAULT_STAGE1, DEFAULT_STAGE2

        for given, default, stage in ((stage1, DEFAULT_STAGE1, 1), (stage2, DEFAULT_STAGE2, 2)):
            if given is None and not default.exists():
                raise UserError(
                    f"no bundled stage-{stage} weights at {default}. Train them with "
                    "'livehead train stage1 --config tiny', then 'livehead train stage2 "
                    "--config tiny', and copy runs/stage1/stage1.safetensors and "
                    "runs/stage2/stage2.safetensors to weights/stage1_tiny.safetensors and "
                    "weights/stage2_tiny.safetensors (or pass files with --stage1 / --checkpoint)"
                )
        m1, cfg1, meta1 = load_stage1(stage1)
        nets, cfg2, meta2 = load_stage2(stage2, stage1=cfg1.stage1)
        if config is None:
            base = cfg2
        elif isinstance(config, Config):
            base = config
        else:
            base = load_config(config)
        model_cfg = from_dict(dict(to_dict(cfg2), stage1=to_dict(cfg1.stage1)))
        cfg = runtime_config(model_cfg, base, overrides)
        info = {
            "weights": "trained",
            "stage1": str(stage1 or DEFAULT_STAGE1),
            "stage2": str(stage2 or DEFAULT_STAGE2),
            "stage1_meta": meta1,
            "stage2_meta": meta2,
        }
        return cls.from_models(
            m1, nets, cfg, backend=backend, device=device, threads=threads, info=info
        )

    @classmethod
    def from_models(
        cls,
        stage1: Stage1Model,
        stage2: Stage2Nets,
        cfg: Config,
        *,
        backend: str | None = None,
        device: str | None = None,
        threads: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> Engine:
        """Wrap in-memory networks (tests, benchmarks, training-time previews)."""
        st = cfg.stream
        backend = backend or st.backend
        device = device or st.device
        threads = st.threads if threads is None else threads
        if threads < 0:
            raise UserError(f"threads must be >= 0, got {threads}")
        if threads:
            torch.set_num_threads(threads)
        check_device(device)
        if stage1.cfg.latent_dim != stage2.latent_dim:
            raise UserError(
                f"stage 1 has latent_dim {stage1.cfg.latent_dim}, stage 2 expects "
                f"{stage2.latent_dim}: use the stage-1 weights stage 2 was trained on"
            )
        cfg = from_dict(
            dict(
                to_dict(cfg),
                stream=dict(to_dict(st), backend=backend, device=device, threads=threads),
            )
        )
        s1b, s2b, facts = make_backends(
            stage1,
            stage2,
            backend,
            device,
            st.render_dtype,
            st.channels_last,
            plan=plan_dict(cfg),
            onnx_dir=st.onnx_dir or None,
            threads=threads,
            cuda_graphs=st.cuda_graphs,
            fast=st.fast_draft,
        )
        return cls(s1b, s2b, cfg, dict(info or {}, backend=backend, **facts))

    @classmethod
    def random(cls, cfg: Config, seed: int = 0, **kwargs: Any) -> Engine:
        """Randomly initialised networks of ``cfg``'s sizes (benchmarks, tests)."""
        torch.manual_seed(seed)
        m1 = Stage1Model(cfg.stage1).eval()
        m1.lmd.freeze()
        nets = Stage2Nets.from_config(cfg).eval()
        info = dict(kwargs.pop("info", None) or {}, weights="random")
        return cls.from_models(m1, nets, cfg, info=info, **kwargs)

    # -- avatars and sessions -------------------------------------------------------------
    def prepare_avatar(self, rgb: np.ndarray) -> Avatar:
        """(H, W, 3) uint8 RGB, any size -> Avatar (centre square crop, resized, encoded)."""
        from engine.media import square_resize

        if (
            not isinstance(rgb, np.ndarray)
            or rgb.dtype != np.uint8
            or rgb.ndim != 3
            or rgb.shape[2] != 3
        ):
            raise UserError(
                f"avatar must be an (H, W, 3) uint8 RGB array, got {getattr(rgb, 'shape', rgb)!r}"
                f" {getattr(rgb, 'dtype', '')}"
            )
        if min(rgb.shape[:2]) < 16:
            raise UserError(f"avatar {rgb.shape[1]}x{rgb.shape[0]} is too small for a portrait")
        image = np.array(square_resize(rgb, self.image_size))  # own, writable copy
        source = to_tensor(image[None])
        h, feats = self.stage1.encode(source)
        alpha = self.stage1.motion(h)
        return Avatar(
            image=image,
            h=h,
            feats=feats,
            ref_h=h[0].detach().float().cpu().clone(),
            ref_alpha=alpha[0].detach().float().cpu().clone(),
            source=source,
        )

    def default_avatar(self) -> Avatar:
        """The bundled portrait (weights/avatar.png), encoded once per engine."""
        from engine.media import decode_image
        from engine.weights import DEFAULT_AVATAR

        if self._default_avatar is None:
            if not DEFAULT_AVATAR.is_file():
                raise UserError(f"no avatar given and no bundled portrait at {DEFAULT_AVATAR}")
            self._default_avatar = self.prepare_avatar(decode_image(DEFAULT_AVATAR))
        return self._default_avatar

    def session(
        self,
        avatar: Avatar | np.ndarray | None = None,
        seed: int = 0,
        controls: Controls | ControlTrack | None = None,
        live: bool = True,
        render_deadline_ms: float | None = None,
    ) -> StreamSession:
        """A new live session (``engine.session_api.Session``). ``avatar``: an Avatar, an RGB
        array, or None for the bundled portrait. ``controls``: fixed Controls, or a
        ControlTrack of per-frame controls (offline pose files; the session then owns it).
        ``live=False`` (offline rendering): never skip windows for a render deadline.
        ``render_deadline_ms``: this session's (None: ``stream.render_deadline_ms``)."""
        if avatar is None:
            avatar = self.default_avatar()
        elif not isinstance(avatar, Avatar):
            avatar = self.prepare_avatar(avatar)
        return StreamSession(
            self, avatar, seed, controls, live=live, render_deadline_ms=render_deadline_ms
        )

    def resolved_config(self) -> dict[str, Any]:
        return to_dict(self.cfg)


def server_render_deadline_ms(server: ServerConfig, window_frames: int = 2) -> float:
    """``server.render_deadline_ms``, with -1 resolved: the time a room gives a window between
    its newest audio being due in the session and its first frame's send time, (playout_frames
    + input_lead_frames) frames, less a 50 ms margin for encoding and sending (150 ms with the
    defaults; measured against 20 ms on a slow host, server/PROTOCOL.md), plus a frame for
    every frame a window has beyond two: skipping a long window freezes the picture for its
    whole length, so a long window would rather be a little late (the paper plan's 25-frame
    windows: 1070 ms)."""
    if server.render_deadline_ms >= 0:
        return float(server.render_deadline_ms)
    frames = server.playout_frames + server.input_lead_frames + max(0, window_frames - 2)
    return max(0.0, frames * 1000.0 / FPS - 50.0)


def make_session_factory(cfg: Config, engine: Engine | None = None):  # noqa: ANN201
    """For ``livehead serve`` (a ``server.app.SessionFactory``): ``make(avatar_rgb) -> Session``
    per room over one shared engine — ``engine``, or the bundled weights loaded here. ``cfg``
    supplies the stream/server sections and runtime stage-2 keys; each room's session has
    ``server.render_deadline_ms``."""
    if engine is None:
        engine = Engine.load(config=cfg)
    shared = engine
    deadline_ms = server_render_deadline_ms(cfg.server, engine.plan.window_frames)

    def make_session(avatar_rgb: np.ndarray) -> StreamSession:
        return shared.session(shared.prepare_avatar(avatar_rgb), render_deadline_ms=deadline_ms)

    return make_session


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------
def _arrival(arrived: float | None) -> float:
    """A push's time for the render deadline: ``arrived`` (when the audio was due), never
    later than now; None: now."""
    now = time.monotonic()
    return now if arrived is None else min(now, float(arrived))


def as_mono_float(samples: np.ndarray) -> np.ndarray:
    """(N,) or (N, C) int16 / float32 / float64 -> (N,) float32, clipped to [-1, 1].
    UserError for another type, shape or dtype, or NaN/inf."""
    if not isinstance(samples, np.ndarray):
        raise UserError(f"audio must be a numpy array, got {type(samples).__name__}")
    if samples.ndim == 2:
        if not 1 <= samples.shape[1] <= MAX_CHANNELS:
            raise UserError(
                f"audio (N, C) must have 1..{MAX_CHANNELS} channels, got {samples.shape}"
            )
    elif samples.ndim != 1:
        raise UserError(f"audio must have shape (N,) or (N, C), got {samples.shape}")
    if samples.dtype == np.int16:
        x = samples.astype(np.float32) / 32768.0
    elif samples.dtype in (np.float32, np.float64):
        if not np.all(np.isfinite(samples)):
            raise UserError("audio contains NaN or infinite values")
        x = samples.astype(np.float32)
    else:
        raise UserError(f"audio dtype must be int16, float32 or float64, got {samples.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    return np.clip(x, -1.0, 1.0, out=x) if x.size else x.reshape(0)


class _Resampler:
    """Any rate -> 16 kHz, stateful, so chunk boundaries leave no trace (libswresample)."""

    def __init__(self, rate: int) -> None:
        import av

        self.rate = rate
        self._r = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def push(self, x: np.ndarray) -> np.ndarray:
        import av

        if not x.size:
            return np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = None  # no timestamps: the resampler must not fill "gaps" between chunks
        return self._collect(self._r.resample(frame))

    def flush(self) -> np.ndarray:
        return self._collect(self._r.resample(None))

    @staticmethod
    def _collect(frames: list) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1).astype(np.float32, copy=False) for f in frames]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


class _ShiftedTrack(ControlTrack):
    """A session's absolute-frame ControlTrack seen from an epoch whose frame 0 is ``offset``."""

    def __init__(self, track: ControlTrack, offset: int) -> None:
        super().__init__()
        self.track = track
        self.offset = offset

    def set(self, from_frame: int, controls: Controls | None, keep_from: int | None = None) -> None:
        keep = None if keep_from is None else keep_from + self.offset
        self.track.set(from_frame + self.offset, controls, keep)

    def segment(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.track.segment(lo + self.offset, hi + self.offset)


def epoch_seed(seed: int, epoch: int) -> int:
    """Noise seed of the windows after the ``epoch``-th interrupt (epoch 0: ``seed`` itself,
    so an uninterrupted stream matches offline rendering)."""
    if epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1, np.uint32)[0])


@dataclass
class _Queued:
    frame: OutputFrame
    alpha: torch.Tensor  # (motion_dim,) raw α of the frame
    owns_image: bool


@dataclass
class SessionStats:
    frames_out: int = 0  # frames queued (rendered or not)
    frames_rendered: int = 0
    frames_fast: int = 0  # of frames_rendered: drawn by the draft exit (stage1.fast_head)
    dropped_frames: int = 0  # frames whose image was dropped (they repeat the previous one)
    windows: int = 0
    interrupts: int = 0
    samples_in: int = 0  # 16 kHz samples pushed, over all epochs
    stage_ms: dict[str, float] = field(default_factory=dict)  # totals per stage


class StreamSession:
    """One live stream (``engine.session_api.Session``). Create with ``Engine.session``.

    All methods are serialised by one lock, so any one thread (or several) may call them. All
    compute (features, motion, rendering) runs inside ``push_audio`` / ``push_silence`` as
    windows become ready; ``pull`` only hands over what is queued.
    """

    def __init__(
        self,
        engine: Engine,
        avatar: Avatar,
        seed: int = 0,
        controls: Controls | ControlTrack | None = None,
        live: bool = True,
        render_deadline_ms: float | None = None,
    ) -> None:
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise UserError(f"seed must be an integer >= 0, got {seed!r}")
        self.engine = engine
        self.seed = int(seed)
        self.plan: WindowPlan = engine.plan
        st = engine.cfg.stream
        self._queue_limit = st.output_queue_frames
        self._max_backlog = int(st.max_backlog_s * SAMPLE_RATE)
        self._max_push_s = st.max_push_s
        self._speech_rms = st.speech_rms
        # Offline rendering (live=False) never skips a window, whatever the config says.
        deadline_ms = st.render_deadline_ms if render_deadline_ms is None else render_deadline_ms
        self._deadline_s = max(0.0, float(deadline_ms)) / 1000.0 if live else 0.0
        self._render_estimate_s = 0.0  # recent render time of a window (the deadline's)
        self._fast_estimate_s = 0.0  # the same for the draft exit
        self._fast = st.fast_draft and bool(getattr(engine.stage1, "fast", False))
        self._stage2 = TimedStage2(engine.stage2)
        self._lock = threading.RLock()
        self._avatar = avatar
        if isinstance(controls, ControlTrack):
            self._track = controls
        else:
            self._track = ControlTrack()
            if controls is not None:
                self._track.set(0, validate_controls(controls))
        self.stats = SessionStats()
        self._closed = False
        self._finished = False
        self._end_frame: int | None = None  # after finish(): frames past the input are cut
        self._out: deque[_Queued] = deque()
        self._owned = 0  # queued frames that still hold their own image (a suffix of _out)
        self._pulled_frames = 0  # frames handed out by pull(): the played position
        self._recent_alpha: deque[torch.Tensor] = deque(maxlen=max(self.plan.prefix_frames, 1))
        self._last_image = avatar.image  # what a dropped frame shows when nothing is before it
        # Input state, reset by _new_epoch (start, interrupt).
        self._epoch = -1
        self._origin = 0  # absolute frame of the epoch's frame 0
        self._next_frame = 0  # next frame to produce
        self._audio = np.zeros(0, np.float32)  # 16 kHz input from sample _next_frame * 640 on
        self._received = 0  # absolute 16 kHz samples received
        self._arrivals: deque[tuple[int, float]] = deque()  # (end sample, monotonic time)
        self._resampler: _Resampler | None = None
        self._new_epoch(0)

    # -- Session protocol -----------------------------------------------------------------
    @property
    def latency_samples(self) -> int:
        """Window + look-ahead (compute and the resampler's few samples not included)."""
        return self.plan.latency_samples

    @property
    def dropped_frames(self) -> int:
        return self.stats.dropped_frames

    @property
    def played_samples(self) -> int:
        """Input samples handed out by ``pull`` so far (the interrupt position)."""
        return self._pulled_frames * SAMPLES_PER_FRAME

    def push_audio(
        self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, arrived: float | None = None
    ) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
            raise UserError(f"sample_rate must be an integer, got {sample_rate!r}")
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise UserError(
                f"sample_rate must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}], got {sample_rate}"
            )
        n = samples.shape[0] if isinstance(samples, np.ndarray) and samples.ndim else 0
        if n > self._max_push_s * sample_rate:
            raise UserError(
                f"one push_audio call may carry at most {self._max_push_s:g} s of audio, got "
                f"{n / sample_rate:.1f} s: push it in chunks"
            )
        x = as_mono_float(samples)
        with self._lock:
            self._check_open()
            self._check_backlog(int(math.ceil(n * SAMPLE_RATE / sample_rate)))
            t = _arrival(arrived)
            if sample_rate == SAMPLE_RATE:
                x16 = self._flush_resampler()
                x16 = np.concatenate([x16, x]) if x16.size else x
            else:
                if self._resampler is None or self._resampler.rate != sample_rate:
                    head = self._flush_resampler()
                    self._resampler = _Resampler(int(sample_rate))
                else:
                    head = np.zeros(0, np.float32)
                x16 = self._resampler.push(x)
                x16 = np.concatenate([head, x16]) if head.size else x16
            self._feed(x16, t)

    def push_silence(self, n_samples: int, arrived: float | None = None) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer):
            raise UserError(f"n_samples must be an integer, got {n_samples!r}")
        if not 0 <= n_samples <= self._max_push_s * SAMPLE_RATE:
            raise UserError(
                f"n_samples must be in [0, {int(self._max_push_s * SAMPLE_RATE)}], got {n_samples}"
            )
        with self._lock:
            self._check_open()
            self._check_backlog(int(n_samples))
            t = _arrival(arrived)
            # Silence is exact 16 kHz samples (a transport's clock counts them): the resampler's
            # tail goes first, and a later push at another rate starts a fresh resampler.
            head = self._flush_resampler()
            self._feed(np.concatenate([head, np.zeros(int(n_samples), np.float32)]), t)

    def pull(self) -> list[OutputFrame]:
        with self._lock:
            self._check_open()
            out = []
            while self._out:
                q = self._out.popleft()
                if not q.owns_image:
                    # A repeated image is shared (with the portrait, or other dropped frames):
                    # hand out a copy, so a consumer that draws on frames in place is safe.
                    q.frame.image = q.frame.image.copy()
                out.append(q.frame)
                self._recent_alpha.append(q.alpha)
                self._last_image = q.frame.image
            self._owned = 0
            self._pulled_frames += len(out)
            return out

    def interrupt(self) -> int:
        with self._lock:
            self._check_open()
            self.stats.interrupts += 1
            self._out.clear()
            self._owned = 0
            self._track.move_pending(self._pulled_frames)
            self._new_epoch(self._pulled_frames)
            return self._pulled_frames * SAMPLES_PER_FRAME

    def set_controls(self, controls: Controls) -> None:
        validate_controls(controls)
        with self._lock:
            self._check_open()
            # From the first frame not generated yet: the next window. Changes older than the
            # next window's audio context can never be read again.
            nxt = self._origin + self._streamer.next_frame
            self._track.set(nxt, controls, keep_from=nxt - self.plan.context_frames)

    def set_avatar(self, image: np.ndarray | Avatar) -> None:
        avatar = image if isinstance(image, Avatar) else self.engine.prepare_avatar(image)
        with self._lock:
            self._check_open()
            self._set_reference(avatar)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._out.clear()
            self._owned = 0
            self._audio = np.zeros(0, np.float32)
            self._arrivals.clear()
            self._resampler = None

    # -- beyond the protocol --------------------------------------------------------------
    def finish(self) -> None:
        """End of input (offline rendering, end of a benchmark): pad with silence until every
        frame that holds input audio is generated; frames past the input are not emitted (the
        last frame's audio is zero-padded to 640). Further pushes raise; pull still works."""
        with self._lock:
            self._check_open()
            if self._finished:
                return
            self._finished = True
            self._flush_resampler_into_stream()
            n_frames_epoch = math.ceil(self._streamer.mel.samples_seen / SAMPLES_PER_FRAME)
            self._end_frame = self._origin + n_frames_epoch
            # Bounded: at most ceil((W + L) / W) windows; all of them are queued (no drops).
            for alpha in self._timed_windows(self._streamer.finish):
                self._emit_window(*alpha, enforce_limit=False)

    @property
    def queued_frames(self) -> int:
        return len(self._out)

    # -- internals ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise UserError("session is closed")

    def _check_backlog(self, n_new: int) -> None:
        if self._finished:
            raise UserError("session is finished (finish() was called): no more input")
        waiting = len(self._out) * SAMPLES_PER_FRAME + self._audio.size
        if waiting + n_new > self._max_backlog:
            raise UserError(
                f"{waiting / SAMPLE_RATE:.1f} s of audio are waiting to be pulled; this push "
                f"would pass stream.max_backlog_s ({self._max_backlog / SAMPLE_RATE:g} s): "
                "call pull() (or interrupt())"
            )

    def _new_epoch(self, origin_frame: int) -> None:
        """Fresh input state from absolute frame ``origin_frame`` on (start, interrupt)."""
        e = self.engine
        self._epoch += 1
        self._origin = origin_frame
        self._next_frame = origin_frame
        self._audio = np.zeros(0, np.float32)
        self._received = origin_frame * SAMPLES_PER_FRAME
        self._arrivals.clear()
        self._resampler = None
        self._streamer = MotionStreamer(
            self._stage2,
            self.plan,
            self._avatar.ref_alpha,
            self._avatar.ref_h,
            seed=epoch_seed(self.seed, self._epoch),
            steps=e.cfg.stage2.sample_steps,
            schedule=e.schedule,
            noise_scale=e.cfg.stage2.noise_scale,
            control_guidance=e.cfg.stage2.control_guidance,
            audio_cfg=e.cfg.stage2.audio,
            pad_row=e.pad_row,
            controls=_ShiftedTrack(self._track, origin_frame),
        )
        if self._recent_alpha:
            # Continue the motion from what the viewer last saw.
            self._streamer.history = torch.stack(list(self._recent_alpha))

    def _set_reference(self, avatar: Avatar) -> None:
        """Windows not generated yet use ``avatar`` (stage-2 reference and renderer source)."""
        self._avatar = avatar
        self._streamer.ref_alpha = avatar.ref_alpha
        runner = self._streamer.runner
        runner.ref_alpha = avatar.ref_alpha
        runner.ref_h = avatar.ref_h

    def _flush_resampler(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.float32)
        tail = self._resampler.flush()
        self._resampler = None
        return tail

    def _flush_resampler_into_stream(self) -> None:
        tail = self._flush_resampler()
        if tail.size:
            self._feed(tail, time.monotonic())

    def _feed(self, x16: np.ndarray, t_arrival: float) -> None:
        """16 kHz mono samples into the stream, split at window boundaries so each window runs
        (and is timed and rendered) on its own, whatever the chunking."""
        n = x16.size
        if n == 0:
            return
        self.stats.samples_in += n
        self._received += n
        self._arrivals.append((self._received, t_arrival))
        self._audio = np.concatenate([self._audio, x16]) if self._audio.size else x16.copy()
        st, plan, w = self._streamer, self.plan, self.plan.window_frames
        new_windows = plan.windows_ready(st.mel.samples_seen + n) - st.next_window
        # Frames that would lose their image before anyone could pull them: skip rendering.
        overflow = self._owned + new_windows * w - self._queue_limit
        skip_frames = max(0, overflow - self._owned)
        first_new = st.next_window
        pos = 0
        while pos < n:
            need = plan.samples_needed(st.next_window) - st.mel.samples_seen
            take = min(max(need, 1), n - pos)
            chunk = x16[pos : pos + take]
            pos += take
            for alpha, i, times in self._timed_windows(lambda c=chunk: st.push_audio(c)):
                kept = (i - first_new + 1) * w > skip_frames
                self._emit_window(alpha, i, times, render=self._tier(i) if kept else "")
            # After this the window of st.next_window is not ready: need > 0 again.

    def _timed_windows(self, fn) -> list[tuple[torch.Tensor, int, dict[str, float]]]:  # noqa: ANN001
        """Run ``fn`` (a MotionStreamer call returning α windows); per window its index and
        stage times. With several windows in one call the time is split evenly."""
        first = self._streamer.next_window
        self._stage2.reset()
        t0 = time.perf_counter()
        windows = fn()
        total = time.perf_counter() - t0
        k = max(len(windows), 1)
        enc, den = self._stage2.encode_s, self._stage2.denoise_s
        times = {
            "features_ms": max(total - enc - den, 0.0) * 1000 / k,
            "encoder_ms": enc * 1000 / k,
            "denoiser_ms": den * 1000 / k,
        }
        return [(a, first + j, times) for j, a in enumerate(windows)]

    def _emit_window(
        self,
        alpha: torch.Tensor,
        index: int,
        times: dict[str, float],
        render: str = "full",
        enforce_limit: bool = True,
    ) -> None:
        """Render window ``index`` (W frames, one batch) and queue its frames in pts order.
        render: "full", "fast" (the draft exit) or "" (not rendered: the images repeat)."""
        w = alpha.shape[0]
        first = self._origin + self.plan.start_frame(index)
        assert first == self._next_frame, (first, self._next_frame)
        n_keep = w if self._end_frame is None else max(0, min(w, self._end_frame - first))
        stage = dict(times)
        images: np.ndarray | None = None
        if render and n_keep:
            av = self._avatar
            t0 = time.perf_counter()
            s1 = self.engine.stage1
            if render == "fast":
                frames = s1.render_fast(av.h, av.feats, alpha, av.source)
            else:
                frames = s1.render(av.h, av.feats, alpha)
            images = to_uint8(frames)
            took = time.perf_counter() - t0
            stage["render_ms"] = took * 1000
            # what rendering a window costs (its motion is done before the deadline is checked,
            # so it is in the wait already): a slow render counts at once, a fast one a third
            if render == "fast":
                self._fast_estimate_s = max(took, 0.7 * self._fast_estimate_s + 0.3 * took)
                self.stats.frames_fast += n_keep
            else:
                est = self._render_estimate_s
                self._render_estimate_s = max(took, 0.7 * est + 0.3 * took)
            self.stats.frames_rendered += n_keep
        else:
            stage["render_ms"] = 0.0
        self.stats.windows += 1
        for k, v in stage.items():
            self.stats.stage_ms[k] = self.stats.stage_ms.get(k, 0.0) + v
        per_frame = {k: v / w for k, v in stage.items()}  # a window's cost, shared by its frames
        t_ready = time.monotonic()
        spf = SAMPLES_PER_FRAME
        for j in range(n_keep):
            n = first + j
            audio = self._audio[j * spf : (j + 1) * spf]
            if audio.size < spf:  # the last frame after finish(): input ends inside it
                audio = np.concatenate([audio, np.zeros(spf - audio.size, np.float32)])
            rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
            meta: dict[str, Any] = dict(per_frame)
            meta.update(
                window=index,
                epoch=self._epoch,
                alpha=alpha[j].numpy().copy(),
                rms=rms,
                input_time=self._arrival_time(min((n + 1) * spf, self._received) - 1),
                output_time=t_ready,
                dropped=images is None,
                fast=images is not None and render == "fast",
            )
            image = images[j] if images is not None else self._previous_image()
            frame = OutputFrame(n * spf, image, audio.copy(), rms >= self._speech_rms, meta)
            self._out.append(_Queued(frame, alpha[j].clone(), images is not None))
            if images is not None:
                self._owned += 1
            else:
                self.stats.dropped_frames += 1
            self.stats.frames_out += 1
        self._audio = self._audio[w * spf :]
        self._next_frame = first + w
        while self._arrivals and self._arrivals[0][0] <= self._next_frame * spf:
            if len(self._arrivals) == 1:
                break  # keep the newest: it may cover the next frames
            self._arrivals.popleft()
        if enforce_limit:
            self._enforce_queue_limit()

    def _tier(self, index: int) -> str:
        """Live catch-up (the render deadline): how window ``index`` is drawn. "full" unless
        its images would be done more than the deadline after its newest audio came in (the
        wait so far, its motion included, plus the recent render time); then "fast" (the
        draft exit, if the model has one) if that would be done in time, else "" (skipped)."""
        if self._deadline_s <= 0:
            return "full"
        newest = self._origin * SAMPLES_PER_FRAME + self.plan.samples_needed(index) - 1
        waited = time.monotonic() - self._arrival_time(newest)
        if waited + self._render_estimate_s <= self._deadline_s:
            return "full"
        if self._fast and waited + self._fast_estimate_s <= self._deadline_s - FAST_MARGIN_S:
            # slowly (lowered by a fifth after every draft, the full estimate soon let in full
            # renders that came late and stalled the clock), but surely: a hiccup must not
            # keep the stream on drafts for good
            self._render_estimate_s *= 0.95
            return "fast"
        # skipped: forget a slow render bit by bit, so one hiccup does not stop the video
        self._render_estimate_s *= 0.8
        self._fast_estimate_s *= 0.8
        return ""

    def _arrival_time(self, sample: int) -> float:
        """When absolute input sample ``sample`` arrived (monotonic seconds)."""
        for end, t in self._arrivals:
            if end > sample:
                return t
        return self._arrivals[-1][1] if self._arrivals else time.monotonic()

    def _previous_image(self) -> np.ndarray:
        return self._out[-1].frame.image if self._out else self._last_image

    def _enforce_queue_limit(self) -> None:
        """Past the limit the oldest frames with an image of their own repeat the image before
        them (audio, pts and α stay): memory holds at most limit + 1 distinct images."""
        while self._owned > self._queue_limit:
            idx = len(self._out) - self._owned
            q = self._out[idx]
            q.frame.image = self._out[idx - 1].frame.image if idx > 0 else self._last_image
            q.frame.meta["dropped"] = True
            q.owns_image = False
            self._owned -= 1
            self.stats.dropped_frames += 1
