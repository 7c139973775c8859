"""``stage1.head_warp``: the head's rigid motion in closed form from alpha, and its wiring into
the renderer (engine/models/stage1.py ``head_similarity``, ``HeadWarp``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.models.stage1 import (
    FACE_FIELD_MEAN,
    FACE_FIELD_STD,
    HEAD_BROW_CHIN,
    HEAD_FIELD_MEAN,
    HEAD_FIELD_STD,
    HEAD_NOSE_TIP,
    READ_FIELDS,
    Stage1Model,
    head_offset,
    head_similarity,
    identity_grid,
)


def _alpha(rows: np.ndarray, motion_dim: int = 20) -> torch.Tensor:
    """World motion rows (T,) -> alpha (T, motion_dim): the standardised fields first, as
    weights trained with ``aux_motion_direct`` read them."""
    from training.stage1_data import aux_stats
    from training.world.motion import as_array

    mean, std = aux_stats()
    a = torch.zeros(len(rows), motion_dim)
    a[:, : len(mean)] = torch.from_numpy((as_array(rows) - mean) / std)
    return a


def test_constants_are_the_worlds() -> None:
    """The engine may not import the world, so it keeps a copy of its conventions: they must
    stay the world's (field statistics, mean nose tip and brow-to-chin distance of the rigs)."""
    from training.stage1_data import aux_stats
    from training.world import get_identity, train_ids
    from training.world.render import _rig

    mean, std = aux_stats()
    np.testing.assert_allclose(HEAD_FIELD_MEAN, mean[:6], atol=2e-6)
    np.testing.assert_allclose(HEAD_FIELD_STD, std[:6], atol=2e-6)
    np.testing.assert_allclose(FACE_FIELD_MEAN, mean[6:14], atol=2e-6)  # a reader of 14
    np.testing.assert_allclose(FACE_FIELD_STD, std[6:14], atol=2e-6)
    assert READ_FIELDS == (6, 14)
    cfg = load_config("tiny")
    rigs = [_rig(get_identity(cfg.world, int(i))) for i in list(train_ids(cfg.world))[:100]]
    tips = np.mean([r.frames[r.names["nose_tip"]] for r in rigs], 0)
    np.testing.assert_allclose(HEAD_NOSE_TIP, tips, atol=0.01)
    assert abs(HEAD_BROW_CHIN - np.mean([r.brow_chin for r in rigs])) < 0.01


def test_similarity_maps_target_landmarks_onto_the_source_ones() -> None:
    """Frontal heads that move, resize and roll: the map lands every landmark of the target
    frame on the same landmark of the source frame (to a pixel: the map uses the mean rig,
    the frames their own). With no motion it is the identity."""
    from training.world import get_identity, heldout_ids
    from training.world.motion import neutral_motion
    from training.world.render import landmarks

    cfg = load_config("tiny")
    size = 256
    rows = neutral_motion(2)
    rows["loc_x"] = [-0.05, 0.12]
    rows["loc_y"] = [0.10, 0.20]
    rows["scale"] = [0.40, 0.31]
    rows["roll"] = [0.02, -0.06]
    alpha = _alpha(rows)
    a, t = head_similarity(alpha[:1], alpha[1:])
    for i in heldout_ids(cfg.world)[:3]:
        idn = get_identity(cfg.world, int(i))
        src, tgt = landmarks(idn, rows[0], size), landmarks(idn, rows[1], size)
        for name in ("eye_l", "eye_r", "mouth", "chin", "brow_mid", "nose_tip"):
            p = torch.tensor((tgt[name] + 0.5) * 2 / size - 1, dtype=torch.float32)
            q = (a[0] @ p + t[0] + 1) * size / 2 - 0.5
            err = float(np.abs(q.numpy() - src[name]).max())
            assert err < 1.0, (int(i), name, err)
    off = head_offset(*head_similarity(alpha[:1], alpha[:1]), identity_grid(16))
    assert off.shape == (1, 2, 16, 16)
    assert float(off.abs().max()) < 1e-5


def test_a_moved_head_is_closer_after_the_map() -> None:
    """A held-out face in a turned, moved pose: warping the source frame by the map beats
    copying it by a wide margin (the background moves too, so not by everything)."""
    from engine.models.stage1 import warp
    from engine.tensors import to_tensor
    from training.losses import psnr
    from training.world import clip_motion_only, get_identity, heldout_ids, render_frames

    cfg = load_config("tiny")
    rng = np.random.default_rng(5)
    i = int(heldout_ids(cfg.world)[0])
    idn = get_identity(cfg.world, i)
    rows = np.concatenate(
        [clip_motion_only(cfg.world, i, 1, rng), clip_motion_only(cfg.world, i, 1, rng)]
    )
    video = to_tensor(render_frames(idn, rows, 256))
    alpha = _alpha(rows)
    grid = identity_grid(256)
    moved = warp(video[:1], head_offset(*head_similarity(alpha[:1], alpha[1:]), grid), grid)
    assert float(psnr(moved, video[1:])) > float(psnr(video[:1], video[1:])) + 3.0


def test_renderer_wiring() -> None:
    """Fresh head_warp modules on a plain renderer's weights: the injection is zero and the
    gate half open (exactly the plain image with it shut); with the learned flow at zero every
    level's offset is half the head's map, all of it with the gate wide open. The renderer
    needs alpha_src, ``Stage1Model.render`` reads it off h itself."""
    torch.manual_seed(0)
    base = dataclasses.replace(load_config("tiny").stage1, image_size=64)
    plain = Stage1Model(dataclasses.replace(base, head_warp=False)).eval()
    hw = Stage1Model(dataclasses.replace(base, head_warp=True)).eval()
    missing = hw.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("renderer.head_warps.") for k in missing)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        h, feats = plain.encode(img)
        alpha = plain.motion(h) + torch.randn(3, base.motion_dim)
        want = plain.render(h, feats, alpha)
        assert float((hw.render(h, feats, alpha) - want).abs().mean()) > 1e-3
        with pytest.raises(ValueError, match="alpha_src"):
            hw.renderer(hw.latent(h, alpha), feats, alpha)
        for mod in hw.renderer.head_warps:
            mod.gate_moved.bias.fill_(-10.0)
        torch.testing.assert_close(hw.render(h, feats, alpha), want, atol=1e-5, rtol=0)
        for tf in hw.renderer.to_flows:
            tf.conv.weight.zero_()
            tf.bias.zero_()
        src = hw.motion(h)
        sim = head_similarity(src, alpha)
        for bias, share in ((0.0, 0.5), (10.0, 1.0)):
            for mod in hw.renderer.head_warps:
                mod.gate_moved.bias.fill_(bias)
            _, offsets, _ = hw.renderer.forward_aux(hw.latent(h, alpha), feats, alpha, src)
            for off, grid in zip(offsets, hw.renderer.grids()):
                torch.testing.assert_close(off, share * head_offset(*sim, grid), atol=1e-5, rtol=0)


def test_one_source_many_frames_and_bf16() -> None:
    """One source pyramid (and its alpha) broadcast to a batch of motions gives each frame as
    rendered alone, and under bf16 autocast the map and flow stay float32."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_config("tiny").stage1, image_size=64, head_warp=True)
    m = Stage1Model(cfg).eval()
    with torch.no_grad():
        for mod in m.renderer.head_warps:
            mod.gate_moved.weight.normal_()
            mod.inject.weight.normal_()
        h, feats = m.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
        alpha = m.motion(h) + 0.5 * torch.randn(3, cfg.motion_dim)
        batched = m.render(h, feats, alpha)
        single = torch.cat([m.render(h, feats, alpha[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(batched, single, atol=2e-4, rtol=1e-3)
        assert not torch.allclose(batched[0], batched[1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m.render(h, feats, alpha)
            _, offsets, _ = m.renderer.forward_aux(m.latent(h, alpha), feats, alpha, m.motion(h))
    assert all(o.dtype == torch.float32 for o in offsets)
    assert float((low - batched).abs().mean()) < 0.05
