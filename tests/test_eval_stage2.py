"""Stage-2 evaluation runs end to end on random tiny networks and reports every metric."""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.config import load_config
from engine.models.stage1 import Stage1Model
from engine.models.stage2 import Stage2Nets
from tests.small import SMALL_STAGE1, SMALL_STAGE2
from training.eval_stage2 import best_lag, evaluate
from training.probe import Probe
from training.world import get_identity, heldout_ids, random_motion, render_frames

SMALL = [*SMALL_STAGE1, *SMALL_STAGE2, "stage2.sample_steps=2"]


def test_best_lag_finds_a_known_shift() -> None:
    rng = np.random.default_rng(0)
    x = np.convolve(rng.normal(size=300), np.ones(5) / 5, mode="same")
    assert best_lag(x, np.roll(x, 3)) == 3
    assert best_lag(x, np.roll(x, -2)) == -2
    assert best_lag(x, x) == 0


def test_evaluate_reports_all_metrics() -> None:
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    s1 = Stage1Model(cfg.stage1).eval()
    s1.lmd.freeze()
    s2 = Stage2Nets.from_config(cfg).eval()
    res = evaluate(s1, s2, cfg, Probe().eval(), clips=1, seconds=1.0, seeds=2, drift_minutes=0.05)
    for k in (
        "lipsync_r",
        "av_offset_ms",
        "pose_control_err_deg",
        "diversity",
        "reenact_lipsync_r",
        "alpha_lipsync_r",
        "alpha_mouth_r_encoded",
    ):
        assert k in res
    assert math.isfinite(res["pose_control_err_deg"]) and res["diversity"] >= 0
    assert res["pose_jitter_deg"] >= 0 and res["pose_jitter_deg_world"] >= 0
    assert res["long_drift"]["finite"] is True
    assert res["reenact_lipsync_r_true_alpha"] is None  # only for world_alpha stage 2
    res = evaluate(
        s1,
        s2,
        cfg,
        Probe().eval(),
        clips=1,
        seconds=1.0,
        seeds=1,
        drift_minutes=0,
        world_alpha=True,
    )
    r = res["reenact_lipsync_r_true_alpha"]
    assert r is None or math.isnan(r) or -1 <= r <= 1
    assert "long_drift" not in res


def test_alpha_lipsync_reads_the_mouth_linearly() -> None:
    from training.eval_stage2 import alpha_lipsync

    rng = np.random.default_rng(0)
    gt = rng.random(200)
    mix = rng.normal(size=(1, 6))
    a_true = gt[:, None] * mix + 0.01 * rng.normal(size=(200, 6))
    res = alpha_lipsync(a_true, a_true + 0.01 * rng.normal(size=(200, 6)), gt)
    assert res["alpha_mouth_r_encoded"] > 0.99 and res["alpha_lipsync_r"] > 0.95
    noise = alpha_lipsync(a_true, rng.normal(size=(200, 6)), gt)["alpha_lipsync_r"]
    assert abs(noise) < 0.3


def test_probe_shapes_and_units() -> None:
    cfg = load_config("tiny")
    rng = np.random.default_rng(0)
    ident = get_identity(cfg.world, int(heldout_ids(cfg.world)[0]))
    frames = render_frames(ident, random_motion(rng, 3), 256)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = Probe()(x)
    assert y.shape == (3, 4)


def test_probe_frames_placed_like_clips_move_the_nose_with_the_turn() -> None:
    """The probe's training frames include heads placed as talking clips place them (neck pivot
    at rest, nose where the turn puts it), where random_motion draws the nose independently."""
    from training.world import place_like_a_clip

    cfg = load_config("tiny")
    rng = np.random.default_rng(0)
    ident = get_identity(cfg.world, int(heldout_ids(cfg.world)[0]))
    rows = random_motion(rng, 300)
    free = np.corrcoef(rows["yaw"], rows["loc_x"])[0, 1]
    for i in range(len(rows)):
        m = rows[i : i + 1].copy()
        place_like_a_clip(ident, m, rng)
        rows[i] = m[0]
    placed = np.corrcoef(rows["yaw"], rows["loc_x"])[0, 1]
    assert abs(free) < 0.2 and placed > 0.7
