"""Diffusion schedule, DDIM sampler and the α normaliser (ARCHITECTURE.md §3).

The sampler is a stateless function over a ``denoise(x_t, t) -> eps`` callable (k-diffusion
style): the loop lives here once, and every backend (PyTorch, ONNX Runtime, TensorRT) plugs in
a different callable. Conditioning (speech, reference, known prefix) is closed over by the
caller. All noise is an input, so a sample is a pure function of (x_T, conditioning).

Conventions: x is in the normalised α space, where the data lies in [-1, 1] per dimension
(``AlphaNormalizer``); t is an integer timestep in [0, T-1], passed to ``denoise`` as a (B,)
int64 tensor; ``alphas_cumprod[t]`` is ᾱ_t.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(timesteps: int, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """(T,) float64 betas, linearly spaced from ``start`` to ``end`` (DDPM)."""
    if timesteps < 1:
        raise ValueError("timesteps must be >= 1")
    if not 0 < start <= end < 1:
        raise ValueError("need 0 < beta_start <= beta_end < 1")
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


class DiffusionSchedule:
    """ᾱ_t for a beta schedule, and the forward (noising) process.

    betas: (T,) float64. Coefficients are kept in float64 and cast at use, so the schedule is
    the same numbers for every backend and dtype.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        self.betas = betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_timesteps = int(self.betas.shape[0])

    @classmethod
    def linear(cls, timesteps: int = 1000, start: float = 1e-4, end: float = 0.02):
        return cls(linear_betas(timesteps, start, end))

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather per-item coefficients for (B,) timesteps, shaped to broadcast over ``like``."""
        c = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return c.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise.

        x0, noise: (B, ...) same shape; t: (B,) int timesteps in [0, T-1]. Returns (B, ...).
        """
        a = self._coef(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - ᾱ_t) eps) / sqrt(ᾱ_t); shapes as ``q_sample``."""
        a = self._coef(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced descending timesteps, "trailing" spacing: T-1, T-1-T/S, ..., T/S - 1.

    Trailing (Lin et al., 2024) starts at the last timestep for any S and never spends a step
    at t = 0, where a denoiser call would barely change x; it matters at the few steps real
    time needs (S = 1 is a single jump from T-1).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    return [round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)]


def ddim_sample(
    denoise: Denoise,
    x_T: torch.Tensor,
    schedule: DiffusionSchedule,
    steps: int,
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from x_T to x_0.

    denoise: (x_t (B, ...), t (B,) int64) -> predicted noise, same shape as x_t.
    x_T: (B, ...) the starting noise (also the noise that known entries are diffused with).
    clamp: bounds for the predicted x0 at every step (None: no clamping); eps is re-derived from
        the clamped x0 so the step stays on a consistent trajectory (as guided-diffusion does).
    known, known_mask: optional inpainting of entries whose x0 is known (here: the α prefix).
        ``known`` has x_T's shape; ``known_mask`` broadcasts to it, 1 = known. Before each call
        the known entries of x_t are set to q_sample(known, t, x_T), after it their predicted
        x0 is replaced by ``known``; so the result equals ``known`` there exactly.
    Returns x_0, x_T's shape and dtype.
    """
    if (known is None) != (known_mask is None):
        raise ValueError("known and known_mask go together")
    ts = ddim_timesteps(schedule.num_timesteps, steps)
    acp = schedule.alphas_cumprod
    mask = None if known_mask is None else (known_mask > 0.5)
    known_x0 = known if known is not None else x_T  # only read where mask is set
    x = x_T
    batch = x_T.shape[0]
    for i, t in enumerate(ts):
        a_t = float(acp[t])
        a_prev = float(acp[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        s_t, s1_t = a_t**0.5, (1.0 - a_t) ** 0.5
        if mask is not None:
            x = torch.where(mask, s_t * known_x0 + s1_t * x_T, x)
        t_batch = torch.full((batch,), t, dtype=torch.int64, device=x.device)
        eps = denoise(x, t_batch)
        x0 = (x - s1_t * eps) / s_t
        if clamp is not None:
            x0 = x0.clamp(clamp[0], clamp[1])
        if mask is not None:
            x0 = torch.where(mask, known_x0, x0)
        if clamp is not None or mask is not None:
            eps = (x - s_t * x0) / s1_t
        x = a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps
    return x


class AlphaNormalizer(nn.Module):
    """Per-dimension affine map of α into [-1, 1] (the DDIM clamp range), saved as buffers.

    normalize(α) = (α - center) / half_range; ``fit`` chooses center/half_range from data:
    "minmax": the data's [min, max] maps to [-1, 1] shrunk by ``margin`` (room for unseen
    extremes); "meanstd": mean ± ``k`` standard deviations maps to ±1. Identity by default.
    """

    center: torch.Tensor
    half_range: torch.Tensor

    def __init__(self, dim: int = 20) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("half_range", torch.ones(dim))

    @torch.no_grad()
    def fit(
        self, alpha: torch.Tensor, mode: str = "minmax", margin: float = 0.05, k: float = 3.0
    ) -> AlphaNormalizer:
        """alpha: (N, dim) samples of raw α. Returns self."""
        a = alpha.reshape(-1, self.center.shape[0]).to(torch.float64)
        if mode == "minmax":
            lo, hi = a.min(0).values, a.max(0).values
            center, half = (hi + lo) / 2, (hi - lo) / 2 * (1.0 + margin)
        elif mode == "meanstd":
            center, half = a.mean(0), a.std(0) * k
        else:
            raise ValueError(f"normaliser mode must be 'minmax' or 'meanstd', got '{mode}'")
        self.center.copy_(center.to(self.center.dtype))
        self.half_range.copy_(half.clamp_min(1e-6).to(self.half_range.dtype))
        return self

    def normalize(self, alpha: torch.Tensor) -> torch.Tensor:
        """alpha: (..., dim) raw -> (..., dim) roughly in [-1, 1]."""
        return (alpha - self.center) / self.half_range

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) normalised -> raw α."""
        return x * self.half_range + self.center
