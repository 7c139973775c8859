"""Stage 2 networks: speech encoder, variance adapter, denoiser (ARCHITECTURE.md §3-4).

Each module is pure: tensors in, tensors out, no state kept between calls, noise given by the
caller. ``Stage2Nets`` bundles them with the α normaliser and exposes the two calls a backend
provides (``encode`` once per window, ``denoise`` once per DDIM step); the sampler loop and the
windowing live in ``engine.diffusion`` / ``engine.windowing``.

Control attributes (the variance adapter), in this order, packed as a (B, T, 5) value tensor
and a (B, T, 3) mask (1 = user-given, 0 = let the model predict):
    location  (1): x of the nose tip, in [-1, 1] of the image width
    scale     (1): face scale (brow-to-chin distance) relative to the reference frame's
    pose      (3): yaw, pitch, roll in degrees / 90
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.config import Config, ConformerConfig, Stage2Config
from engine.diffusion import AlphaNormalizer
from engine.models.conformer import Conformer

CONTROL_ATTRIBUTES: tuple[tuple[str, int], ...] = (("location", 1), ("scale", 1), ("pose", 3))
CONTROL_DIM = sum(d for _, d in CONTROL_ATTRIBUTES)  # 5 values
CONTROL_MASKS = len(CONTROL_ATTRIBUTES)  # 3 masks


class SpeechEncoder(nn.Module):
    """Audio features -> per-video-frame speech features.

    The ``frames_per_video_frame`` feature frames of each video frame are stacked and projected
    to d_model (a stride-F, kernel-F convolution written as reshape + linear: for HuBERT this is
    the paper's stride-2 conv to 512), then a Conformer.
    """

    def __init__(self, feat_dim: int, frames_per_video_frame: int, cfg: ConformerConfig) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.frames_per_video_frame = frames_per_video_frame
        self.in_proj = nn.Linear(feat_dim * frames_per_video_frame, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conformer = Conformer(cfg)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: (B, T_feat, D) with T_feat = F * T_frames -> (B, T_frames, d_model)."""
        b = feats.shape[0]
        # (B, F*T, D) -> (B, T, F*D): video frame n owns feature frames F*n .. F*n + F-1
        x = feats.reshape(b, -1, self.frames_per_video_frame * self.feat_dim)
        return self.conformer(self.dropout(self.in_proj(x)))


class VarianceAdapter(nn.Module):
    """Per attribute (location, scale, pose; in that order, FastSpeech2-style): a predictor
    (2-layer LSTM + linear) reads the current features, and an encoder (2-layer LSTM + linear to
    d) embeds the value actually used - the user's where the mask is 1, the prediction elsewhere
    - which is added to the features before the next attribute.

    The LSTMs start from a zero state on every call: a window runs them over its whole audio
    segment (context + window + look-ahead), so the result is a pure function of the segment
    and streaming == offline by construction; the context frames warm the state up.
    """

    def __init__(self, d_model: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.predictors = nn.ModuleList()
        self.pred_heads = nn.ModuleList()
        self.encoders = nn.ModuleList()
        self.enc_heads = nn.ModuleList()
        for _, dim in CONTROL_ATTRIBUTES:
            self.predictors.append(nn.LSTM(d_model, hidden, layers, batch_first=True))
            self.pred_heads.append(nn.Linear(hidden, dim))
            self.encoders.append(nn.LSTM(dim, hidden, layers, batch_first=True))
            self.enc_heads.append(nn.Linear(hidden, d_model))

    def forward(
        self, x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d) speech features; values: (B, T, 5) user controls (any where masked out);
        mask: (B, T, 3) in {0, 1}. Returns (features (B, T, d), predictions (B, T, 5))."""
        preds = []
        offset = 0
        for i, (_, dim) in enumerate(CONTROL_ATTRIBUTES):
            pred = self.pred_heads[i](self.predictors[i](x)[0])  # (B, T, dim)
            given = values[..., offset : offset + dim]
            used = torch.where(mask[..., i : i + 1] > 0.5, given, pred)
            x = x + self.enc_heads[i](self.encoders[i](used)[0])
            preds.append(pred)
            offset += dim
        return x, torch.cat(preds, dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the integer timestep -> MLP -> (B, dim)."""

    freqs: torch.Tensor

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        half = dim // 2
        # A buffer, not built in forward: exported graphs keep it as a constant.
        self.register_buffer(
            "freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False
        )
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) int or float timesteps -> (B, dim)."""
        args = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))


class Denoiser(nn.Module):
    """Predicts the noise on a window of normalised α's.

    Per frame: [speech (d_speech) | ref α -> c | ref h -> c | noisy α_t -> c | timestep -> c |
    known α + mask (21) -> c] -> linear to d -> Conformer -> linear -> ε (motion_dim).
    The "known" input is livehead's streaming prefix: already-emitted α's (normalised) on the
    prefix frames with mask 1, zeros with mask 0 on the frames to generate.
    """

    def __init__(
        self,
        motion_dim: int,
        speech_dim: int,
        latent_dim: int,
        cond_dim: int,
        cfg: ConformerConfig,
    ) -> None:
        super().__init__()
        self.ref_alpha_proj = nn.Linear(motion_dim, cond_dim)
        self.ref_h_proj = nn.Linear(latent_dim, cond_dim)
        self.x_proj = nn.Linear(motion_dim, cond_dim)
        self.known_proj = nn.Linear(motion_dim + 1, cond_dim)
        self.time_emb = TimestepEmbedding(cond_dim)
        self.in_proj = nn.Linear(speech_dim + 5 * cond_dim, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conformer = Conformer(cfg)
        self.out = nn.Linear(cfg.d_model, motion_dim)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        speech: torch.Tensor,
        ref_alpha: torch.Tensor,
        ref_h: torch.Tensor,
        known: torch.Tensor,
        known_mask: torch.Tensor,
    ) -> torch.Tensor:
        """x_t: (B, N, motion_dim) noisy normalised α; t: (B,) int64 timesteps;
        speech: (B, N, d_speech); ref_alpha: (B, motion_dim) normalised; ref_h: (B, latent_dim);
        known: (B, N, motion_dim) normalised (zeros where unknown); known_mask: (B, N, 1) {0,1}.
        Returns predicted noise ε, (B, N, motion_dim)."""
        n = x_t.shape[1]
        per_item = torch.cat(
            [self.ref_alpha_proj(ref_alpha), self.ref_h_proj(ref_h), self.time_emb(t)], dim=-1
        )  # (B, 3c), the same for every frame
        h = torch.cat(
            [
                speech,
                per_item.unsqueeze(1).expand(-1, n, -1),
                self.x_proj(x_t),
                self.known_proj(torch.cat([known * known_mask, known_mask], dim=-1)),
            ],
            dim=-1,
        )
        return self.out(self.conformer(self.dropout(self.in_proj(h))))


class Stage2Nets(nn.Module):
    """The stage-2 networks and the α normaliser, with one method per backend call."""

    def __init__(
        self,
        cfg: Stage2Config,
        feat_dim: int,
        frames_per_video_frame: int,
        motion_dim: int = 20,
        latent_dim: int = 512,
    ) -> None:
        super().__init__()
        self.motion_dim = motion_dim
        self.latent_dim = latent_dim
        self.frames_per_video_frame = frames_per_video_frame
        self.speech_encoder = SpeechEncoder(feat_dim, frames_per_video_frame, cfg.speech)
        self.adapter = VarianceAdapter(cfg.speech.d_model, cfg.adapter_hidden, cfg.adapter_layers)
        self.denoiser = Denoiser(
            motion_dim, cfg.speech.d_model, latent_dim, cfg.cond_dim, cfg.denoiser
        )
        self.normalizer = AlphaNormalizer(motion_dim)

    @classmethod
    def from_config(
        cls, cfg: Config, feat_dim: int | None = None, frames_per_video_frame: int | None = None
    ) -> Stage2Nets:
        """Build from a whole config: α and h sizes come from stage 1, the feature size from the
        front end (default: the log-mel of ``cfg.stage2.audio``; pass a plug-in's ``dim`` and
        ``frames_per_video_frame`` otherwise)."""
        audio = cfg.stage2.audio
        return cls(
            cfg.stage2,
            feat_dim if feat_dim is not None else audio.n_mels,
            frames_per_video_frame
            or (cfg.stage2.audio.sample_rate // cfg.stage2.fps) // audio.hop_samples,
            motion_dim=cfg.stage1.motion_dim,
            latent_dim=cfg.stage1.latent_dim,
        )

    def encode(
        self, feats: torch.Tensor, control_values: torch.Tensor, control_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: (B, F*T, D); control_values: (B, T, 5); control_mask: (B, T, 3).
        Returns (speech conditioning (B, T, d_speech), adapter predictions (B, T, 5))."""
        return self.adapter(self.speech_encoder(feats), control_values, control_mask)

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        speech: torch.Tensor,
        ref_alpha: torch.Tensor,
        ref_h: torch.Tensor,
        known: torch.Tensor,
        known_mask: torch.Tensor,
    ) -> torch.Tensor:
        """See ``Denoiser.forward`` (all α's normalised)."""
        return self.denoiser(x_t, t, speech, ref_alpha, ref_h, known, known_mask)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (buffers and frozen weights excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
