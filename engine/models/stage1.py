"""Stage 1: identity-decoupled motion representation (ARCHITECTURE.md §2), pure PyTorch.

    model = Stage1Model(cfg.stage1)
    h, feats = model.encode(source)             # once per avatar
    alpha = model.motion(model.encode(driving)[0])
    frames = model.render(h, feats, alpha)      # a batch of alphas, one source pyramid

Layout follows LIA (wyhsirius/LIA, ``networks/``) as extended by AniTalker (X-LANCE/AniTalker,
``code/networks/``): a StyleGAN2-discriminator-like image encoder with a hierarchical aggregation
layer (HAL), identity / motion MLP heads, Linear Motion Decomposition (LMD), and a StyleGAN2
synthesis network that warps the encoder's feature pyramid level by level.

Widths are keyed by resolution, as the originals' ``channels`` dicts are:
``enc_channels`` lists widths from the largest resolution down to 4² and only its *last*
log2(S)-1 entries are used, ``dec_channels`` lists widths from 4² up and only its *first*
log2(S)-1 entries are used. So a config written for 256² also builds a 64² model (for tests) with
the same widths at the same resolutions. The encoder and renderer widths must agree at 8²…S²,
because warped encoder features are blended into the decoder features.

Parameter counts (``Stage1Model.param_counts``; tiny = configs/tiny.toml):

    ======================  ==========  =========  ==============================================
    module                       paper       tiny  what (paper)
    ======================  ==========  =========  ==============================================
    encoder (E)             21,635,648  2,927,944  1×1 conv, 6 ResBlocks, 4×4 conv 512->512
    hal                        230,920     64,776  EqualLinears 64/128/256->512 + 8 logits
    identity_head              525,312    131,584  512->512->512
    motion_head              1,586,196    399,892  MLP 512->512->512, 4×(512->512), 512->20
    lmd                         10,240      5,120  512×20 (+ a frozen-Q buffer, not a param)
    renderer (G)            22,407,972  3,160,906  const, 13 StyledConvs, 6 ToFlow, 6 ToRGB
    head_reader                      -  1,061,294  tiny only: plain CNN at 128², 14 fields
    ----------------------  ----------  ---------  ----------------------------------------------
    Stage1Model total       46,396,288  7,751,516  what ``Stage1Model`` holds
    CLUB (separate module)     787,968    197,376  512->512 trunk, mean and log-var heads
    Stage1Model + CLUB      47,184,256  7,948,892  paper: +0.6 % vs AniTalker's 46.9 M
    ======================  ==========  =========  ==============================================

The tiny renderer holds the livehead extensions ``paint``, ``inject``, ``detail`` (187,280 of
its parameters) and ``head_warp`` (88,374); ``head_reader`` is a network of its own that the
renderer never runs (video-driven reenactment only). All off in the paper config, see
``Stage1Config``.

AniTalker's "46.9 M" is the parameter count of its ``Generator`` (46,923,173 with the official
code): it holds E, HAL, the decoupling MLPs, the 5 motion linears, LMD and G, *and* the CLUB
variational MLP (``DecouplingModel.identity_net_density``, 512->512->512, 525,312, mean only).
The same modules here without CLUB total 46.40 M (-1.1 %); with livehead's CLUB, which adds a
log-variance head, 47.18 M (+0.6 %). Not counted anywhere: the discriminator and the AAM-softmax
head. Small departures from the official code: no NoiseInjection scalars (13, never fed), no
unused 4² ``to_rgb1`` (1,542), ToRGB is a plain 1×1 conv with one bias (official: conv + leaky
ReLU + a second bias, 18 more), MLP heads use equalised-LR linears (same shapes as nn.Linear).
LIA itself (no HAL, no decoupling MLPs) has 45.1 M in this layout.

Behavioural departures, each for a reason given where it is implemented: the identity sampling
grid is exact for ``align_corners=False`` (the original's linspace grid zooms by (N-1)/N); the
ToFlow conv starts at zero (identity warp at init); the output is tanh-bounded; Q is made unique
(positive diag(R)); flow, mask, warp and the RGB skip run in fp32 even under autocast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import ConfigError, Stage1Config
from engine.models.layers import (
    ConstantInput,
    ConvLayer,
    EqualConv2d,
    EqualLinear,
    ModulatedConv2d,
    ResBlock,
    StyledConv,
    Upsample,
    lerp,
    plain_cnn,
    pointwise,
)


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------
def level_sizes(image_size: int) -> list[int]:
    """Resolutions of the synthesis levels: [4, 8, ..., image_size]."""
    return [2**i for i in range(2, int(math.log2(image_size)) + 1)]


def encoder_widths(cfg: Stage1Config) -> list[int]:
    """Encoder widths at resolutions [S, S/2, ..., 4] (layer 0, then each ResBlock's output)."""
    n = len(level_sizes(cfg.image_size))
    if len(cfg.enc_channels) < n:
        raise ConfigError(
            f"stage1.enc_channels has {len(cfg.enc_channels)} widths; image_size "
            f"{cfg.image_size} needs {n} (one per resolution {cfg.image_size}..4)"
        )
    return list(cfg.enc_channels[-n:])


def decoder_widths(cfg: Stage1Config) -> list[int]:
    """Renderer widths at resolutions [4, 8, ..., S]."""
    n = len(level_sizes(cfg.image_size))
    if len(cfg.dec_channels) < n:
        raise ConfigError(
            f"stage1.dec_channels has {len(cfg.dec_channels)} widths; image_size "
            f"{cfg.image_size} needs {n} (one per resolution 4..{cfg.image_size})"
        )
    return list(cfg.dec_channels[:n])


def check_config(cfg: Stage1Config) -> None:
    """Raise ConfigError (a UserError) naming the field when a Stage1Config cannot build a
    model."""
    s = cfg.image_size
    if s < 8 or s & (s - 1):
        raise ConfigError(f"stage1.image_size must be a power of two >= 8, got {s}")
    if len(cfg.blur_kernel) < 2:
        raise ConfigError(f"stage1.blur_kernel needs at least 2 taps, got {cfg.blur_kernel}")
    if not 1 <= cfg.motion_dim <= cfg.latent_dim:
        raise ConfigError(f"stage1.motion_dim must be in [1, latent_dim], got {cfg.motion_dim}")
    if cfg.motion_linears < 1:
        raise ConfigError(f"stage1.motion_linears must be >= 1, got {cfg.motion_linears}")
    enc = encoder_widths(cfg)[::-1]  # 4..S
    dec = decoder_widths(cfg)
    sizes = level_sizes(s)
    for r, e, d in zip(sizes[1:], enc[1:], dec[1:]):
        if e != d:
            raise ConfigError(
                f"stage1: encoder width {e} and renderer width {d} differ at {r}x{r}; warped "
                "encoder features are blended into the renderer features, so they must match"
            )


def identity_grid(size: int) -> Tensor:
    """Sampling grid that ``grid_sample(..., align_corners=False)`` maps onto itself.

    Returns (1, size, size, 2) float32, last axis (x, y) in (-1, 1): pixel centres (2i+1)/N - 1.
    """
    c = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0)


def fp32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside, so flow/mask/grid stay fp32 (a bf16 grid loses up to 0.5 px at 256²).

    Outside autocast this is a no-op, which keeps exported graphs free of autocast nodes.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def fast_tanh(x: Tensor) -> Tensor:
    """tanh(x) = 2·sigmoid(2x) - 1, exact to fp32 rounding: torch's CPU tanh is ~4× slower than
    sigmoid here, and this runs on full-resolution maps. Exactly 0 at 0, within [-1, 1]."""
    return torch.sigmoid(2.0 * x) * 2.0 - 1.0


def flow_and_mask(raw: Tensor) -> tuple[Tensor, Tensor]:
    """ToFlow logits (B, 3, r, r) -> offset = tanh(raw[:, :2]) (B, 2, r, r) in (-1, 1)
    (normalised units, 2/r per pixel) and mask = sigmoid(raw[:, 2:]) (B, 1, r, r) in (0, 1)."""
    return fast_tanh(raw[:, :2]), torch.sigmoid(raw[:, 2:3])


def warp(feat: Tensor, offset: Tensor, grid: Tensor) -> Tensor:
    """Bilinear backward warp: out[..., y, x] = feat sampled at grid[y, x] + offset[:, :, y, x].

    feat: (B, C, H, W); offset: (B, 2, H, W) as (dx, dy) in normalised units (2/W per pixel);
    grid: (1, H, W, 2) from ``identity_grid``. Zero padding outside the image.
    """
    g = grid + offset.permute(0, 2, 3, 1)
    return F.grid_sample(feat, g, mode="bilinear", padding_mode="zeros", align_corners=False)


# The synthetic world's conventions that ``stage1.head_warp`` reads alpha with (checked against
# training/stage1_data.aux_stats and the world's rigs by tests/test_head_warp.py): alpha[0:6]
# = (field - mean) / std for yaw, pitch, roll (degrees/90), loc_x, loc_y (the nose tip, image
# coords in [-1, 1]) and scale (the 3D brow-to-chin distance over the image height).
HEAD_FIELD_MEAN = (0.000986, 0.000110, -0.000330, 0.000613, 0.119308, 0.359783)
HEAD_FIELD_STD = (0.148072, 0.069854, 0.050353, 0.069548, 0.050033, 0.034789)
HEAD_DIMS = len(HEAD_FIELD_MEAN)  # alpha[0:6]: the head's pose, place and size
# a horizontal mirror negates yaw, roll and loc_x and keeps pitch, loc_y and scale
HEAD_MIRROR = (-1.0, 1.0, -1.0, -1.0, 1.0, 1.0)
# alpha[6:14] = the world's face fields, standardised alike (a head reader with
# stage1.head_reader_fields = 14 reads them too): mouth_open, mouth_width, mouth_round, blink_l,
# blink_r, brow, gaze_x, gaze_y. A mirror swaps the eyes and negates gaze_x.
FACE_FIELD_MEAN = (0.282859, 0.505147, 0.189986, 0.23037, 0.231797, 0.286642, -0.001033, 0.001859)
FACE_FIELD_STD = (0.276119, 0.149175, 0.220518, 0.285298, 0.285731, 0.199297, 0.348743, 0.249132)
READ_FIELDS = (HEAD_DIMS, HEAD_DIMS + len(FACE_FIELD_MEAN))  # what a head reader may read
_MIRROR_SIGN = (*HEAD_MIRROR, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, 1.0)
_MIRROR_PERM = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9, 11, 12, 13)
# Mean over identities of the nose tip (head-local, head units, the cranium's centre at the
# origin; x right, y up, z towards the camera) and of the 3D brow-to-chin distance.
HEAD_NOSE_TIP = (0.0, -0.3473, 0.9518)
HEAD_BROW_CHIN = 1.4297


def head_centre(fields: Tensor) -> Tensor:
    """(B, 6) yaw, pitch, roll, loc_x, loc_y, scale -> (B, 2) where the cranium's centre is
    drawn (image coords in [-1, 1]): the nose tip minus the rotated nose vector, as the world
    places heads (yaw, then pitch, then roll)."""
    ang = fields[:, :3] * (math.pi / 2)
    cy, sy = torch.cos(ang[:, 0]), torch.sin(ang[:, 0])
    cp, sp = torch.cos(ang[:, 1]), torch.sin(ang[:, 1])
    cr, sr = torch.cos(ang[:, 2]), torch.sin(ang[:, 2])
    vx, vy, vz = (-v for v in HEAD_NOSE_TIP)  # centre - tip; vx = 0
    a = sy * vz + cy * vx  # R_yaw · v
    b0 = vy
    c0 = -sy * vx + cy * vz
    b = cp * b0 + sp * c0  # R_pitch ·
    dx = cr * a - sr * b  # R_roll ·
    dy = sr * a + cr * b
    k = 2.0 * fields[:, 5] / HEAD_BROW_CHIN  # image units per head unit
    return torch.stack([fields[:, 3] + k * dx, fields[:, 4] - k * dy], dim=1)


def head_similarity(alpha_src: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """The head's rigid motion as a backward map, target pixel p -> source point A·p + t.

    alpha_src: (1 or B, motion_dim) the source's motion; alpha: (B, motion_dim) the target's.
    Returns A (B, 2, 2), t (B, 2), float32, in grid units (align_corners=False, x right,
    y down): scale by the sizes' ratio and rotation by the roll difference about the two
    cranium centres.
    """

    # per column with Python scalars: no host-to-device copy, so CUDA graphs can capture it
    def fields(a: Tensor) -> Tensor:
        a = a.float()
        cols = [a[:, i] * HEAD_FIELD_STD[i] + HEAD_FIELD_MEAN[i] for i in range(HEAD_DIMS)]
        return torch.stack(cols, dim=1)

    fs = fields(alpha_src)
    ft = fields(alpha)
    fs = fs.expand_as(ft)
    cs, ct = head_centre(fs), head_centre(ft)
    # sizes far outside the world's (0.2-0.6) only come from a wild alpha: keep the map finite
    k = fs[:, 5].clamp(0.05, 2.0) / ft[:, 5].clamp(0.05, 2.0)
    th = (ft[:, 2] - fs[:, 2]) * (math.pi / 2)
    c, s = torch.cos(th) * k, torch.sin(th) * k
    a = torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)  # (B, 2, 2)
    t = cs - (a @ ct.unsqueeze(2)).squeeze(2)
    return a, t


def head_offset(a: Tensor, t: Tensor, grid: Tensor) -> Tensor:
    """The similarity (``head_similarity``) at one level: grid (1, r, r, 2) -> offset
    (B, 2, r, r) in ``warp``'s units (source point minus pixel)."""
    r = grid.shape[1]
    # offset = (A - I)·p + t as one (B, 2, 3) @ (1, 3, r²) product with p = (x, y, 1): the
    # (B, 2, r, r) layout comes straight out (no per-pixel add over a last axis of 2, no
    # transpose; ONNX Runtime spent ~6 ms a 2-frame call on those at 256² and 128²)
    eye = torch.eye(2, dtype=a.dtype, device=a.device)
    m = torch.cat([a - eye, t.unsqueeze(2)], dim=2)
    p = grid.reshape(r * r, 2).t()
    p = torch.cat([p, torch.ones_like(p[:1])], dim=0)
    return (m @ p).reshape(-1, 2, r, r)


class HeadReader(nn.Module):
    """livehead extension (``stage1.head_reader``; synthetic world only): a plain CNN of its own
    that reads the head's absolute pose, place and size off a frame, in alpha[0:HEAD_DIMS]'s
    units (the world's standardised yaw, pitch, roll, loc_x, loc_y, scale; see HEAD_FIELD_*),
    and with ``fields`` = 14 (``stage1.head_reader_fields``) the face's expression too,
    alpha[6:14] (FACE_FIELD_*). Trained on the world's exact truth by ``livehead train
    reader``; ``ready`` is 1 once it is (the stage-1 trainer carries it unchanged).
    Video-driven reenactment takes the fields it reads of every driving frame from it
    (``engine.reenact``).

    (B, 3, S, S) in [-1, 1] -> (B, fields). Frames are read at 128² with two coordinate
    channels (CoordConv), so the flattened 4² map knows where in the frame it looked. With
    ``stage1.head_reader_size`` = 128 · 2^k above 128, a fine branch (k stride-2 steps of a
    quarter of the first width) reads the frame at that size too and its 128² map joins the
    body's input, whose first conv takes those channels with weights that start at zero: a
    128² reader grown to a bigger size (``livehead train reader --warm-start --size 256``)
    reads exactly as before until training uses the detail (``grow_from``).
    """

    coords: Tensor  # (2, 128, 128) x, y in [-1, 1]
    coords_fine: Tensor  # (2, size, size) for the fine branch (empty at 128)
    ready: Tensor  # () 1.0 once trained
    field_mean: Tensor  # (fields,) the world's mean and spread of each field read
    field_std: Tensor
    mirror_sign: Tensor  # (fields,) a mirror's sign on each field (world units)
    mirror_perm: Tensor  # (fields,) long: which field a mirror moves into each place

    BASE = 128

    def __init__(self, width: int = 32, size: int = 128, fields: int = HEAD_DIMS) -> None:
        super().__init__()
        extra = size.bit_length() - 8  # 128 -> 0, 256 -> 1, ...
        if extra < 0 or size != self.BASE << extra:
            raise ConfigError(f"stage1.head_reader_size must be 128 · 2^k, got {size}")
        if fields not in READ_FIELDS:
            raise ConfigError(
                f"stage1.head_reader_fields must be one of {READ_FIELDS}, got {fields}"
            )
        self.size, self.fields = size, fields
        fine = width // 4 if extra else 0
        self.fine = plain_cnn([5] + [fine] * extra) if extra else None
        chans = [5 + fine, width, width * 2, width * 3, width * 4, width * 6]  # RGB + x, y
        self.body = plain_cnn(chans)
        self.out = nn.Linear(chans[-1] * 4 * 4, fields)

        def grid(n: int) -> Tensor:
            lin = torch.linspace(-1.0, 1.0, n)
            return torch.stack(torch.meshgrid(lin, lin, indexing="xy"))

        self.register_buffer("coords", grid(self.BASE))
        self.register_buffer(
            "coords_fine", grid(size) if extra else torch.zeros(0), persistent=False
        )
        self.register_buffer("ready", torch.zeros(()))
        # read()'s mirroring, built once (not stored in weight files)
        mean = torch.tensor((HEAD_FIELD_MEAN + FACE_FIELD_MEAN)[:fields])
        std = torch.tensor((HEAD_FIELD_STD + FACE_FIELD_STD)[:fields])
        self.register_buffer("field_mean", mean, persistent=False)
        self.register_buffer("field_std", std, persistent=False)
        self.register_buffer("mirror_sign", torch.tensor(_MIRROR_SIGN[:fields]), persistent=False)
        self.register_buffer("mirror_perm", torch.tensor(_MIRROR_PERM[:fields]), persistent=False)

    def forward(self, img: Tensor) -> Tensor:
        x = img.float()
        n = x.shape[0]

        def at(side: int) -> Tensor:
            if x.shape[-1] == side:
                return x
            return F.interpolate(x, size=side, mode="bilinear", antialias=True)

        h = torch.cat([at(self.BASE), self.coords.expand(n, -1, -1, -1)], dim=1)
        if self.fine is not None:
            fine = torch.cat([at(self.size), self.coords_fine.expand(n, -1, -1, -1)], dim=1)
            h = torch.cat([h, self.fine(fine)], dim=1)
        return self.out(self.body(h).flatten(1))

    def grow_from(self, state: dict[str, Tensor]) -> None:
        """Load a trained reader's state (``state_dict`` of a reader of 128², or of this
        size, and of up to this many fields): the fine branch fresh, the body's weights for its
        channels zero (so the reading is the old reader's), outputs beyond the old reader's
        fields fresh."""
        own = self.state_dict()
        state = dict(state)
        for k in ("out.weight", "out.bias", "body.0.weight"):
            old, grown = state[k], own[k].clone()
            if k == "body.0.weight":
                grown[:, old.shape[1] :] = 0.0
            grown[tuple(slice(0, d) for d in old.shape)] = old
            state[k] = grown
        for k, v in own.items():
            state.setdefault(k, v)  # the fine branch: this reader's fresh weights
        self.load_state_dict(state)

    def read(self, img: Tensor) -> Tensor:
        """What reenactment uses: the mean of the reading of the frame and of the mirrored
        frame, mirrored back (the eyes swapped, signs as ``HEAD_MIRROR``). Measured on held-out
        faces, mean abs error in standardised units: at step 1930 of 3000 0.150 -> 0.133 (yaw
        0.065 -> 0.047); the session-15 reader (step 3000) 0.101 -> 0.095."""
        b = img.shape[0]
        both = self(torch.cat([img, img.flip(-1)]))
        mean, std = self.field_mean, self.field_std
        world = (both[b:] * std + mean)[:, self.mirror_perm]  # the eyes swap places
        mirrored = (world * self.mirror_sign - mean) / std
        return (both[:b] + mirrored) / 2


class HeadWarp(nn.Module):
    """livehead extension (``stage1.head_warp``), one per level: the source features moved by
    the head's rigid motion, M = warp(F_r, offset_head), are added to the renderer's features
    through a 1×1 conv (zero at init) and give a per-pixel gate g = sigmoid(10·(W·M + V·x + b)
    + up(previous level's logit)); the flow becomes the learned offset + g · offset_head. Where
    the source's head lands, g can open from the moved features alone: the renderer no longer
    has to draw the head's new outline from a style vector.

    W, V and b start at zero, so the gate starts half open everywhere; the factor 10 is a
    learning-rate multiplier (Adam moves a parameter by about lr a step whatever its gradient):
    with a gate that started nearly shut (b = -5, no multiplier) it had not moved after 600 CPU
    steps of 8 (session 14)."""

    GATE_LR_MUL = 10.0

    def __init__(self, channels: int, blur_kernel: list[int]) -> None:
        super().__init__()
        self.inject = EqualConv2d(channels, channels, 1, bias=False)
        nn.init.zeros_(self.inject.weight)
        self.gate_moved = EqualConv2d(channels, 1, 1)
        nn.init.zeros_(self.gate_moved.weight)
        self.gate_x = EqualConv2d(channels, 1, 1, bias=False)
        nn.init.zeros_(self.gate_x.weight)
        self.upsample = Upsample(blur_kernel)

    def forward(
        self, x: Tensor, feat: Tensor, offset: Tensor, grid: Tensor, skip: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, C, r, r) renderer features; feat: (1 or B, C, r, r) source features; offset:
        (B, 2, r, r) from ``head_offset``; skip: the previous level's gate logit or None.

        Returns x (B, C, r, r) with the moved features added (x's dtype and layout), the gated
        offset g·offset (B, 2, r, r) float32 and the gate logit (B, 1, r, r) float32."""
        with fp32_region(x.device.type):
            f = feat.float().expand(x.shape[0], -1, -1, -1)
            moved = warp(f, offset, grid)
            w = self.gate_moved.weight[:, :, 0, 0] * self.gate_moved.scale
            logit = pointwise(moved, w) + pointwise(
                x.float(), self.gate_x.weight[:, :, 0, 0] * self.gate_x.scale
            )
            assert self.gate_moved.bias is not None
            logit = (logit + self.gate_moved.bias.reshape(1, 1, 1, 1)) * self.GATE_LR_MUL
            if skip is not None:
                logit = logit + self.upsample(skip)
            gated = torch.sigmoid(logit) * offset
        y = pointwise(moved.to(x.dtype), self.inject.weight[:, :, 0, 0] * self.inject.scale)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)
        return x + y.to(x.dtype), gated, logit


# --------------------------------------------------------------------------------------------
# Image encoder E with hierarchical aggregation (HAL)
# --------------------------------------------------------------------------------------------
class ImageEncoder(nn.Module):
    """E: image -> (h, feature pyramid).

    Layer 0 is a 1×1 conv 3->C_S; ResBlocks halve the resolution down to 4²; a 4×4 valid conv
    gives a (latent,) vector. HAL: every layer's output is global-average-pooled, widths other
    than latent_dim are projected by an EqualLinear, and h is their softmax-weighted sum (one
    learnable logit per layer, zero at init = plain mean) -- multi-scale input for the motion path.
    """

    def __init__(self, cfg: Stage1Config) -> None:
        super().__init__()
        check_config(cfg)
        widths = encoder_widths(cfg)  # S..4
        bk = list(cfg.blur_kernel)
        latent = cfg.latent_dim
        self.layers = nn.ModuleList([ConvLayer(3, widths[0], 1, blur_kernel=bk)])
        for a, b in zip(widths[:-1], widths[1:]):
            self.layers.append(ResBlock(a, b, bk))
        self.final = EqualConv2d(widths[-1], latent, 4, padding=0, bias=False)
        # HAL: one projection per layer output (identity where the width is already latent)
        self.hal_proj = nn.ModuleList(
            [EqualLinear(w, latent) if w != latent else nn.Identity() for w in widths]
        )
        self.hal_logits = nn.Parameter(torch.zeros(len(widths) + 1))

    def forward(self, img: Tensor) -> tuple[Tensor, list[Tensor]]:
        """img: (B, 3, S, S) in [-1, 1].

        Returns h: (B, latent) and feats: the ResBlock/layer-0 outputs from 8² up to S²
        (coarse to fine, the order the renderer consumes them), feats[i]: (B, C_r, r, r)
        float32 (h follows autocast).
        """
        x = img
        outs: list[Tensor] = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        top = self.final(x).flatten(1)  # (B, latent)
        pooled = [proj(o.mean(dim=(2, 3))) for proj, o in zip(self.hal_proj, outs)]
        pooled.append(top)
        w = torch.softmax(self.hal_logits.float(), dim=0).to(top.dtype)
        h = (torch.stack(pooled, dim=0) * w[:, None, None]).sum(dim=0)
        # drop the 4² output; 8² .. S². fp32 because the warp samples them in fp32: casting
        # here once per avatar beats casting in every render call under bf16 autocast
        feats = [f.float() for f in outs[:-1][::-1]]
        return h, feats


# --------------------------------------------------------------------------------------------
# Decoupling heads
# --------------------------------------------------------------------------------------------
class HeadMLP(nn.Module):
    """latent -> hidden -> out with ReLU (AniTalker's identity / motion encoders)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = EqualLinear(in_dim, hidden)
        self.fc2 = EqualLinear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MotionHead(nn.Module):
    """h -> z_m (MLP) -> alpha: ``motion_linears`` stacked linears, no activation (as the
    original; together they are one linear map, but the factorisation changes how Adam trains it).

    h: (B, latent) -> z_m: (B, latent), alpha: (B, motion_dim), unbounded.
    """

    def __init__(self, cfg: Stage1Config) -> None:
        super().__init__()
        self.mlp = HeadMLP(cfg.latent_dim, cfg.head_hidden, cfg.latent_dim)
        dims = [cfg.latent_dim] * cfg.motion_linears + [cfg.motion_dim]
        self.to_alpha = nn.Sequential(*[EqualLinear(a, b) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        z_m = self.mlp(h)
        return z_m, self.to_alpha(z_m)


# --------------------------------------------------------------------------------------------
# Linear Motion Decomposition
# --------------------------------------------------------------------------------------------
class LinearMotionDecomposition(nn.Module):
    """Q: motion_dim orthonormal directions in R^latent; offset = alpha @ Q^T.

    Training: a free (latent, motion_dim) weight, orthonormalised by reduced QR in fp32 on every
    call (no bf16 QR kernel on CPU). Q is made unique by flipping columns so diag(R) > 0, so CPU
    and CUDA agree. ``freeze()`` stores Q in the ``q`` buffer (saved with the state dict) and
    from then on uses it verbatim: export graphs then hold a constant, not a QR.
    """

    q: Tensor
    q_frozen: Tensor

    def __init__(self, latent_dim: int, motion_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(latent_dim, motion_dim))
        self.register_buffer("q", torch.zeros(latent_dim, motion_dim))
        self.register_buffer("q_frozen", torch.zeros((), dtype=torch.bool))
        # Python mirror of q_frozen: branching on a tensor would sync the device every call
        self._frozen = False
        self.register_load_state_dict_post_hook(LinearMotionDecomposition._sync_frozen)

    @staticmethod
    def _sync_frozen(module: LinearMotionDecomposition, incompatible_keys: object) -> None:
        module._frozen = bool(module.q_frozen)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def orthonormalise(self) -> Tensor:
        """QR of the weight: (latent, motion_dim) float32 with Q^T Q = I."""
        with fp32_region(self.weight.device.type):
            q, r = torch.linalg.qr(self.weight.float(), mode="reduced")
            sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
            return q * sign

    def directions(self) -> Tensor:
        """Q: (latent, motion_dim) float32, orthonormal columns."""
        return self.q if self._frozen else self.orthonormalise()

    @torch.no_grad()
    def freeze(self) -> None:
        """Cache Q (from the current weight) and use the cache from now on."""
        self.q.copy_(self.orthonormalise())
        self.q_frozen.fill_(True)
        self._frozen = True

    @torch.no_grad()
    def unfreeze(self) -> None:
        self.q_frozen.fill_(False)
        self._frozen = False

    def forward(self, alpha: Tensor) -> Tensor:
        """alpha: (B, motion_dim) -> offset (B, latent) = sum_k alpha_k q_k, float32."""
        q = self.directions()
        with fp32_region(q.device.type):
            return alpha.float() @ q.t()


# --------------------------------------------------------------------------------------------
# Renderer G
# --------------------------------------------------------------------------------------------
class ToFlow(nn.Module):
    """Styled 1×1 conv -> 3 channels (+ the upsampled previous level's): 2 -> tanh offset from
    the identity grid, 1 -> sigmoid mask m. Warps the encoder features and blends:
    fw = warp(F, offset)·m, next = fw + x·(1-m).

    The conv weight starts at zero, so at init the warp is the identity (offset 0, m = 1/2):
    the renderer starts from "copy the source features" instead of a random flow.
    Everything here runs in fp32 (3 output channels: cheap) so the grid is exact under bf16.
    """

    def __init__(self, in_channels: int, style_dim: int, blur_kernel: list[int]) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        nn.init.zeros_(self.conv.weight)
        self.bias = nn.Parameter(torch.zeros(3))
        self.upsample = Upsample(blur_kernel)

    def forward(
        self,
        x: Tensor,
        style: Tensor,
        feat: Tensor,
        grid: Tensor,
        skip: Tensor | None,
        extra: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, C, r, r) decoder features; style: (B, latent); feat: (B or 1, C, r, r) encoder
        features; grid: (1, r, r, 2); skip: (B, 3, r/2, r/2) previous level's raw output or None;
        extra: (B, 2, r, r) an offset added to the learned one (``HeadWarp``'s) or None.

        Returns fw (B, C, r, r) warped·masked features, x_next (B, C, r, r), raw (B, 3, r, r)
        (pre-activation flow/mask logits, the next level's skip). All float32.
        """
        with fp32_region(x.device.type):
            raw = self.conv(x.float(), style.float()) + self.bias.reshape(1, 3, 1, 1)
            if skip is not None:
                raw = raw + self.upsample(skip)
            offset, mask = flow_and_mask(raw)
            if extra is not None:
                offset = offset + extra
            feat = feat.float().expand(x.shape[0], -1, -1, -1)
            warped = warp(feat, offset, grid)  # NCHW whatever the input layout
            fw = warped * mask
            xf = x.float()
            if xf.is_contiguous(memory_format=torch.channels_last) and not xf.is_contiguous():
                # keep the decoder channels_last: a layout mix makes every later op slow
                warped = warped.contiguous(memory_format=torch.channels_last)
            x_next = lerp(xf, warped, mask)  # = fw + x·(1-m), one pass
        return fw, x_next, raw


class ToRGB(nn.Module):
    """1×1 conv C->3 (+ upsampled skip): RGB accumulated coarse to fine, in fp32 (the sum of six
    levels in bf16 would cost about one 8-bit grey level).

    With ``paint`` a second 1×1 conv (no bias, zero at init, so a model without it loads with
    the same output) reads the renderer's own features where the mask hid the source."""

    def __init__(
        self,
        in_channels: int,
        blur_kernel: list[int],
        upsample: bool,
        paint: bool = False,
        detail: bool = False,
    ) -> None:
        super().__init__()
        self.conv = EqualConv2d(in_channels, 3, 1)
        self.paint = EqualConv2d(in_channels, 3, 1, bias=False) if paint else None
        if self.paint is not None:
            nn.init.zeros_(self.paint.weight)
        self.detail = EqualConv2d(in_channels, 3, 1, bias=False) if detail else None
        if self.detail is not None:
            nn.init.zeros_(self.detail.weight)
        self.upsample = Upsample(blur_kernel) if upsample else None

    def forward(self, x: Tensor, skip: Tensor | None, own: Tensor | None = None) -> Tensor:
        """x: (B, C, r, r) warped·masked source features; skip: (B, 3, r/2, r/2) or None; own:
        (B, C, r, r) the renderer's features ·(1-m) (used with ``paint``) -> (B, 3, r, r)
        float32, unbounded."""
        with fp32_region(x.device.type):
            conv = self.conv
            assert conv.bias is not None
            out = pointwise(x.float(), conv.weight[:, :, 0, 0] * conv.scale)
            out = out + conv.bias.reshape(1, 3, 1, 1)
            if self.paint is not None and own is not None:
                out = out + pointwise(own.float(), self.paint.weight[:, :, 0, 0] * self.paint.scale)
            if self.detail is not None:
                # = conv(high_pass(x)): both are linear and the conv is 1×1, so filter the 3
                # output channels instead of all C input channels (cheaper, same result)
                out = out + high_pass(
                    pointwise(x.float(), self.detail.weight[:, :, 0, 0] * self.detail.scale)
                )
            if skip is not None and self.upsample is not None:
                out = out + self.upsample(skip)
        return out


def high_pass(x: Tensor, factor: int = 4) -> Tensor:
    """x minus its low-pass (average over factor² blocks, bilinear back up): what is finer than
    ``factor`` pixels. (B, C, r, r) -> (B, C, r, r)."""
    low = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear")
    return x - low


class Inject(nn.Module):
    """livehead extension (``stage1.inject``): x += W2·lrelu(W1·F_r + V·alpha + b), a per-pixel
    MLP on the source's encoder features at this level and the motion vector, added to the
    renderer's features before the flow. W2 starts at zero (the plain renderer).

    Why: LIA's renderer builds its flow from a 4×4 constant and the latent, so it has to infer
    *where* a motion acts (this face's mouth) from a vector, and every motion enters it only as
    a per-channel scale (a product with features it must learn at the same time: both factors
    start small, and the mouth had not started after ~29k leak-free samples). Here a hidden unit
    can be "lip here AND mouth opening large" through a sum and a ReLU (hidden width max(C,
    16)); W2's gradient does not wait on another zero factor, and a following conv turns the
    result into a local flow, mask or paint. (Measured: within 3654 CPU steps the mouth did
    not open; after ~10^5 more samples, with ``detail``, the renderer draws about half of the
    mouth's true change: model card, sessions 7-8.)
    Cost, tiny config at 256² (torch's flop counter, one frame): the renderer 366 M
    multiply-adds, with inject 425 M; W1 (~29 M of that) runs once per call, not per frame.
    """

    def __init__(self, channels: int, motion_dim: int, hidden: int) -> None:
        super().__init__()
        self.feat = EqualConv2d(channels, hidden, 1)  # W1, b
        self.motion = EqualLinear(motion_dim, hidden, bias=False)  # V
        self.out = EqualConv2d(hidden, channels, 1, bias=False)  # W2
        nn.init.zeros_(self.out.weight)

    def forward(self, x: Tensor, feat: Tensor, alpha: Tensor) -> Tensor:
        """x: (B, C, r, r) renderer features; feat: (1 or B, C, r, r) source features; alpha:
        (B, motion_dim) -> (B, C, r, r) in x's dtype and memory layout."""
        w1, b1 = self.feat.weight[:, :, 0, 0] * self.feat.scale, self.feat.bias
        assert b1 is not None
        f = pointwise(feat.to(x.dtype), w1)  # (1 or B, H, r, r): per source, not per frame
        m = self.motion(alpha.to(x.dtype)) + b1.to(x.dtype)  # (B, H)
        hidden = F.leaky_relu(f + m[:, :, None, None], 0.2)
        y = pointwise(hidden, self.out.weight[:, :, 0, 0] * self.out.scale).to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = y.contiguous(memory_format=torch.channels_last)
        return x + y


class Renderer(nn.Module):
    """G: (latent, source feature pyramid) -> image.

    4×4 constant -> StyledConv; per level r = 8..S: StyledConv ×2 upsample, StyledConv, ToFlow
    (warp F_r and blend into the decoder features), ToRGB of the warped features added to the
    upsampled RGB skip. Every styled layer uses the same latent. Output tanh -> [-1, 1].
    """

    def __init__(self, cfg: Stage1Config) -> None:
        super().__init__()
        check_config(cfg)
        widths = decoder_widths(cfg)  # 4..S
        self.sizes = level_sizes(cfg.image_size)
        self.paint = cfg.paint
        bk = list(cfg.blur_kernel)
        L = cfg.latent_dim
        self.input = ConstantInput(widths[0])
        self.conv1 = StyledConv(widths[0], widths[0], 3, L, blur_kernel=bk)
        self.up_convs = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.to_flows = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.injects = nn.ModuleList() if cfg.inject else None
        self.head_warps = nn.ModuleList() if cfg.head_warp else None
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            if self.injects is not None:
                self.injects.append(Inject(b, cfg.motion_dim, max(b, 16)))
            if self.head_warps is not None:
                self.head_warps.append(HeadWarp(b, bk))
            self.up_convs.append(StyledConv(a, b, 3, L, upsample=True, blur_kernel=bk))
            self.convs.append(StyledConv(b, b, 3, L, blur_kernel=bk))
            self.to_flows.append(ToFlow(b, L, bk))
            detail = cfg.detail and self.sizes[i + 1] >= 64
            self.to_rgbs.append(ToRGB(b, bk, upsample=i > 0, paint=cfg.paint, detail=detail))
        for r in self.sizes[1:]:
            # constants, rebuilt on construction: not saved in checkpoints. Stored 3-D so that
            # model.to(memory_format=channels_last) leaves their layout alone.
            self.register_buffer(f"grid_{r}", identity_grid(r)[0], persistent=False)

    def grids(self) -> list[Tensor]:
        """Identity grids (1, r, r, 2) for r = 8..S."""
        return [self.get_buffer(f"grid_{r}").unsqueeze(0) for r in self.sizes[1:]]

    def forward(
        self,
        latent: Tensor,
        feats: list[Tensor],
        alpha: Tensor | None = None,
        alpha_src: Tensor | None = None,
    ) -> Tensor:
        """latent: (B, latent_dim); feats: pyramid 8²..S² from ImageEncoder, batch 1 (broadcast
        to all B latents: one source, many frames) or B; alpha: (B, motion_dim), the motion the
        latent holds (needed with ``inject`` or ``head_warp``, unused otherwise); alpha_src:
        (1 or B, motion_dim), the source's own motion (needed with ``head_warp``).

        Returns (B, 3, S, S) float32 in [-1, 1].
        """
        return self._run(latent, feats, alpha, alpha_src, collect=False)[0]

    def forward_aux(
        self,
        latent: Tensor,
        feats: list[Tensor],
        alpha: Tensor | None = None,
        alpha_src: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """As ``forward``, also returning per level the offsets (B, 2, r, r) (normalised units,
        2/r per pixel) and masks (B, 1, r, r) in (0, 1), for losses and visualisation."""
        return self._run(latent, feats, alpha, alpha_src, collect=True)

    def forward_draft(
        self,
        latent: Tensor,
        feats: list[Tensor],
        alpha: Tensor | None = None,
        alpha_src: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """The levels up to S/2 only, for ``FastHead``: feats may stop at (S/2)². Returns, at
        S/2: the renderer's features x (B, C, r, r) after the blend, the warped·masked source
        features fw, the accumulated RGB (pre-tanh, float32), the flow offset (B, 2, r, r)
        (the head's rigid offset included) and the mask (B, 1, r, r)."""
        out = self._run(latent, feats, alpha, alpha_src, collect=False, draft=True)
        return tuple(out[1])

    def _run(
        self,
        latent: Tensor,
        feats: list[Tensor],
        alpha: Tensor | None,
        alpha_src: Tensor | None,
        collect: bool,
        draft: bool = False,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        levels = len(self.to_flows) - (1 if draft else 0)
        if len(feats) < levels or (not draft and len(feats) != levels):
            raise ValueError(f"renderer needs {levels} feature maps, got {len(feats)}")
        if self.injects is not None and alpha is None:
            raise ValueError("a renderer with stage1.inject needs the motion vector alpha")
        sim: tuple[Tensor, Tensor] | None = None
        if self.head_warps is not None:
            if alpha is None or alpha_src is None:
                raise ValueError("a renderer with stage1.head_warp needs alpha and alpha_src")
            with fp32_region(latent.device.type):
                sim = head_similarity(alpha_src, alpha)
        b = latent.shape[0]
        x = self.conv1(self.input(b), latent)
        rgb: Tensor | None = None
        raw: Tensor | None = None
        gate: Tensor | None = None
        offsets: list[Tensor] = []
        masks: list[Tensor] = []
        for i, (up, conv, to_flow, to_rgb, feat, grid) in enumerate(
            zip(self.up_convs, self.convs, self.to_flows, self.to_rgbs, feats, self.grids())
        ):
            x = conv(up(x, latent), latent)
            if self.injects is not None:
                assert alpha is not None
                x = self.injects[i](x, feat, alpha)
            extra: Tensor | None = None
            if self.head_warps is not None:
                assert sim is not None
                x, extra, gate = self.head_warps[i](x, feat, head_offset(*sim, grid), grid, gate)
            fw, x_next, raw = to_flow(x, latent, feat, grid, raw, extra)
            # x·(1-m) = x_next - fw: what the renderer itself holds where the source is masked
            rgb = to_rgb(fw, rgb, x_next - fw if self.paint else None)
            x = x_next
            if draft and i == levels - 1:
                offset, mask = flow_and_mask(raw)
                if extra is not None:
                    offset = offset + extra
                return rgb, [x, fw, rgb, offset, mask], []
            if collect:
                offset, mask = flow_and_mask(raw)
                offsets.append(offset if extra is None else offset + extra)
                masks.append(mask)
        assert rgb is not None
        return fast_tanh(rgb), offsets, masks


class FastHead(nn.Module):
    """livehead extension (``stage1.fast_head``): a draft exit that draws the frame from the
    renderer's second-finest level (r = S/2) without running the finest one.

    At r: the portrait at r² warped by that level's flow and blended with the level's own RGB
    by its mask, base = m·warp(src_r) + (1 - m)·tanh(rgb); a per-pixel MLP of the level's
    features, the warped portrait, mask and RGB adds a correction (3 channels) and a detail
    gate (1); upsampled to S² bilinearly, the gate lets in the high-pass of the full-size
    portrait warped by the upsampled flow (what the finest level would add). The output layer
    starts at zero, so an untrained head gives the plain blend. ~700 parameters at the tiny
    config's widths. Trained alone (``livehead train fast``); ``ready`` is 1 once it is.
    (B, ...) -> (B, 3, S, S) in [-1, 1].
    """

    ready: Tensor  # () 1.0 once trained

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.hidden = nn.Conv2d(2 * channels + 7, hidden, 1)
        self.out = nn.Conv2d(hidden, 4, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]
        self.register_buffer("ready", torch.zeros(()))

    def forward(
        self,
        src: Tensor,
        grids: list[Tensor],
        x: Tensor,
        fw: Tensor,
        rgb: Tensor,
        offset: Tensor,
        mask: Tensor,
    ) -> Tensor:
        """src: (1 or B, 3, S, S) the portrait in [-1, 1]; grids: the identity grids at r and S
        (``Renderer.grids``); the rest ``Renderer.forward_draft``'s outputs at r = S/2."""
        b, r, size = x.shape[0], x.shape[-1], src.shape[-1]
        with fp32_region(x.device.type):
            src = src.float()  # pooled once, then shared by the batch's warps
            small = warp(F.avg_pool2d(src, size // r).expand(b, -1, -1, -1), offset, grids[0])
            src = src.expand(b, -1, -1, -1)
            z = torch.cat([x.float(), fw.float(), small, mask, rgb], dim=1)
            y = self.out(F.leaky_relu(self.hidden(z), 0.2))
            base = lerp(fast_tanh(rgb), small, mask)
            up = F.interpolate(
                torch.cat([base + y[:, :3], y[:, 3:], offset], 1),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            full = warp(src, up[:, 4:], grids[1])
            detail = full - F.interpolate(
                F.avg_pool2d(full, size // r), size=size, mode="bilinear", align_corners=False
            )
            out = up[:, :3] + torch.sigmoid(up[:, 3:4] + 2.0) * detail
        return out.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------
# The stage-1 model
# --------------------------------------------------------------------------------------------
@dataclass
class Stage1Output:
    """What the stage-1 losses need. B = batch of source/target pairs, N = extra images.

    recon: (B, 3, S, S) in [-1, 1], target rebuilt from the source's h and pyramid + alpha_tgt.
    h_*: (B, latent) encoder codes; z_id_*: identity codes; z_m_*: motion codes (B, latent);
    alpha_*: (B, motion_dim). *_extra: the same codes for ``extra`` images (negatives,
    augmented copies), (N, ...), or None when no extra images were given.
    """

    recon: Tensor
    h_src: Tensor
    h_tgt: Tensor
    alpha_src: Tensor
    alpha_tgt: Tensor
    z_id_src: Tensor
    z_id_tgt: Tensor
    z_m_src: Tensor
    z_m_tgt: Tensor
    z_id_extra: Tensor | None = None
    z_m_extra: Tensor | None = None
    alpha_extra: Tensor | None = None
    # per renderer level (8²..S²): the mean occlusion mask, detached -- a level whose mask sits
    # near 0 contributes nothing to the image (a training diagnostic)
    mask_means: Tensor | None = None


class Stage1Model(nn.Module):
    """E + HAL + identity/motion heads + LMD + G. Each method is one network call; inputs are
    images (B, 3, S, S) in [-1, 1] unless stated."""

    def __init__(self, cfg: Stage1Config) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.identity_head = HeadMLP(cfg.latent_dim, cfg.head_hidden, cfg.latent_dim)
        self.motion_head = MotionHead(cfg)
        self.lmd = LinearMotionDecomposition(cfg.latent_dim, cfg.motion_dim)
        self.renderer = Renderer(cfg)
        self.head_reader = (
            HeadReader(size=cfg.head_reader_size, fields=cfg.head_reader_fields)
            if cfg.head_reader
            else None
        )
        self.fast_head = FastHead(decoder_widths(cfg)[-2]) if cfg.fast_head else None

    @property
    def reads_head(self) -> bool:
        """True when the model has a trained ``HeadReader`` (``stage1.head_reader``)."""
        return self.head_reader is not None and bool(self.head_reader.ready > 0.5)

    @property
    def renders_fast(self) -> bool:
        """True when the model has a trained ``FastHead`` (``stage1.fast_head``)."""
        return self.fast_head is not None and bool(self.fast_head.ready > 0.5)

    def read_head(self, img: Tensor) -> Tensor:
        """img (B, 3, S, S) -> (B, fields): the head's absolute pose, place and size in
        alpha[0:HEAD_DIMS]'s units (and the face's fields after them, for a reader of 14), by
        the ``HeadReader`` (``HeadReader.read``), which the model must have."""
        if self.head_reader is None:
            raise ConfigError("this stage-1 model has no head reader (stage1.head_reader)")
        return self.head_reader.read(img)

    def encode(self, img: Tensor) -> tuple[Tensor, list[Tensor]]:
        """-> h (B, latent), feats (pyramid 8²..S², see ImageEncoder)."""
        return self.encoder(img)

    def motion(self, h: Tensor) -> Tensor:
        """h (B, latent) -> alpha (B, motion_dim)."""
        return self.motion_head(h)[1]

    def motion_code(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (B, latent) -> z_m (B, latent), alpha (B, motion_dim)."""
        return self.motion_head(h)

    def identity(self, h: Tensor) -> Tensor:
        """h (B, latent) -> z_id (B, latent)."""
        return self.identity_head(h)

    def latent(self, h_src: Tensor, alpha: Tensor) -> Tensor:
        """h_src (1 or B, latent) + Q·alpha (B, motion_dim) -> (B, latent) float32."""
        return h_src.float() + self.lmd(alpha)

    def render(self, h_src: Tensor, feats_src: list[Tensor], alpha: Tensor) -> Tensor:
        """Source code + pyramid (batch 1 or B) and B motion vectors -> (B, 3, S, S) in [-1, 1]."""
        alpha_src = self.motion(h_src) if self.cfg.head_warp else None
        return self.renderer(self.latent(h_src, alpha), feats_src, alpha, alpha_src)

    def render_fast(
        self, h_src: Tensor, feats_src: list[Tensor], alpha: Tensor, src: Tensor
    ) -> Tensor:
        """As ``render``, by the draft exit (``FastHead``, which the model must have): the
        finest level is not run (its features may be left out of ``feats_src``). src: (1 or
        B, 3, S, S) the source image in [-1, 1]."""
        if self.fast_head is None:
            raise ConfigError("this stage-1 model has no fast head (stage1.fast_head)")
        alpha_src = self.motion(h_src) if self.cfg.head_warp else None
        latent = self.latent(h_src, alpha)
        draft = self.renderer.forward_draft(latent, feats_src, alpha, alpha_src)
        return self.fast_head(src.to(latent.device), self.renderer.grids()[-2:], *draft)

    def forward(
        self,
        source: Tensor,
        target: Tensor,
        extra: Tensor | None = None,
        render_alpha: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Stage1Output:
        """Training step: encode source, target (and extra) in one batched pass, rebuild the
        target from the source. source/target: (B, 3, S, S); extra: (N, 3, S, S) or None.
        render_alpha: maps the target's and the source's alpha (B, motion_dim each) to the alpha
        the target is rendered with (training-time teacher forcing); None renders the encoder's
        alpha of the target."""
        b = source.shape[0]
        imgs = [source, target] + ([extra] if extra is not None else [])
        h, feats = self.encoder(torch.cat(imgs, dim=0))
        z_id = self.identity_head(h)
        z_m, alpha = self.motion_head(h)
        alpha_r = alpha[b : 2 * b]
        if render_alpha is not None:
            alpha_r = render_alpha(alpha_r, alpha[:b])
        recon, _, masks = self.renderer.forward_aux(
            self.latent(h[:b], alpha_r), [f[:b] for f in feats], alpha_r, alpha[:b]
        )
        has_extra = extra is not None
        return Stage1Output(
            recon=recon,
            h_src=h[:b],
            h_tgt=h[b : 2 * b],
            alpha_src=alpha[:b],
            alpha_tgt=alpha[b : 2 * b],
            z_id_src=z_id[:b],
            z_id_tgt=z_id[b : 2 * b],
            z_m_src=z_m[:b],
            z_m_tgt=z_m[b : 2 * b],
            z_id_extra=z_id[2 * b :] if has_extra else None,
            z_m_extra=z_m[2 * b :] if has_extra else None,
            alpha_extra=alpha[2 * b :] if has_extra else None,
            mask_means=torch.stack([m.detach().float().mean() for m in masks]),
        )

    def param_counts(self) -> dict[str, int]:
        """Parameters per module (see the module docstring's table)."""

        def n(m: nn.Module | list) -> int:
            mods = m if isinstance(m, list) else [m]
            return sum(p.numel() for mod in mods for p in mod.parameters())

        enc = self.encoder
        hal = n(list(enc.hal_proj)) + enc.hal_logits.numel()
        counts = {
            "encoder": n(enc) - hal,
            "hal": hal,
            "identity_head": n(self.identity_head),
            "motion_head": n(self.motion_head),
            "lmd": n(self.lmd),
            "renderer": n(self.renderer),
        }
        if self.head_reader is not None:
            counts["head_reader"] = n(self.head_reader)
        if self.fast_head is not None:
            counts["fast_head"] = n(self.fast_head)
        counts["total"] = sum(counts.values())
        return counts


# --------------------------------------------------------------------------------------------
# Training-only heads: CLUB, AAM-softmax, discriminator
# --------------------------------------------------------------------------------------------
class CLUB(nn.Module):
    """Variational q(z_m | z_id) = N(mu(z_id), diag exp(logvar(z_id))) for the CLUB upper bound
    on I(z_id; z_m) (Cheng et al. 2020). Trunk = AniTalker's density MLP's first layer; the
    log-variance is tanh-bounded to [-1, 1] as in the reference CLUB code, for stability.

    Alternate: ``-loglik`` trains this net (encoders detached); ``mi_upper`` trains the encoders.
    """

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.trunk = EqualLinear(latent_dim, hidden)
        self.mu = EqualLinear(hidden, latent_dim)
        self.logvar = EqualLinear(hidden, latent_dim)

    def forward(self, z_id: Tensor) -> tuple[Tensor, Tensor]:
        """z_id (B, latent) -> mu, logvar (B, latent) float32."""
        with fp32_region(z_id.device.type):
            t = F.relu(self.trunk(z_id.float()))
            return self.mu(t), torch.tanh(self.logvar(t))

    def loglik(self, z_id: Tensor, z_m: Tensor) -> Tensor:
        """Mean over the batch of log q(z_m | z_id) (dropping the 2π constant): scalar.
        Maximise it (estimator step) with z_id, z_m detached."""
        mu, logvar = self(z_id)
        return (-((z_m.float() - mu) ** 2) / logvar.exp() - logvar).sum(dim=1).mean() / 2

    def mi_upper(self, z_id: Tensor, z_m: Tensor, perm: Tensor | None = None) -> Tensor:
        """CLUB-sample estimate E[log q(z_m_i|z_id_i)] - E[log q(z_m_perm(i)|z_id_i)]: scalar.

        perm: (B,) int64 permutation giving the in-batch negatives; default pairs sample i with
        i+1 (a deterministic derangement: no sample is its own negative). Minimise it (encoder
        step); gradients reach the encoders through z_id and z_m.
        """
        mu, logvar = self(z_id)
        z = z_m.float()
        neg = torch.roll(z, 1, dims=0) if perm is None else z[perm]
        inv_var = (-logvar).exp()
        pos = -((z - mu) ** 2) * inv_var
        negl = -((neg - mu) ** 2) * inv_var
        return (pos.sum(dim=1) - negl.sum(dim=1)).mean() / 2


class ArcMarginProduct(nn.Module):
    """AAM-softmax (ArcFace) logits: s·cos(θ_y + m) for the true class, s·cos θ_j otherwise.

    weight: (num_ids, latent). emb (B, latent), labels (B,) int64 -> logits (B, num_ids) float32,
    for F.cross_entropy. labels=None gives s·cos θ (no margin), for evaluation.
    """

    def __init__(
        self, latent_dim: int, num_ids: int, margin: float = 0.2, scale: float = 30.0
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_ids, latent_dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = margin
        self.scale = scale
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        # past θ = π - m, cos(θ + m) stops decreasing: use the linear extension (insightface)
        self.th = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def forward(self, emb: Tensor, labels: Tensor | None = None) -> Tensor:
        with fp32_region(emb.device.type):
            cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))
            if labels is None:
                return cos * self.scale
            sin = torch.sqrt((1.0 - cos.square()).clamp(0.0, 1.0))
            phi = cos * self.cos_m - sin * self.sin_m
            phi = torch.where(cos > self.th, phi, cos - self.mm)
            onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
            return (onehot * phi + (1.0 - onehot) * cos) * self.scale


class Discriminator(nn.Module):
    """StyleGAN2 discriminator: 1×1 conv, ResBlocks to 4², minibatch stddev (group <= 4, one
    feature), 3×3 conv, linear (fused leaky ReLU), linear -> one logit.

    channels: widths at resolutions [S, ..., 4] (the last log2(S)-1 entries are used, as
    ``enc_channels``). img (B, 3, S, S) in [-1, 1] -> (B, 1) logits.
    """

    def __init__(
        self,
        image_size: int,
        channels: list[int],
        blur_kernel: list[int] | None = None,
        stddev_group: int = 4,
    ) -> None:
        super().__init__()
        bk = list(blur_kernel or [1, 3, 3, 1])
        n = len(level_sizes(image_size))
        if len(channels) < n:
            raise ValueError(f"discriminator needs {n} widths for {image_size}², got {channels}")
        widths = list(channels[-n:])
        layers: list[nn.Module] = [ConvLayer(3, widths[0], 1, blur_kernel=bk)]
        layers += [ResBlock(a, b, bk) for a, b in zip(widths[:-1], widths[1:])]
        self.convs = nn.Sequential(*layers)
        self.stddev_group = stddev_group
        c = widths[-1]
        self.final_conv = ConvLayer(c + 1, c, 3, blur_kernel=bk)
        self.final_linear = nn.Sequential(
            EqualLinear(c * 4 * 4, c, activation=True), EqualLinear(c, 1)
        )

    def forward(self, img: Tensor) -> Tensor:
        x = self.convs(img)
        b, c, h, w = x.shape
        # largest group size <= stddev_group that divides the batch
        g = next(k for k in range(min(b, self.stddev_group), 0, -1) if b % k == 0)
        y = x.float().reshape(g, b // g, 1, c, h, w)
        y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=(2, 3, 4))  # (b/g, 1)
        y = y.reshape(b // g, 1, 1, 1).repeat(g, 1, h, w).to(x.dtype)
        x = self.final_conv(torch.cat([x, y], dim=1))
        return self.final_linear(x.flatten(1))
