"""StyleGAN2 building blocks (rosinality's layout, as used by LIA and AniTalker), plain PyTorch.

No CUDA extensions: the fused leaky ReLU and the FIR filters (``upfirdn2d``) are written with
ordinary ops so the same code runs on CPU, CUDA, under autocast and through ONNX export.

Conventions: images and feature maps are (B, C, H, W); every op here is layout-agnostic
(``reshape`` not ``view``), so modules and inputs may be ``channels_last``.
Parameter shapes and counts equal the originals' except where a docstring says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# Activations and FIR filtering
# --------------------------------------------------------------------------------------------
def fused_leaky_relu(
    x: Tensor, bias: Tensor | None, negative_slope: float = 0.2, scale: float = SQRT2
) -> Tensor:
    """leaky_relu(x + bias) * sqrt(2): the √2 keeps the activation variance at 1 (StyleGAN2).

    x: (B, C) or (B, C, H, W); bias: (C,) or None.
    """
    if bias is not None:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x = x + bias.reshape(shape).to(x.dtype)
    return F.leaky_relu(x, negative_slope) * scale


class FusedLeakyReLU(nn.Module):
    """Bias + leaky ReLU(0.2) + gain √2 (``channels`` bias parameters)."""

    def __init__(self, channels: int, negative_slope: float = 0.2, scale: float = SQRT2) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class ScaledLeakyReLU(nn.Module):
    """Leaky ReLU(0.2) times √2, no bias (rosinality's; LIA's copy drops the gain). Only used
    where ``bias=False`` and ``activate=True``, which no livehead network does."""

    def __init__(self, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope) * SQRT2


def make_kernel(k: list[int] | Tensor) -> Tensor:
    """1-D taps -> normalised 2-D separable FIR kernel (sums to 1), float32 (K, K)."""
    t = torch.as_tensor(k, dtype=torch.float32)
    if t.ndim == 1:
        t = t[None, :] * t[:, None]
    return t / t.sum()


def upfirdn2d(
    x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Tensor:
    """Upsample (zero insertion), pad, FIR-filter, downsample; per channel (depthwise).

    Same maths as StyleGAN2's ``upfirdn2d_native`` but keeps channels as channels (a depthwise
    conv, not channels folded into the batch): faster on CPU and layout-preserving. The common
    cases take one fused op: symmetric padding goes into the conv's ``padding``, and ×2
    upsampling with StyleGAN's pads is a depthwise transposed conv (no zero-inserted copy).

    x: (B, C, H, W); kernel: (K, K) buffer (flipped here like the original, so asymmetric FIR
    taps behave identically); pad: (before, after), both >= 0, applied to H and W alike.
    Returns (B, C, (H*up + pad0 + pad1 - K + 1) // down, same for W), ceil-divided.
    """
    c = x.shape[1]
    kh, kw = kernel.shape
    k = kernel.to(x.dtype)
    if up > 1 and down == 1 and kh == kw and 0 <= pad[1] - pad[0] + 1 < up:
        p = kh - 1 - pad[0]
        if p >= 0:
            # out[n] = sum_i x[i] k[n + p - up*i]: conv_transpose with the unflipped kernel
            # (a materialised weight: a stride-0 expanded one sends CPU convs to a slow path)
            w = k.reshape(1, 1, kh, kw).repeat(c, 1, 1, 1)
            return F.conv_transpose2d(
                x, w, stride=up, padding=p, output_padding=pad[1] - pad[0] + 1, groups=c
            )
    if up > 1:
        # (B,C,H,1,W,1) padded with up-1 zeros after each sample -> (B,C,H*up,W*up)
        b, _, h, w_ = x.shape
        x = x.reshape(b, c, h, 1, w_, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w_ * up)
    weight = torch.flip(k, [0, 1]).reshape(1, 1, kh, kw).repeat(c, 1, 1, 1)
    if pad[0] == pad[1]:
        return F.conv2d(x, weight, stride=down, padding=pad[0], groups=c)
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    return F.conv2d(x, weight, stride=down, groups=c)


def pointwise(x: Tensor, w: Tensor) -> Tensor:
    """1×1 conv without bias as a matmul: x (B, C, H, W), w (O, C) shared or (B, O, C) per
    sample (x may then have batch 1: one source, B motions) -> (B, O, H, W) contiguous NCHW.

    For few output channels (flow, RGB) this beats mkldnn's conv, and a channels_last input is
    first made NCHW: a (HW, C) @ (C, 3) product with C = 8 runs ~6x slower than (3, C) @ (C, HW).
    """
    b, c, h, wd = x.shape
    y = w.to(x.dtype) @ x.contiguous().reshape(b, c, h * wd)  # (B, O, HW)
    # batch from the product: x of batch 1 against per-sample w (B, O, C) broadcasts to B
    return y.reshape(y.shape[0], -1, h, wd)


class Blur(nn.Module):
    """FIR low-pass (default [1,3,3,1]) with explicit padding; ``upsample_factor`` restores the
    gain lost by zero insertion (×factor²) when used after a transposed conv."""

    kernel: Tensor

    def __init__(self, kernel: list[int], pad: tuple[int, int], upsample_factor: int = 1) -> None:
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * (upsample_factor**2)
        self.register_buffer("kernel", k, persistent=False)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


def lerp(start: Tensor, end: Tensor, weight: Tensor | float) -> Tensor:
    """``torch.lerp`` (one fused kernel in eager PyTorch), written as start + weight·(end -
    start) while exporting to ONNX: the exporter's lerp computes both of torch's branches and
    picks one per element with Where (6-7 ops over the tensor instead of 3; in the tiny render
    graph its 66 Where nodes alone took 11.8 of 154 ms a call on 2 cores). The two agree to fp32
    rounding."""
    if torch.onnx.is_in_onnx_export():
        return start + weight * (end - start)
    return torch.lerp(start, end, weight)


def upsample2_fir4(x: Tensor, a: float) -> Tensor:
    """×2 upsampling by a symmetric 4-tap FIR [a, 1-a, 1-a, a] per axis (gain included), zero
    beyond the border: equal to ``upfirdn2d(x, kernel, up=2, pad=(2, 1))`` for that kernel.

    Polyphase form: out[2m] = (1-a)·x[m] + a·x[m-1], out[2m+1] = (1-a)·x[m] + a·x[m+1], i.e. two
    lerps per axis. About 2.5× faster on CPU than the depthwise transposed conv, which matters
    because every level upsamples its flow and RGB skips at full resolution.
    x: (B, C, H, W) -> (B, C, 2H, 2W).
    """
    b, c, h, w = x.shape
    xp = F.pad(x, [1, 1, 1, 1])  # zero border
    mid = xp[..., 1:-1]
    x2 = torch.stack([lerp(mid, xp[..., :-2], a), lerp(mid, xp[..., 2:], a)], dim=-1).reshape(
        b, c, h + 2, 2 * w
    )
    mid = x2[..., 1:-1, :]
    return torch.stack(
        [lerp(mid, x2[..., :-2, :], a), lerp(mid, x2[..., 2:, :], a)], dim=-2
    ).reshape(b, c, 2 * h, 2 * w)


class Upsample(nn.Module):
    """×factor FIR upsampling (zero insertion + blur with gain factor²): (B,C,H,W)->(B,C,2H,2W).

    A constant map stays the same constant (away from the zero-padded border), so an upsampled
    flow keeps its value. Symmetric 4-tap kernels at ×2 (the default [1,3,3,1]) take the
    polyphase fast path; anything else goes through ``upfirdn2d``.
    """

    kernel: Tensor

    def __init__(self, kernel: list[int], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        k = make_kernel(kernel) * (factor**2)
        self.register_buffer("kernel", k, persistent=False)
        p = k.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)
        taps = [float(t) for t in kernel]
        self.fir4_a: float | None = None
        if factor == 2 and len(taps) == 4 and taps == taps[::-1]:
            self.fir4_a = 2.0 * taps[0] / sum(taps)

    def forward(self, x: Tensor) -> Tensor:
        if self.fir4_a is not None:
            return upsample2_fir4(x, self.fir4_a)
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


# --------------------------------------------------------------------------------------------
# Equalised learning rate layers
# --------------------------------------------------------------------------------------------
class EqualConv2d(nn.Module):
    """Conv with weights ~ N(0, 1) scaled by 1/sqrt(fan_in) at run time (equalised LR): with Adam
    every layer then learns at the same relative rate, which StyleGAN2's lr 2e-3 relies on."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding
        )

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, k={k}, stride={self.stride}, padding={self.padding}"


class EqualLinear(nn.Module):
    """Linear with equalised LR (weight ~ N(0, 1/lr_mul), scaled at run time).

    activation=True applies the fused leaky ReLU (bias inside the activation, as the original).
    x: (..., in_dim) -> (..., out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, activation={self.activation}"


def plain_cnn(chans: list[int]) -> nn.Sequential:
    """A plain regression CNN body: per step a stride-2 3×3 conv and a 3×3 conv, each with
    GroupNorm(8) and SiLU; ``chans`` = input channels, then each step's width (the eval
    probe and the stage-1 head reader)."""
    layers: list[nn.Module] = []
    for a, b in zip(chans[:-1], chans[1:]):
        layers += [
            nn.Conv2d(a, b, 3, stride=2, padding=1),
            nn.GroupNorm(8, b),
            nn.SiLU(),
            nn.Conv2d(b, b, 3, padding=1),
            nn.GroupNorm(8, b),
            nn.SiLU(),
        ]
    return nn.Sequential(*layers)


class ConvLayer(nn.Sequential):
    """[Blur ->] EqualConv2d [-> FusedLeakyReLU]; ``downsample`` = blur then stride-2 conv
    (anti-aliased downsampling). Parameter layout equals rosinality's ``ConvLayer``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        downsample: bool = False,
        blur_kernel: list[int] | None = None,
        bias: bool = True,
        activate: bool = True,
    ) -> None:
        blur_kernel = blur_kernel or [1, 3, 3, 1]
        layers: list[nn.Module] = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(
            EqualConv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                bias=bias and not activate,
            )
        )
        if activate:
            layers.append(FusedLeakyReLU(out_channels) if bias else ScaledLeakyReLU(0.2))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """StyleGAN2 discriminator block: 3×3 conv, blurred 3×3 stride-2 conv; skip = blurred 1×1
    stride-2 conv (no bias, no activation); (main + skip)/√2 keeps unit variance.

    x: (B, in, H, W) -> (B, out, H/2, W/2).
    """

    def __init__(self, in_channels: int, out_channels: int, blur_kernel: list[int]) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(
            in_channels, out_channels, 3, downsample=True, blur_kernel=blur_kernel
        )
        self.skip = ConvLayer(
            in_channels,
            out_channels,
            1,
            downsample=True,
            blur_kernel=blur_kernel,
            bias=False,
            activate=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


# --------------------------------------------------------------------------------------------
# Style-modulated layers (generator side)
# --------------------------------------------------------------------------------------------
class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated conv: per-sample input-channel scales s = A(style) (bias init 1),
    optional demodulation, optional ×2 upsampling (transposed conv + blur).

    Implemented as "modulate activations, shared weight, demodulate outputs" (StyleGAN2-ADA's
    non-fused path), which is exactly equal to scaling the weights per sample but runs as one
    ordinary batched conv: faster on CPU than a grouped conv with B groups, any batch size
    exports to ONNX unchanged, and channels_last works.

    x: (B, in, H, W); style: (B, style_dim). Returns (B, out, H', W') with H' = 2H if upsample.
    Parameters: weight (out, in, k, k) [the original stores (1, out, in, k, k)] + modulation
    EqualLinear(style_dim, in).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: list[int] | None = None,
    ) -> None:
        super().__init__()
        blur_kernel = blur_kernel or [1, 3, 3, 1]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(
                blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor
            )

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        y, d = self.forward_undemodulated(x, style)
        return y if d is None else y * d.reshape(d.shape[0], -1, 1, 1).to(y.dtype)

    def forward_undemodulated(self, x: Tensor, style: Tensor) -> tuple[Tensor, Tensor | None]:
        """The conv of the modulated input, and the demodulation factors (B, out) to multiply
        it by (None without demodulation): lets StyledConv fuse them into its activation."""
        s = self.modulation(style)  # (B, in)
        w = self.weight * self.scale  # (out, in, k, k)
        if self.kernel_size == 1 and not self.upsample:
            # 1×1: fold the styles into per-sample weights, one batched contraction, no
            # modulated copy of the input (ToFlow runs this at full resolution)
            y = pointwise(x, w[:, :, 0, 0].unsqueeze(0) * s.unsqueeze(1))  # w: (B, out, in)
        elif self.upsample:
            x = x * s.reshape(s.shape[0], -1, 1, 1).to(x.dtype)
            # conv_transpose wants (in, out, k, k); stride 2, no padding -> 2H+1, blur -> 2H
            y = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)
            y = self.blur(y)
        else:
            x = x * s.reshape(s.shape[0], -1, 1, 1).to(x.dtype)
            y = F.conv2d(x, w, padding=self.padding)
        if not self.demodulate:
            return y, None
        # ||w * s||_2 over (in, k, k) per (sample, out) = s^2 @ sum_k(w^2)^T: (B, out)
        return y, torch.rsqrt(s.square() @ w.square().sum(dim=(2, 3)).t() + 1e-8)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, "
            f"upsample={self.upsample}, demodulate={self.demodulate}"
        )


class StyledConv(nn.Module):
    """ModulatedConv2d (demodulated) + FusedLeakyReLU.

    The original also has a NoiseInjection (one scalar weight) that LIA/AniTalker never feed;
    it is left out (networks here take noise only as an explicit input, and there is none).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: list[int] | None = None,
        demodulate: bool = True,
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channels,
            out_channels,
            kernel_size,
            style_dim,
            demodulate=demodulate,
            upsample=upsample,
            blur_kernel=blur_kernel,
        )
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        y, d = self.conv.forward_undemodulated(x, style)
        if d is None:
            return self.activate(y)
        # leaky_relu(y*d + b) * √2 == leaky_relu(y*(√2 d) + √2 b): leaky ReLU is positively
        # homogeneous, so demodulation, bias and gain fold into one addcmul (two passes over the
        # activations instead of four: these are memory-bound at 256² on a CPU)
        c = y.shape[1]
        scale = self.activate.scale
        b = (self.activate.bias * scale).reshape(1, c, 1, 1).to(y.dtype)
        y = torch.addcmul(b, y, (d * scale).reshape(-1, c, 1, 1).to(y.dtype))
        return F.leaky_relu(y, self.activate.negative_slope)


class ConstantInput(nn.Module):
    """Learned (1, C, size, size) constant, broadcast to the batch (a view, no copy)."""

    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1)
