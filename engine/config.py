"""Typed configuration: dataclasses are the schema, TOML files in ``configs/`` are the data.

    cfg = load_config("tiny", overrides=["stage1.image_size=128"])

Every section is a dataclass with defaults; a TOML file only states what differs. Unknown keys
are rejected with a message naming the key and the file (or the override) that set it. The
resolved config is a plain dict (``to_dict``) that is saved next to every checkpoint, export and
benchmark result, and ``from_dict`` rebuilds it exactly.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A config file or override that does not fit the schema; the message says where."""


# --------------------------------------------------------------------------------------------
# Stage 1: identity-decoupled motion representation (ARCHITECTURE.md §2)
# --------------------------------------------------------------------------------------------
@dataclass
class Stage1Config:
    image_size: int = 256
    # Encoder: layer 0 (1x1 conv) width, then the widths of the residual blocks 1..N. The number
    # of blocks follows from image_size: the last block ends at 4x4, then a 4x4 conv to 1x1.
    enc_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 512, 512, 512])
    latent_dim: int = 512  # h, z_id, z_m
    motion_dim: int = 20  # number of LMD directions (alpha)
    head_hidden: int = 512  # identity / motion MLP width
    motion_linears: int = 5  # stacked linears z_m -> alpha (no activation), as the original
    # Renderer: widths per level from 4x4 upwards (4, 8, 16, ..., image_size).
    dec_channels: list[int] = field(default_factory=lambda: [512, 512, 512, 512, 256, 128, 64])
    club_hidden: int = 512  # CLUB variational network width
    blur_kernel: list[int] = field(default_factory=lambda: [1, 3, 3, 1])
    # livehead extension (off = LIA/AniTalker): each level's RGB also reads the renderer's own
    # features where the occlusion mask hides the warped source, ToRGB'(x·(1-m)), so it can
    # paint what the source does not show (an open mouth from a closed one). Starts at zero.
    paint: bool = False
    # livehead extension (off = LIA/AniTalker): at each level a per-pixel MLP of the source's
    # own features and the motion vector is added to the renderer's features before the flow
    # (x += W2·lrelu(W1·F_r + V·alpha + b), 1×1, W2 starts at zero). LIA's renderer must find
    # *where* to move (the mouth of this face) from the latent alone; this lets a hidden unit be
    # "lip here AND opening large", so a motion can act where its part of the face is.
    inject: bool = False
    # livehead extension (off = LIA/AniTalker): at the levels of 64² and up, the RGB also reads
    # the high-pass (finer than 4 px) of the warped, masked source features through a 1×1 conv
    # (zero at init). The RGB skip sums coarse-to-fine, so fine detail must come as a residual
    # over the upsampled coarse image, which a 1×1 conv of full-band features cannot give: the
    # renderer rebuilt even its own source at only ~29 dB.
    detail: bool = False
    # livehead extension (off = LIA/AniTalker; needs alpha[0:6] to be the synthetic world's
    # standardised yaw, pitch, roll, loc_x, loc_y, scale, i.e. weights trained with
    # train.stage1.aux_motion_direct): the head's rigid motion from the source's alpha to the
    # target's (a similarity about the cranium's centre: place, size, roll) is computed in
    # closed form and, at each level, the source features moved by it feed a per-pixel gate
    # (how much of that motion a pixel takes, added to the learned flow) and the renderer's
    # features. LIA's renderer must draw a moved, resized head's outline from a style vector on a
    # constant; on held-out cross-reenactment it blurs large moves (model card, session 14).
    # The gate starts half open, the injection at zero.
    head_warp: bool = False
    # livehead extension (off = LIA/AniTalker; synthetic world only, like head_warp): a small
    # CNN of its own (``HeadReader``) that reads the head's absolute yaw, pitch, roll, place and
    # size off a frame, trained on the world's exact truth (``livehead train reader``).
    # Video-driven reenactment then takes the head's fields of every driving frame from it
    # (relative to the portrait's own reading) and the rest from the encoder, relative to the
    # driving clip's first frame (``engine.reenact``). The shared encoder reads moves within
    # one face to ~1 px but each face's absolute place with a bias of its own (~8 px), which
    # cross-reenactment got wrong. The renderer never reads it; it is not in the ONNX graphs.
    head_reader: bool = False
    # the side the head reader reads frames at: 128 · 2^k (above 128 a fine branch reads the
    # frame at this size next to the 128² body: HeadReader). Files without it were trained at 128.
    head_reader_size: int = 128
    # what it reads: 6 (the head's pose, place and size) or 14 (also the face's expression:
    # mouth, eyelids, brows, gaze, which reenactment then takes from it, absolute).
    head_reader_fields: int = 6
    # livehead extension (off = LIA/AniTalker): a draft exit (``FastHead``) that draws the
    # frame from the renderer's second-finest level (S/2) and the portrait warped by that
    # level's flow, skipping the finest level: about a third less compute (2 CPU cores, tiny:
    # 57 against 87 ms a 2-frame window). Used only under a render deadline with
    # ``stream.fast_draft`` (off by default), for windows a full render would make late.
    # Trained alone on a frozen model (``livehead train fast``), which writes it into the
    # weights; unused until trained. Not in the paper recipe.
    fast_head: bool = False


# --------------------------------------------------------------------------------------------
# Stage 2: audio-driven motion generator (ARCHITECTURE.md §3-4)
# --------------------------------------------------------------------------------------------
@dataclass
class AudioConfig:
    sample_rate: int = 16000
    frontend: str = "logmel"  # "logmel" (built in, incremental) or "hubert" (local files)
    n_fft: int = 400
    hop_samples: int = 160  # 100 feature frames per second
    n_mels: int = 80
    fmin_hz: float = 40.0
    fmax_hz: float = 7600.0
    hubert_path: str = ""  # local directory of a transformers HuBERT model (plug-in front end)


@dataclass
class ConformerConfig:
    d_model: int = 512
    heads: int = 2
    ffn_dim: int = 512
    blocks: int = 4
    conv_kernel: int = 13
    dropout: float = 0.2
    # Relative positions: a learned per-head attention bias for key - query distances clipped
    # to [-rel_pos_max, rel_pos_max] (dynamic length, ONNX-friendly).
    rel_pos_max: int = 64


@dataclass
class Stage2Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    speech: ConformerConfig = field(default_factory=ConformerConfig)
    adapter_hidden: int = 128  # variance predictors: 2-layer LSTM hidden size
    adapter_layers: int = 2
    denoiser: ConformerConfig = field(
        default_factory=lambda: ConformerConfig(d_model=1024, heads=2, ffn_dim=1024, blocks=2)
    )
    cond_dim: int = 128  # projections of reference alpha, reference h, noisy alpha, timestep
    # Diffusion
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sample_steps: int = 50  # DDIM steps at inference
    # Sampling temperature: each window's starting noise x_T is scaled by this (1 = the plain
    # sampler). Below 1 trades spread across seeds for steadier motion (livehead extension;
    # measured for the tiny model in configs/tiny.toml).
    noise_scale: float = 1.0
    # Control guidance (livehead extension, off = the plain sampler): where the user gives a
    # control, each denoiser call becomes eps(c) + g * (eps(c) - eps(c_pred)), c_pred being the
    # variance adapter's own predictions, so the motion follows a commanded pose, location or
    # scale more closely (classifier-free guidance with the prediction as the "free" branch).
    # It costs a second adapter pass per window and a second denoiser pass per step, only for
    # windows with a control.
    control_guidance: float = 0.0
    # Windowing (shared by offline rendering and streaming)
    window_frames: int = 25  # new frames generated per window
    prefix_frames: int = 10  # K already-emitted alphas given as a known prefix
    lookahead_frames: int = 2  # audio look-ahead past the window end, in video frames
    audio_context_frames: int = 25  # audio context before the window start, in video frames
    fps: int = 25


# --------------------------------------------------------------------------------------------
# Streaming engine and server
# --------------------------------------------------------------------------------------------
@dataclass
class StreamConfig:
    backend: str = "torch"  # "torch" or "onnx" (ONNX Runtime over `livehead export onnx`)
    onnx_dir: str = ""  # backend "onnx": the export's directory ("": the weights' cache dir)
    device: str = "cpu"
    threads: int = 0  # 0: let the backend decide
    video_queue_frames: int = 4
    watermark: bool = True
    # Under a render deadline, draw windows a full render would make late by the model's draft
    # exit (stage1.fast_head) where it would be in time. Off: on 2 slow cores (livehead serve,
    # 4 interleaved pairs of runs, BENCHMARKS.md) more frames were freshly drawn (46 % against
    # 35 %) but the clock stalled more (1.19 s against 0.89 s in 15 s of speech).
    fast_draft: bool = False
    # Engine sessions (engine/stream.py)
    render_dtype: str = "fp32"  # renderer precision: "fp32", or "bf16" autocast (flow stays fp32)
    channels_last: bool = True  # NHWC renderer activations (faster on CPU)
    cuda_graphs: bool = False  # backend torch on cuda: replay renderer and denoiser as CUDA graphs
    output_queue_frames: int = 50  # rendered frames kept for a consumer that does not pull;
    # beyond it the oldest frames lose their image (they repeat the previous one), never audio
    max_backlog_s: float = 120.0  # un-pulled output + pending input; a push beyond is refused
    max_push_s: float = 60.0  # longest chunk one push_audio call may carry
    speech_rms: float = 0.01  # frames at least this loud (RMS of [-1, 1] audio) are "speech"
    # Live catch-up: a window whose images would be done more than this long after its newest
    # audio came in (the wait so far plus the recent render time) is not rendered (its frames
    # repeat the previous image and count as dropped; audio and motion stay). 0 = off: every
    # frame rendered, output independent of timing. Live sessions of the Python API and
    # `livehead bench stream`; `livehead serve`'s rooms use server.render_deadline_ms.
    render_deadline_ms: float = 0.0


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 1
    max_upload_bytes: int = 10_000_000
    max_image_pixels: int = 4096 * 4096
    # Timing (server/room.py): output leaves the engine's latency plus playout_frames behind the
    # media clock; input is pushed at most input_lead_frames ahead of it; silence is filled when
    # no input arrived for silence_slack_ms.
    playout_frames: int = 3
    input_lead_frames: int = 2
    silence_slack_ms: int = 60
    max_input_buffer_s: float = 30.0  # queued presenter audio (a voice agent's TTS) per room
    # A live presenter (WebRTC microphone, WHIP) keeps talking while output stalls: once its
    # queued input passes input_lead_frames + playout_frames + live_catchup_slack_ms, the oldest
    # excess is dropped (bounded latency wins over completeness). WebSocket input is never dropped.
    live_catchup_slack_ms: int = 60
    # Cores too slow to render in real time: a window whose images would be done more than this
    # after its newest audio was due in the session (by the media clock's schedule, or its
    # arrival if later; the wait so far plus the recent render time) is not rendered (its frames
    # repeat the last image; audio, motion and timing go on), so the room keeps up by repeating
    # images instead of stalling the clock, piling up latency and dropping microphone audio.
    # -1: (playout_frames + input_lead_frames) frames, the time a window has before its first
    # frame is sent, less a 50 ms margin for encoding and sending (20 ms dropped more audio on
    # a slow 2-core host; server/PROTOCOL.md) = 150 ms by default, plus a frame
    # for each frame a window has beyond two (a skipped long window freezes the picture long;
    # off if that leaves nothing); 0: off, every frame rendered. Rooms' sessions only
    # (stream.render_deadline_ms is the Python API's and `livehead bench`'s).
    render_deadline_ms: float = -1.0
    presenter_grace_s: float = 10.0  # a room without its presenter closes (viewers too) after this
    # Encoding (once per room, shared by every viewer)
    video_bitrate: int = 1_000_000
    keyframe_interval_frames: int = 50
    jpeg_quality: int = 80  # WebSocket frames
    ws_queue_frames: int = 50  # frames queued for a slow WebSocket client before dropping
    # Limits and security
    max_sdp_bytes: int = 65536
    max_ws_message_bytes: int = 1_048_576
    max_viewers_per_room: int = 32
    peer_timeout_s: float = 15.0  # close a peer that sent nothing (RTP/RTCP/DTLS) for this long
    ice_addresses: list[str] = field(default_factory=list)  # restrict ICE host candidates
    ice_servers: list[str] = field(default_factory=list)  # STUN/TURN URLs; none: host only
    cors_origins: list[str] = field(default_factory=list)  # none: no CORS headers at all
    # Host names this server answers to besides loopback names and IP literals (DNS-rebinding
    # defence when no token is set; with a token every Host is accepted). "*": any.
    allowed_hosts: list[str] = field(default_factory=list)
    standin_size: int = 256  # frame size of the stand-in session (--standin)


# --------------------------------------------------------------------------------------------
# Training (used by training/, stored here so one TOML file describes a whole run)
# --------------------------------------------------------------------------------------------
@dataclass
class WorldConfig:
    seed: int = 0
    identities: int = 5000
    heldout_identities: int = 200  # the last N identity ids; training never sees them
    fps: int = 25
    sample_rate: int = 16000


@dataclass
class TrainStage1Config:
    batch_size: int = 8
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    steps: int = 100_000
    warmup_steps: int = 0  # linear learning-rate warm-up (generator side)
    # livehead option (LIA keeps lr constant): after the warm-up, a cosine from ``lr`` down to
    # ``lr_final`` that ends at step ``lr_decay_steps`` (then ``lr_final``); 0 = constant lr.
    # A function of the step only, so ``--resume`` continues it exactly.
    lr_decay_steps: int = 0
    lr_final: float = 0.0
    w_l1: float = 1.0
    # livehead option (0 = the paper's L1 only): a squared-error term, 4·(x - y)² (the region
    # weights too, if set), on the [-1, 1] images. Where a detail's place or look is uncertain
    # across identities (an open mouth's interior), L1's optimum is its median (draw nothing)
    # and the mean's is a faint version; measured, renderer-only, 64 identities, 300 steps:
    # held-out mouth gain 0.05 with L1, 0.13 with the squared error in its place (model card,
    # session 11).
    w_l2: float = 0.0
    w_perceptual: float = 0.1
    w_adv: float = 1.0
    w_mi: float = 0.1
    club_lr: float = 1e-3  # CLUB estimator; it must keep up with the encoders
    w_metric: float = 0.1
    aam_margin: float = 0.2
    aam_scale: float = 30.0
    w_aux_motion: float = 0.0  # synthetic-world accelerator: supervise alpha with ground truth
    # with it: alpha's first 14 components are the standardised motion fields themselves (no
    # learned read-out that could scale a weak direction of alpha up)
    aux_motion_direct: bool = False
    # with aux_motion_direct: this fraction of targets is rendered with the true (standardised)
    # motion in alpha's first 14 components instead of the encoder's reading (teacher forcing),
    # so the renderer learns to draw a motion before the encoder reads it well. 0 = off.
    teacher_alpha: float = 0.0
    # ... and alpha's other components for those targets: "source" = the encoder's reading of
    # the SOURCE frame (the target then differs from the source only by the true motion), or
    # "target" = its reading of the target frame (sessions 4-6). "target" leaks the target's
    # mouth into the free components, and the renderer learnt to read it there and ignore the
    # true mouth component (model card, session 6).
    teacher_rest: str = "source"
    # ... and the head's place and pose in those components (alpha[0:6]): "absolute" = the
    # target's true values; "relative" = the true move from source to target added to the
    # encoder's reading of the source. The encoder reads a face's place with a bias of its own
    # (held-out faces: ~9 px in x, while a move between two frames of one face is read to
    # ~1.5 px), and at run time stage 2 continues from the portrait's reading, so "relative" is
    # what the renderer gets then. Needed with stage1.head_warp, whose map is the difference of
    # source and target alpha (session 14).
    teacher_head: str = "absolute"
    # synthetic-world accelerator: extra L1 weight (peak of a Gaussian bump) around the target's
    # mouth and, at half of it, its eyes, placed from the world's landmarks. 0 = paper L1.
    region_weight: float = 0.0
    # A renderer-only phase (livehead curriculum, not the paper's): the encoder, its heads and
    # Q are frozen; only the renderer trains, on L1 + perceptual (+ adversarial), with teacher
    # forcing if set. No identity/MI/aux losses. Measured on 2 cores at batch 8: 8.6-10
    # samples/s against 5.7 (the encoder's backward over every image was the largest part of a
    # step), for teaching the renderer to draw the motion it is given.
    renderer_only: bool = False
    # Pairs: this fraction has a target near the source (each motion field moved by Gaussian
    # noise of u * its typical spread, u uniform in [0, near_amount]), as two frames of one
    # video are; the rest pair two independent poses/expressions of the identity.
    near_pairs: float = 0.3
    near_amount: float = 0.3
    # synthetic-world accelerator: this fraction of sources has the mouth closed and at rest,
    # as an avatar portrait does, so the renderer learns to open a mouth it can see is closed
    # (a source's mouth state is otherwise only as known as the encoder reads it). 0 = off.
    closed_source: float = 0.0
    # synthetic-world accelerator: this fraction of pairs keeps the source's head (a near pair's
    # small jitter of pose, place and scale) and draws a new expression (mouth, lids, brows,
    # gaze). Independent pairs move the whole head, and a misplaced head's error drowns the
    # mouth's in the loss (seen: the mouth not drawn after ~29k such samples). 0 = off.
    expression_pairs: float = 0.0
    # synthetic-world option: this fraction of pairs places the head as talking clips do (the
    # neck pivot at rest, shared by source and target, and the nose where the pose puts it), so
    # a strong turn comes with its nose far off centre; random poses place the nose
    # independently of the turn and the renderer drew such a shift as a turn the other way.
    # 0 = off.
    placed_heads: float = 0.0
    # with ``placed_heads``: this fraction of the placed pairs whose source is not the avatar
    # portrait (those already do) gives the target a neck pivot of its own (a resting spot for
    # its scale), as cross-reenactment does: the driver's head rests where the driver's clip put
    # it, not where the source's neck is. 0 = one shared pivot.
    placed_apart: float = 0.0
    # synthetic-world option: this fraction of pairs takes as source the identity's avatar
    # portrait (``neutral_motion``: frontal, centred, mouth closed, eyes open), as live and
    # audio-driven rendering always does; the target is drawn as the other options say (with
    # ``placed_heads``, placed like a clip's frame on its own pivot). 0 = off.
    avatar_sources: float = 0.0
    # synthetic-world accelerator: this fraction of pairs has a target that is exactly its
    # source (head, eyes, brows, gaze) with a new mouth, its opening uniform in [0, 1]: the
    # mouth's change alone, with no misplaced head whose error hides it. 0 = off.
    mouth_pairs: float = 0.0
    # with ``mouth_pairs``: this fraction of the mouth pairs keeps the target's head (pose,
    # place, scale as drawn) with the source's face and a new mouth, so the mouth is drawn on
    # a moved head too. 0 = every mouth pair keeps the source's head.
    mouth_pairs_moved: float = 0.0
    # this fraction of pairs is two frames of one talking clip of the synthetic world (as the
    # paper samples source and target from one video); none of the options above touch them.
    # 0 = off (the pairs are drawn from independent or perturbed poses, as above).
    clip_pairs: float = 0.0
    # Encode an explicit negative frame (another identity) per item. Off: the other items of
    # the batch (distinct identities) are the negatives, and the identity branch costs less.
    negatives: bool = True
    channels_last: bool = False  # NHWC activations (faster convolutions on some CPUs)
    vgg_path: str = ""  # local VGG-19 weights; empty: weight-free multi-scale structural loss
    disc_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 512, 512, 512])
    adv_start_step: int = 0  # adversarial loss (and D updates) from this step on
    d_reg_every: int = 16
    r1: float = 10.0
    ema_decay: float = 0.999
    bf16: bool = False
    log_every: int = 10
    ckpt_every: int = 500
    workers: int = 0


@dataclass
class TrainStage2Config:
    batch_size: int = 16
    lr: float = 1e-4
    grad_clip: float = 1.0
    steps: int = 100_000
    ema_decay: float = 0.9999
    w_adapter: float = 1.0
    clip_seconds: float = 8.0
    # Synthetic-world accelerator (needs stage-1 weights trained with aux_motion_direct): the
    # first 14 components of the training alpha are the world's true standardised motion -- what
    # such an encoder is trained to read and such a renderer is trained to draw -- instead of
    # the encoder's imperfect reading of the frames. Off for real data.
    world_alpha: bool = False
    # Share of training windows that are a stream's first (silence before, prefix all the
    # reference frame's alpha, target anywhere in the clip). Elsewhere the prefix already holds
    # the target's pose, location and scale, so without these windows the denoiser learns to
    # continue the prefix and ignores the user's controls.
    start_windows: float = 0.25
    log_every: int = 10
    ckpt_every: int = 500
    workers: int = 0


@dataclass
class TrainConfig:
    stage1: TrainStage1Config = field(default_factory=TrainStage1Config)
    stage2: TrainStage2Config = field(default_factory=TrainStage2Config)
    seed: int = 0


@dataclass
class Config:
    name: str = "default"
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stream: StreamConfig = field(default_factory=StreamConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def check_sampling(s2: Stage2Config) -> None:
    """The stage-2 sampler settings a run may change (``engine.stream.RUNTIME_STAGE2_KEYS``),
    checked in one place for the engine and the evaluation: ConfigError naming the key."""
    if not 1 <= s2.sample_steps <= s2.timesteps:
        raise ConfigError(f"stage2.sample_steps must be in [1, {s2.timesteps}]")
    if not 0.0 <= s2.noise_scale <= 2.0:
        raise ConfigError(f"stage2.noise_scale must be in [0, 2], got {s2.noise_scale}")
    if not 0.0 <= s2.control_guidance <= 4.0:
        raise ConfigError(f"stage2.control_guidance must be in [0, 4], got {s2.control_guidance}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(typ, value, where)  # type: ignore[arg-type]
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1]
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    bad_bool = typ is int and isinstance(value, bool)  # True is an int in Python, not here
    if typ in (int, float, str, bool) and (bad_bool or not isinstance(value, typ)):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            known = ", ".join(sorted(types_))
            full = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown key '{full}' (known keys here: {known})")
        kwargs[key] = _coerce(value, types_[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], where: str = "config") -> Config:
    try:
        return _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix != ".toml" and not p.exists():
        p = CONFIG_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"config '{name_or_path}' not found (a .toml path, or one of: {names})")
    return p


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is read as TOML, else a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': bad key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def add_config_args(parser: Any, example: str = "stage1.latent_dim=256") -> None:
    """``--config NAME|PATH`` (default tiny) and repeatable ``--set KEY=VALUE`` (dest
    ``override``) on an argparse parser; pass them on as ``load_config(a.config, a.override)``."""
    parser.add_argument("--config", default="tiny", help="config name in configs/ or a .toml path")
    parser.add_argument(
        "--set",
        dest="override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def load_config(name_or_path: str | Path = "tiny", overrides: list[str] | None = None) -> Config:
    """Load a TOML config (a name in ``configs/`` or a path) and apply dotted overrides."""
    path = resolve_config_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    data.setdefault("name", path.stem)
    try:
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for text in overrides or []:
        upd = parse_override(text)
        try:
            cfg = _build(Config, _merge(to_dict(cfg), upd), "")
        except ConfigError as e:
            raise ConfigError(f"override '{text}': {e}") from None
    return cfg
