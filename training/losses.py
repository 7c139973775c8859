"""Losses and image metrics for stage-1 training and evaluation.

Images are (B, 3, H, W) in [-1, 1] unless a docstring says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError


# --------------------------------------------------------------------------------------------
# SSIM / PSNR (also the weight-free perceptual loss)
# --------------------------------------------------------------------------------------------
def _gauss(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004, 11x11 Gaussian, sigma 1.5), per channel. (B,C,h,w)."""
    c = x.shape[1]
    g = _gauss(device=x.device).to(x.dtype)
    kh = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kw = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean SSIM per image, (B,). Inputs in a range of width ``data_range`` ([-1,1] -> 2)."""
    return ssim_map(x.float(), y.float(), data_range).mean(dim=(1, 2, 3))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB per image, (B,)."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(data_range**2 / mse)


class StructuralLoss(nn.Module):
    """Weight-free perceptual stand-in: 1 - SSIM on a 4-scale pyramid, averaged.

    Used when no local VGG-19 file is given (no pretrained backbone can be downloaded here).
    SSIM compares local means, contrast and structure, so like a VGG loss it rewards sharp,
    correctly placed edges instead of the blur an L1 loss alone settles for."""

    kind = "ms-ssim-structural"

    def __init__(self, scales: int = 4):
        super().__init__()
        self.scales = scales

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros(())
        for i in range(self.scales):
            if i:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            if min(x.shape[-2:]) < 16:
                break
            loss = loss + (1 - ssim_map(x.float(), y.float()).mean())
        return loss / self.scales


# VGG-19 "features": conv widths, 0 = 2x2 max-pool
_VGG19 = [64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0]
_VGG19 += [512, 512, 512, 512, 0]


class VGGPerceptual(nn.Module):
    """LIA/AniTalker's perceptual loss: VGG-19 relu1_1..relu5_1 features on a 4-scale pyramid.

    ``path``: a local state dict in torchvision's VGG-19 layout (keys ``features.N.weight``);
    nothing is downloaded."""

    kind = "vgg19"
    mean: torch.Tensor
    std: torch.Tensor
    _taps = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1

    def __init__(self, path: str | Path, scales: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG19:
            if v == 0:
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers[: self._taps[-1] + 1])
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"VGG-19 weights {path}: cannot be read ({e})") from None
        sd = {k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
        missing = self.features.load_state_dict(sd, strict=False).missing_keys
        if missing:
            raise UserError(f"VGG-19 weights {path}: missing {missing[:3]}...")
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.scales = scales

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros(())
        for i in range(self.scales):
            if i:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            for fx, fy in zip(self._feats(x), self._feats(y)):
                loss = loss + (fx - fy.detach()).abs().mean()
        return loss


def make_perceptual(vgg_path: str) -> nn.Module:
    return VGGPerceptual(vgg_path) if vgg_path else StructuralLoss()


# --------------------------------------------------------------------------------------------
# Adversarial (StyleGAN2 non-saturating) and R1
# --------------------------------------------------------------------------------------------
def g_nonsat(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def d_logistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------------------------
# Metric learning
# --------------------------------------------------------------------------------------------
def aam_softmax(
    emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: float, scale: float
) -> torch.Tensor:
    """Additive angular margin softmax (ArcFace): cos(theta + m) for the true class, scaled.

    emb: (B, D) embeddings; weight: (N, D) class centres; labels: (B,) in [0, N)."""
    cos = F.linear(F.normalize(emb.float()), F.normalize(weight.float())).clamp(-1 + 1e-6, 1 - 1e-6)
    theta = torch.acos(cos)
    target = torch.cos(theta + margin)
    onehot = F.one_hot(labels, cos.shape[1]).bool()
    logits = torch.where(onehot, target, cos) * scale
    return F.cross_entropy(logits, labels)
