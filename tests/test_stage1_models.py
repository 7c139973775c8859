"""Stage-1 networks: shapes, parameter counts, LMD, warp, batching, gradients, bf16.

Small images (32²/64²) and the tiny widths keep this fast; the paper config is only built and
counted, never run.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import ConfigError, Stage1Config, load_config
from engine.models.stage1 import (
    CLUB,
    ArcMarginProduct,
    Discriminator,
    Stage1Model,
    ToFlow,
    identity_grid,
    warp,
)

ANITALKER_STAGE1_PARAMS = 46.9e6


def tiny(image_size: int = 64) -> Stage1Config:
    # without head_warp: these tests pin LIA's renderer (zero flow at init...); head_warp has
    # its own in test_head_warp.py
    return dataclasses.replace(load_config("tiny").stage1, image_size=image_size, head_warp=False)


def images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def model64() -> Stage1Model:
    torch.manual_seed(0)
    return Stage1Model(tiny(64)).eval()


# --------------------------------------------------------------------------------------------
# Parameter counts and shapes
# --------------------------------------------------------------------------------------------
def test_paper_param_count_matches_anitalker() -> None:
    cfg = Stage1Config()  # the paper sizes are the defaults
    counts = Stage1Model(cfg).param_counts()
    club = sum(p.numel() for p in CLUB(cfg.latent_dim, cfg.club_hidden).parameters())
    # AniTalker's 46.9 M (its Generator) includes the CLUB variational MLP: see stage1.py
    assert abs(counts["total"] + club - ANITALKER_STAGE1_PARAMS) / ANITALKER_STAGE1_PARAMS < 0.01
    # the per-module breakdown documented in stage1.py
    assert counts == {
        "encoder": 21_635_648,
        "hal": 230_920,
        "identity_head": 525_312,
        "motion_head": 1_586_196,
        "lmd": 10_240,
        "renderer": 22_407_972,
        "total": 46_396_288,
    }


def test_paper_shapes_at_small_size() -> None:
    # paper widths at 32² (the top levels of the paper renderer), one cheap forward
    cfg = dataclasses.replace(Stage1Config(), image_size=32)
    m = Stage1Model(cfg).eval()
    with torch.no_grad():
        h, feats = m.encode(images(1, 32))
        assert h.shape == (1, 512)
        assert [tuple(f.shape) for f in feats] == [
            (1, 512, 8, 8),
            (1, 512, 16, 16),
            (1, 512, 32, 32),
        ]
        out = m.render(h, feats, torch.randn(2, 20))
    assert out.shape == (2, 3, 32, 32)


def test_tiny_shapes_and_range(model64: Stage1Model) -> None:
    cfg = model64.cfg
    src, tgt, extra = images(2, 64, 1), images(2, 64, 2), images(3, 64, 3)
    with torch.no_grad():
        out = model64(src, tgt, extra)
    L, M = cfg.latent_dim, cfg.motion_dim
    assert out.recon.shape == (2, 3, 64, 64)
    assert out.recon.abs().max() <= 1.0
    assert out.alpha_tgt.shape == out.alpha_src.shape == (2, M)
    for z in (out.h_src, out.h_tgt, out.z_id_src, out.z_id_tgt, out.z_m_src, out.z_m_tgt):
        assert z.shape == (2, L)
    assert out.z_id_extra is not None and out.z_id_extra.shape == (3, L)
    assert out.z_m_extra is not None and out.z_m_extra.shape == (3, L)
    assert out.alpha_extra is not None and out.alpha_extra.shape == (3, M)
    # the one batched encoder pass equals separate calls
    with torch.no_grad():
        h_t = model64.encode(tgt)[0]
    torch.testing.assert_close(out.h_tgt, h_t, rtol=1e-4, atol=1e-5)


def test_tiny_256_builds_and_feature_pyramid() -> None:
    cfg = load_config("tiny").stage1
    assert cfg.image_size == 256
    m = Stage1Model(cfg)
    with torch.no_grad():
        h, feats = m.encode(images(1, 256))
    assert h.shape == (1, cfg.latent_dim)
    sizes = [f.shape[-1] for f in feats]
    assert sizes == [8, 16, 32, 64, 128, 256]
    widths = [f.shape[1] for f in feats]
    assert widths == cfg.dec_channels[1:7]


def test_mismatched_widths_rejected() -> None:
    cfg = dataclasses.replace(tiny(64), dec_channels=[64, 64, 32, 16, 7])
    with pytest.raises(ConfigError, match="differ at"):
        Stage1Model(cfg)


def test_odd_blur_kernel_builds() -> None:
    cfg = dataclasses.replace(tiny(32), blur_kernel=[1, 2, 1])
    m = Stage1Model(cfg)
    with torch.no_grad():
        out = m(images(2, 32), images(2, 32, 1))
    assert out.recon.shape == (2, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# Linear Motion Decomposition
# --------------------------------------------------------------------------------------------
def test_lmd_orthonormal_and_freeze(model64: Stage1Model) -> None:
    lmd = model64.lmd
    q = lmd.directions()
    eye = torch.eye(q.shape[1])
    torch.testing.assert_close(q.t() @ q, eye, atol=1e-5, rtol=0)
    alpha = torch.randn(4, q.shape[1])
    before = lmd(alpha)
    assert not lmd.frozen
    lmd.freeze()
    try:
        assert lmd.frozen
        torch.testing.assert_close(lmd.q, q.detach(), atol=0, rtol=0)
        torch.testing.assert_close(lmd(alpha), before, atol=0, rtol=0)
        # the frozen Q survives a state-dict round trip and is used verbatim
        other = Stage1Model(model64.cfg)
        other.load_state_dict(model64.state_dict())
        assert other.lmd.frozen
        with torch.no_grad():
            other.lmd.weight.add_(1.0)  # a new weight must not change the frozen Q
        torch.testing.assert_close(other.lmd(alpha), before, atol=0, rtol=0)
    finally:
        lmd.unfreeze()


def test_lmd_sign_convention_is_unique() -> None:
    torch.manual_seed(3)
    cfg = tiny(32)
    lmd = Stage1Model(cfg).lmd
    q = lmd.directions()
    r = q.t() @ lmd.weight.detach()  # R = Q^T W, upper triangular with positive diagonal
    assert (torch.diagonal(r) > 0).all()


# --------------------------------------------------------------------------------------------
# Warping
# --------------------------------------------------------------------------------------------
def test_identity_grid_and_translation() -> None:
    feat = torch.randn(2, 5, 16, 16)
    grid = identity_grid(16)
    zero = torch.zeros(2, 2, 16, 16)
    torch.testing.assert_close(warp(feat, zero, grid), feat, atol=1e-5, rtol=0)
    # a flow of +1 px in x (2/W in normalised units) samples one pixel to the right
    shift = zero.clone()
    shift[:, 0] = 2.0 / 16
    out = warp(feat, shift, grid)
    torch.testing.assert_close(out[..., :-1], feat[..., 1:], atol=1e-5, rtol=0)
    assert out[..., -1].abs().max() < 0.51 * feat.abs().max()  # zero padding beyond the edge
    # and +2 px in y
    shift = zero.clone()
    shift[:, 1] = 4.0 / 16
    out = warp(feat, shift, grid)
    torch.testing.assert_close(out[:, :, :-2], feat[:, :, 2:], atol=1e-5, rtol=0)


def test_toflow_zero_weights_is_identity_warp() -> None:
    torch.manual_seed(0)
    tf = ToFlow(6, 16, [1, 3, 3, 1])
    # ToFlow starts with a zero conv weight: offset exactly 0, mask exactly 1/2
    x = torch.randn(3, 6, 8, 8)
    feat = torch.randn(1, 6, 8, 8)
    fw, x_next, raw = tf(x, torch.randn(3, 16), feat, identity_grid(8), None)
    assert torch.equal(raw, torch.zeros_like(raw))
    torch.testing.assert_close(fw, 0.5 * feat.expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_next, fw + 0.5 * x, atol=1e-6, rtol=0)


def test_renderer_flow_is_zero_at_init(model64: Stage1Model) -> None:
    with torch.no_grad():
        h, feats = model64.encode(images(1, 64))
        alpha = torch.randn(2, model64.cfg.motion_dim)
        _, offsets, masks = model64.renderer.forward_aux(model64.latent(h, alpha), feats, alpha)
    assert len(offsets) == len(masks) == 4
    for o, m in zip(offsets, masks):
        assert torch.equal(o, torch.zeros_like(o))
        torch.testing.assert_close(m, torch.full_like(m, 0.5))


def test_paint_starts_as_the_plain_renderer_and_paints_where_masked() -> None:
    """``paint``: a zero paint conv gives exactly the plain (LIA) renderer; a non-zero one
    changes the image, and only through the renderer's features where the mask hides the
    source (a mask of 1 everywhere leaves the output as the plain renderer's)."""
    torch.manual_seed(0)
    plain = Stage1Model(dataclasses.replace(tiny(32), paint=False)).eval()
    painted = Stage1Model(dataclasses.replace(tiny(32), paint=True)).eval()
    state = plain.state_dict()
    missing = painted.load_state_dict(state, strict=False).missing_keys
    assert missing and all(k.endswith(".paint.weight") for k in missing)
    with torch.no_grad():
        for tf in (*plain.renderer.to_flows, *painted.renderer.to_flows):
            tf.conv.weight.normal_(0, 0.5)  # flows and masks that vary over the image
        painted.load_state_dict(plain.state_dict(), strict=False)
        h, feats = plain.encode(images(1, 32, 3))
        alpha = torch.randn(2, plain.cfg.motion_dim)
        torch.testing.assert_close(
            painted.render(h, feats, alpha), plain.render(h, feats, alpha), atol=0, rtol=0
        )
        for rgb in painted.renderer.to_rgbs:
            assert rgb.paint is not None
            rgb.paint.weight.normal_()
        changed = painted.render(h, feats, alpha)
        assert (changed - plain.render(h, feats, alpha)).abs().mean() > 1e-3
        for tf in (*plain.renderer.to_flows, *painted.renderer.to_flows):
            tf.bias.data[2] = 30.0  # mask = sigmoid(>>0) = 1: nothing hidden, nothing painted
        torch.testing.assert_close(
            painted.render(h, feats, alpha), plain.render(h, feats, alpha), atol=1e-5, rtol=0
        )


def test_inject_starts_as_the_plain_renderer_and_is_a_per_pixel_mlp() -> None:
    """``inject``: zero at init gives exactly the plain renderer (so older weights load into
    it); the injected term is W2·lrelu(W1·F + V·alpha_b + b) for each motion b against one
    source pyramid of batch 1 (checked against explicit convs), and it moves the image."""
    from engine.models.stage1 import Inject

    torch.manual_seed(0)
    plain = Stage1Model(dataclasses.replace(tiny(32), inject=False)).eval()
    inj = Stage1Model(dataclasses.replace(tiny(32), inject=True)).eval()
    missing = inj.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".injects." in k for k in missing)
    with torch.no_grad():
        for tf in plain.renderer.to_flows:
            tf.conv.weight.normal_(0, 0.5)  # flows and masks read the renderer's features
        inj.load_state_dict(plain.state_dict(), strict=False)
        h, feats = plain.encode(images(1, 32, 5))
        alpha = torch.randn(3, plain.cfg.motion_dim)
        torch.testing.assert_close(
            inj.render(h, feats, alpha), plain.render(h, feats, alpha), atol=0, rtol=0
        )
        m = Inject(16, 8, 24)
        m.out.weight.normal_()
        x = torch.randn(3, 16, 5, 5)
        feat = torch.randn(1, 16, 5, 5)
        a = torch.randn(3, 8)
        w1 = m.feat.weight * m.feat.scale
        v = m.motion.weight * m.motion.scale
        w2 = m.out.weight * m.out.scale
        conv = torch.nn.functional.conv2d
        want = torch.stack(
            [
                x[i]
                + conv(
                    torch.nn.functional.leaky_relu(
                        conv(feat, w1, m.feat.bias) + (v @ a[i])[None, :, None, None], 0.2
                    ),
                    w2,
                )[0]
                for i in range(3)
            ]
        )
        torch.testing.assert_close(m(x, feat, a), want, atol=1e-5, rtol=1e-5)
        got_cl = m(x.contiguous(memory_format=torch.channels_last), feat, a)
        assert got_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got_cl, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="alpha"):
            inj.renderer(inj.latent(h, alpha), feats)
        for mod in inj.renderer.injects:
            mod.out.weight.normal_()
        assert (inj.render(h, feats, alpha) - plain.render(h, feats, alpha)).abs().mean() > 1e-3


def test_detail_starts_as_the_plain_renderer_and_adds_only_fine_detail() -> None:
    """``detail``: zero at init gives exactly the plain renderer, and only the levels of 64² and
    up get the path; its input is a high-pass, so flat features add nothing and fine texture
    does (a non-zero path then moves the image)."""
    from engine.models.stage1 import high_pass

    torch.manual_seed(0)
    plain = Stage1Model(dataclasses.replace(tiny(128), detail=False)).eval()
    det = Stage1Model(dataclasses.replace(tiny(128), detail=True)).eval()
    missing = det.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"renderer.to_rgbs.{i}.detail.weight" for i in (3, 4)]  # 64, 128
    flat = torch.full((2, 4, 16, 16), 0.7)
    torch.testing.assert_close(high_pass(flat), torch.zeros_like(flat))
    assert high_pass(torch.randn(2, 4, 16, 16)).abs().mean() > 0.3
    with torch.no_grad():
        h, feats = plain.encode(images(1, 128, 6))
        alpha = torch.randn(2, plain.cfg.motion_dim)
        torch.testing.assert_close(
            det.render(h, feats, alpha), plain.render(h, feats, alpha), atol=0, rtol=0
        )
        for rgb in det.renderer.to_rgbs:
            if rgb.detail is not None:
                rgb.detail.weight.normal_()
        assert (det.render(h, feats, alpha) - plain.render(h, feats, alpha)).abs().mean() > 1e-3


# --------------------------------------------------------------------------------------------
# Batching, gradients, bf16
# --------------------------------------------------------------------------------------------
def test_batch_of_latents_with_one_pyramid_equals_separate(model64: Stage1Model) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        # random ToFlow weights so the warp actually moves things
        for tf in model64.renderer.to_flows:
            tf.conv.weight.normal_()
        try:
            h, feats = model64.encode(images(1, 64, 5))
            alpha = torch.randn(4, model64.cfg.motion_dim)
            batched = model64.render(h, feats, alpha)
            single = torch.cat([model64.render(h, feats, alpha[i : i + 1]) for i in range(4)])
            # a pyramid repeated B times gives the same frames as the broadcast one
            rep = model64.render(h.expand(4, -1), [f.expand(4, -1, -1, -1) for f in feats], alpha)
        finally:
            for tf in model64.renderer.to_flows:
                tf.conv.weight.zero_()
    torch.testing.assert_close(batched, single, atol=2e-4, rtol=1e-3)  # conv algos differ by B
    torch.testing.assert_close(batched, rep, atol=1e-6, rtol=0)
    assert not torch.allclose(batched[0], batched[1])


def test_gradients_reach_every_part() -> None:
    torch.manual_seed(0)
    m = Stage1Model(tiny(32)).train()
    for tf in m.renderer.to_flows:  # non-zero flow weights so the warp path carries gradient
        torch.nn.init.normal_(tf.conv.weight)
    out = m(images(2, 32, 1), images(2, 32, 2))
    club = CLUB(m.cfg.latent_dim, m.cfg.club_hidden)
    loss = out.recon.abs().mean() + 0.1 * club.mi_upper(out.z_id_tgt, out.z_m_tgt)
    loss = loss + out.z_id_src.square().mean()
    loss.backward()
    groups = {
        "encoder": m.encoder.layers[0],
        "encoder_final": m.encoder.final,
        "hal": m.encoder,
        "identity_head": m.identity_head,
        "motion_head": m.motion_head,
        "lmd": m.lmd,
        "renderer_const": m.renderer.input,
        "renderer_flow": m.renderer.to_flows[0],
        "renderer_rgb": m.renderer.to_rgbs[-1],
    }
    for name, mod in groups.items():
        grads = [p.grad for p in mod.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    assert m.encoder.hal_logits.grad is not None and m.encoder.hal_logits.grad.abs().sum() > 0
    assert m.lmd.weight.grad is not None and m.lmd.weight.grad.abs().sum() > 0


def test_bf16_autocast_forward(model64: Stage1Model) -> None:
    src, tgt = images(2, 64, 1), images(2, 64, 2)
    with torch.no_grad():
        ref = model64(src, tgt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model64(src, tgt)
            _, offsets, _ = model64.renderer.forward_aux(
                model64.latent(out.h_src, out.alpha_tgt), model64.encode(src)[1], out.alpha_tgt
            )
    assert out.recon.dtype == torch.float32 and torch.isfinite(out.recon).all()
    assert out.recon.abs().max() <= 1.0
    assert all(o.dtype == torch.float32 for o in offsets)
    assert (out.recon - ref.recon).abs().mean() < 0.05


# --------------------------------------------------------------------------------------------
# Training heads
# --------------------------------------------------------------------------------------------
def test_club_estimator_and_bound() -> None:
    torch.manual_seed(0)
    club = CLUB(8, 16)
    z_id = torch.randn(32, 8)
    z_m = z_id.clone()  # fully dependent: after fitting q, the MI estimate must be large
    opt = torch.optim.Adam(club.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        (-club.loglik(z_id, z_m)).backward()
        opt.step()
    assert club.mi_upper(z_id, z_m) > 1.0
    indep = CLUB(8, 16)
    mi = indep.mi_upper(z_id, torch.randn(32, 8), perm=torch.randperm(32))
    assert mi.shape == ()


def test_aam_softmax_margin() -> None:
    torch.manual_seed(0)
    head = ArcMarginProduct(16, 10, margin=0.2, scale=30.0)
    emb = torch.randn(4, 16)
    labels = torch.tensor([0, 3, 5, 9])
    plain = head(emb)
    margin = head(emb, labels)
    assert margin.shape == (4, 10)
    idx = torch.arange(4)
    assert (margin[idx, labels] < plain[idx, labels]).all()  # the true class is penalised
    mask = torch.ones_like(plain, dtype=torch.bool)
    mask[idx, labels] = False
    torch.testing.assert_close(margin[mask], plain[mask])


def test_discriminator_shapes() -> None:
    d = Discriminator(32, [16, 32, 32, 32, 32, 32, 32])
    for b in (1, 3, 4, 6):
        assert d(images(b, 32)).shape == (b, 1)


# --------------------------------------------------------------------------------------------
# Layers against the reference formulations
# --------------------------------------------------------------------------------------------
def _upfirdn2d_reference(x, kernel, up, down, pad):  # StyleGAN2's upfirdn2d_native
    _, c, h, w = x.shape
    kh, kw = kernel.shape
    out = x.reshape(-1, c, h, 1, w, 1)
    out = torch.nn.functional.pad(out, [0, up - 1, 0, 0, 0, up - 1, 0, 0])
    out = out.reshape(-1, c, h * up, w * up)
    out = torch.nn.functional.pad(out, [pad[0], pad[1], pad[0], pad[1]])
    out = out.reshape(-1, 1, out.shape[2], out.shape[3])
    out = torch.nn.functional.conv2d(out, torch.flip(kernel, [0, 1]).reshape(1, 1, kh, kw))
    out = out.reshape(-1, c, out.shape[2], out.shape[3])
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 2, 1], [1, 2, 3, 4]])
@pytest.mark.parametrize(
    "up,down,pad", [(1, 1, (2, 2)), (1, 1, (2, 1)), (1, 2, (2, 2)), (2, 1, (2, 1)), (2, 1, (1, 0))]
)
def test_upfirdn2d_matches_reference(taps, up, down, pad) -> None:
    from engine.models.layers import make_kernel, upfirdn2d

    x = torch.randn(2, 5, 9, 9)
    k = make_kernel(taps) * (up**2)
    torch.testing.assert_close(
        upfirdn2d(x, k, up, down, pad), _upfirdn2d_reference(x, k, up, down, pad)
    )


@pytest.mark.parametrize("k,upsample,demod", [(3, False, True), (3, True, True), (1, False, False)])
def test_modulated_conv_matches_grouped_reference(k, upsample, demod) -> None:
    """The activation-modulated conv equals StyleGAN2's per-sample-weight grouped conv."""
    from engine.models.layers import ModulatedConv2d, StyledConv

    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, k, 16, demodulate=demod, upsample=upsample)
    x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 16)
    b = x.shape[0]
    s = conv.modulation(style).reshape(b, 1, 6, 1, 1)
    w = conv.scale * conv.weight.unsqueeze(0) * s  # (B, out, in, k, k)
    if demod:
        w = w * torch.rsqrt(w.square().sum([2, 3, 4]) + 1e-8).reshape(b, 5, 1, 1, 1)
    xg = x.reshape(1, b * 6, 8, 8)
    if upsample:
        wt = w.transpose(1, 2).reshape(b * 6, 5, k, k)
        ref = torch.nn.functional.conv_transpose2d(xg, wt, stride=2, groups=b)
        ref = conv.blur(ref.reshape(b, 5, ref.shape[-2], ref.shape[-1]))
    else:
        ref = torch.nn.functional.conv2d(xg, w.reshape(b * 5, 6, k, k), padding=k // 2, groups=b)
        ref = ref.reshape(b, 5, 8, 8)
    torch.testing.assert_close(conv(x, style), ref, atol=1e-5, rtol=1e-4)
    # StyledConv's fused demodulation + bias + √2 gain equals the plain sequence
    sc = StyledConv(6, 5, k, 16, upsample=upsample, demodulate=demod)
    sc.conv.load_state_dict(conv.state_dict())
    torch.nn.init.normal_(sc.activate.bias)
    torch.testing.assert_close(sc(x, style), sc.activate(conv(x, style)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 1, 1, 1], [1, 2, 1]])
def test_upsample_fast_path_matches_reference(taps) -> None:
    from engine.models.layers import Upsample

    up = Upsample(taps)
    assert (up.fir4_a is not None) == (len(taps) == 4)
    x = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(up(x), _upfirdn2d_reference(x, up.kernel, 2, 1, up.pad))


def test_lerp_while_exporting_is_the_same_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine.models.layers.lerp: torch.lerp in eager PyTorch, start + w·(end - start) while
    exporting to ONNX (no Where nodes); the two agree to fp32 rounding, for tensor weights on
    both sides of torch's 0.5 branch point and for the upsampler's scalar weight."""
    from engine.models.layers import Upsample, lerp

    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    w = torch.rand(2, 1, 8, 8)
    eager = lerp(a, b, w)
    assert torch.equal(eager, torch.lerp(a, b, w))
    up = Upsample([1, 3, 3, 1])
    x = torch.randn(1, 2, 5, 6)
    up_eager = up(x)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(lerp(a, b, w), eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lerp(a, b, 0.25), torch.lerp(a, b, 0.25), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(up(x), up_eager, atol=1e-6, rtol=1e-6)
