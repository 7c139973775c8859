"""Conversions between uint8 images (N, H, W, 3) and model tensors (N, 3, H, W) in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    arr = np.ascontiguousarray(frames)
    if not arr.flags.writeable:  # torch warns on read-only memory; .float() copies anyway
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    y = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()
