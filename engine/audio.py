"""Audio input and the stage-2 audio front ends.

Everything runs at 16 kHz mono float32 in [-1, 1]. Video frame n (25 fps) covers input samples
[640 n, 640 (n + 1)) (``engine.session_api``).

Log-mel framing (the built-in, incremental front end). Feature frame j is the STFT of the n_fft
samples that *end* at sample (j + 1) * hop, with zeros before sample 0:

    frame j  <-  samples [(j + 1) * hop - n_fft, (j + 1) * hop)

So the frame is computable the moment its last sample arrives (no centring, no future samples),
N samples give exactly N // hop frames, and with hop 160 video frame n owns feature frames
4n .. 4n + 3, the last of which ends exactly where the video frame ends. ``LogMelStream`` keeps
the last n_fft - hop samples as left context and emits bit-identical frames for any chunking:
both paths compute every frame with the same per-frame function (batched FFT/BLAS kernels may
round differently for different batch sizes, a per-frame loop cannot), which costs about 1.5 ms
per second of audio.

Front-end plug-ins follow ``AudioFrontend``: ``features(samples) -> (T_feat, D)`` at
``frames_per_video_frame`` feature frames per video frame. ``HubertFrontend`` loads a local
``transformers`` HuBERT directory (optional dependency, imported only there).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from engine.config import AudioConfig
from engine.errors import UserError

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640

# Fixed affine so the speech encoder's first linear sees O(1) inputs: ln(power) of speech is
# roughly in [-10, 4] with this filterbank; silence hits the floor, ln(1e-8) = -18.4 -> -2.6.
# These are constants of the feature definition, not learned statistics: changing them changes
# the features every stage-2 checkpoint was trained on.
LOGMEL_FLOOR = 1e-8
LOGMEL_SHIFT = 8.0
LOGMEL_SCALE = 4.0


# --------------------------------------------------------------------------------------------
# Loading and resampling
# --------------------------------------------------------------------------------------------
def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Any PCM array -> float32 mono at 16 kHz.

    samples: (N,) or (N, C); int16/int32 (full scale -> [-1, 1)), uint8 (offset 128) or float
    (assumed already in [-1, 1]). Channels are averaged. Resampling uses a polyphase filter
    (scipy ``resample_poly``), so output length is ceil(N * 16000 / sample_rate).
    Raises UserError for NaN/inf, a bad shape or dtype, or a non-positive rate.
    """
    arr = np.asarray(samples)
    if not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise UserError(f"sample rate must be a positive integer, got {sample_rate!r}")
    if arr.ndim == 2:
        if arr.shape[1] == 0:
            raise UserError("audio array has zero channels")
    elif arr.ndim != 1:
        raise UserError(f"audio must be (N,) or (N, channels), got shape {arr.shape}")
    if arr.dtype == np.int16:
        x = arr.astype(np.float32) / 32768.0
    elif arr.dtype == np.int32:
        x = (arr.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif arr.dtype == np.uint8:
        x = (arr.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32, copy=False)
        if not np.all(np.isfinite(x)):
            raise UserError("audio contains NaN or infinite values")
    else:
        raise UserError(f"unsupported audio sample type {arr.dtype} (use int16 or float)")
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if sample_rate != SAMPLE_RATE and x.size:
        from scipy.signal import resample_poly

        g = math.gcd(int(sample_rate), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def _decode_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of any container ffmpeg knows -> ((N, C) float32, rate)."""
    import av

    with av.open(str(path)) as container:
        streams = container.streams.audio
        if not streams:
            raise UserError(f"{path}: the file has no audio stream")
        stream = streams[0]
        chunks: list[np.ndarray] = []
        resampler = None
        rate = 0
        for frame in container.decode(stream):
            if resampler is None:
                rate = frame.sample_rate
                # Planar float at the native rate and layout: we resample ourselves so every
                # format goes through the same filter.
                resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=rate)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().T)  # (C, n) -> (n, C)
        if resampler is not None:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().T)
    if not chunks:
        return np.zeros((0, 1), np.float32), rate or SAMPLE_RATE
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False), rate


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio (or video) file -> (N,) float32 mono 16 kHz in [-1, 1].

    WAV/FLAC/OGG go through soundfile; anything else (mp3, m4a, mp4, ...) through PyAV.
    Raises UserError for a missing, unreadable, corrupt or empty file.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"audio file not found: {p}")
    if not p.is_file():
        raise UserError(f"not an audio file: {p}")
    data: np.ndarray | None = None
    rate = 0
    try:
        import soundfile as sf

        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001 - libsndfile raises several types; PyAV gets a turn
        data = None
    if data is None:
        try:
            data, rate = _decode_with_pyav(p)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - av.error.* and OSError alike mean "can't decode"
            raise UserError(f"could not decode audio file {p}: {e}") from None
    if data.shape[0] == 0:
        raise UserError(f"audio file has no samples: {p}")
    try:
        return to_mono_16k(data, int(rate))
    except UserError as e:
        raise UserError(f"{p}: {e}") from None


# --------------------------------------------------------------------------------------------
# Log-mel features (incremental)
# --------------------------------------------------------------------------------------------
def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mel = f / f_sp
    min_log_hz = 1000.0
    logstep = math.log(6.4) / 27.0
    log_part = min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_mel = 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, 1000.0 * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin_hz: float, fmax_hz: float
) -> np.ndarray:
    """Triangular Slaney-normalised mel filters, (n_mels, n_fft // 2 + 1) float64."""
    if not 0 <= fmin_hz < fmax_hz <= sample_rate / 2:
        raise UserError(f"mel range must satisfy 0 <= fmin < fmax <= {sample_rate / 2} Hz")
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin_hz), _hz_to_mel(fmax_hz), n_mels + 2))
    fdiff = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]  # equal area per filter
    return weights


class _LogMelCore:
    """The per-frame computation shared by the offline and the streaming paths."""

    def __init__(self, cfg: AudioConfig) -> None:
        if cfg.sample_rate != SAMPLE_RATE:
            raise UserError(f"audio.sample_rate must be {SAMPLE_RATE}, got {cfg.sample_rate}")
        if cfg.hop_samples <= 0 or SAMPLES_PER_FRAME % cfg.hop_samples:
            raise UserError(
                f"audio.hop_samples must divide {SAMPLES_PER_FRAME} (one video frame), "
                f"got {cfg.hop_samples}"
            )
        if cfg.n_fft < cfg.hop_samples:
            raise UserError("audio.n_fft must be >= audio.hop_samples")
        self.n_fft = cfg.n_fft
        self.hop = cfg.hop_samples
        self.n_mels = cfg.n_mels
        self.window = np.hanning(cfg.n_fft + 1)[:-1]  # periodic Hann, float64
        self.fb = mel_filterbank(SAMPLE_RATE, cfg.n_fft, cfg.n_mels, cfg.fmin_hz, cfg.fmax_hz)

    def frames(self, padded: np.ndarray, n_frames: int) -> np.ndarray:
        """padded: signal with n_fft - hop samples of left context in front of its first frame's
        hop; returns (n_frames, n_mels) float32 for frames starting at padded[k * hop]."""
        out = np.empty((n_frames, self.n_mels), dtype=np.float32)
        for k in range(n_frames):
            seg = padded[k * self.hop : k * self.hop + self.n_fft].astype(np.float64)
            spec = np.fft.rfft(seg * self.window)
            power = spec.real * spec.real + spec.imag * spec.imag
            mel = self.fb @ power
            out[k] = (np.log(np.maximum(mel, LOGMEL_FLOOR)) + LOGMEL_SHIFT) / LOGMEL_SCALE
        return out


def log_mel(samples: np.ndarray, cfg: AudioConfig | None = None) -> np.ndarray:
    """Offline log-mel of a whole signal.

    samples: (N,) float32 mono 16 kHz. Returns (N // hop, n_mels) float32, roughly in [-3, 3]
    (see module docstring for framing; frame j ends at sample (j + 1) * hop).
    """
    core = _LogMelCore(cfg or AudioConfig())
    x = np.asarray(samples, dtype=np.float32).reshape(-1)
    padded = np.concatenate([np.zeros(core.n_fft - core.hop, np.float32), x])
    return core.frames(padded, x.size // core.hop)


class LogMelStream:
    """Incremental log-mel: push chunks of any size, get exactly ``log_mel`` of the concatenation.

    State is the last n_fft - hop samples plus any incomplete hop; ``reset()`` drops it.
    """

    def __init__(self, cfg: AudioConfig | None = None) -> None:
        self._core = _LogMelCore(cfg or AudioConfig())
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(self._core.n_fft - self._core.hop, np.float32)
        self.frames_emitted = 0  # absolute index of the next frame
        self.samples_seen = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """samples: (n,) float32 mono 16 kHz -> (k, n_mels) float32 new frames (k may be 0)."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples_seen += x.size
        buf = np.concatenate([self._buf, x])
        n = (buf.size - (self._core.n_fft - self._core.hop)) // self._core.hop
        out = self._core.frames(buf, n)
        self._buf = buf[n * self._core.hop :]
        self.frames_emitted += n
        return out


# --------------------------------------------------------------------------------------------
# Front-end plug-ins
# --------------------------------------------------------------------------------------------
@runtime_checkable
class AudioFrontend(Protocol):
    """Audio -> feature frames at a fixed integer number per video frame."""

    frames_per_video_frame: int
    dim: int
    incremental: bool  # True: features of a prefix never change when more audio arrives

    def features(self, samples: np.ndarray) -> torch.Tensor:
        """samples: (N,) float32 mono 16 kHz -> (T_feat, dim) float32."""
        ...


class LogMelFrontend:
    """The built-in front end: 80 log-mels at 100 Hz, 4 frames per video frame, incremental."""

    incremental = True

    def __init__(self, cfg: AudioConfig | None = None) -> None:
        self.cfg = cfg or AudioConfig()
        _LogMelCore(self.cfg)  # validate now, not at the first call
        self.frames_per_video_frame = SAMPLES_PER_FRAME // self.cfg.hop_samples
        self.dim = self.cfg.n_mels

    def features(self, samples: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(log_mel(samples, self.cfg))

    def stream(self) -> LogMelStream:
        return LogMelStream(self.cfg)


class HubertFrontend(nn.Module):
    """HuBERT hidden states from a local ``transformers`` directory, mixed by softmax weights.

    All hidden states (embedding output + every layer) are combined with learnable softmax
    weights initialised to 0 (a plain average), as in AniTalker. HuBERT itself is frozen; only
    the mixing logits train. 50 Hz (hop 320), 2 frames per video frame. The input is padded with
    80 zeros on the left so that frame j ends at sample 320 (j + 1) (same convention as the
    log-mel: N samples -> N // 320 frames). HuBERT attends over its whole input, so it is *not*
    incremental: streaming must compute it per window segment (``incremental = False``).
    """

    incremental = False
    hop_samples = 320

    def __init__(self, path: str | Path, normalize: bool | None = None) -> None:
        super().__init__()
        p = Path(path)
        if not str(path) or not p.is_dir():
            raise UserError(
                f"audio.hubert_path must be a local directory with a transformers HuBERT model, "
                f"got '{path}'"
            )
        try:
            from transformers import HubertModel
        except ImportError:
            raise UserError(
                "the HuBERT front end needs the optional 'transformers' package "
                "(pip install transformers)"
            ) from None
        try:
            self.hubert = HubertModel.from_pretrained(str(p))
        except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/...
            raise UserError(f"could not load HuBERT from {p}: {e}") from None
        self.hubert.eval()
        self.hubert.requires_grad_(False)
        hcfg = self.hubert.config
        self.dim = int(hcfg.hidden_size)
        self.frames_per_video_frame = SAMPLES_PER_FRAME // self.hop_samples
        n_states = int(hcfg.num_hidden_layers) + 1
        self.layer_logits = nn.Parameter(torch.zeros(n_states))
        if normalize is None:
            normalize = self._read_do_normalize(p)
        self.normalize = normalize

    @staticmethod
    def _read_do_normalize(p: Path) -> bool:
        import json

        f = p / "preprocessor_config.json"
        if f.is_file():
            try:
                return bool(json.loads(f.read_text()).get("do_normalize", False))
            except (OSError, ValueError):
                return False
        return False

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav: (B, N) float32 16 kHz -> (B, N // 320, dim) float32."""
        n_out = wav.shape[1] // self.hop_samples
        x = torch.nn.functional.pad(wav, (80, max(0, 320 - wav.shape[1])))
        if self.normalize:
            x = (x - x.mean(dim=1, keepdim=True)) / torch.sqrt(x.var(dim=1, keepdim=True) + 1e-7)
        with torch.no_grad():
            states = self.hubert(x, output_hidden_states=True).hidden_states
        stacked = torch.stack(states, dim=0)[:, :, :n_out]  # (L+1, B, T, D)
        w = torch.softmax(self.layer_logits, dim=0)
        return torch.einsum("l,lbtd->btd", w, stacked)

    def features(self, samples: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(samples, dtype=np.float32).reshape(1, -1))
        return self.forward(x)[0]


def make_frontend(cfg: AudioConfig) -> AudioFrontend:
    """The front end named by ``cfg.frontend`` ("logmel" or "hubert")."""
    if cfg.frontend == "logmel":
        return LogMelFrontend(cfg)
    if cfg.frontend == "hubert":
        return HubertFrontend(cfg.hubert_path)  # type: ignore[return-value]
    raise UserError(f"audio.frontend must be 'logmel' or 'hubert', got '{cfg.frontend}'")


def silence_feature_row(frontend: AudioFrontend) -> torch.Tensor:
    """The feature row of digital silence, (dim,): what windows see before the stream starts."""
    return frontend.features(np.zeros(SAMPLES_PER_FRAME, np.float32))[0].detach().clone()
