"""Stage-1 training: a short run, exact resume, DDP with 2 CPU processes, export, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.errors import UserError
from tests.small import SMALL_STAGE1, SMALL_WORLD, fingerprints_agree, torchrun
from training.common import DistInfo, load_checkpoint
from training.stage1 import Stage1Options, Stage1Trainer

SMALL = [
    *SMALL_STAGE1,
    *SMALL_WORLD,
    "train.stage1.disc_channels=[8, 16, 16, 16, 16]",
    "train.stage1.batch_size=2",
    "train.stage1.d_reg_every=2",
    "train.stage1.w_aux_motion=1.0",
    "train.stage1.region_weight=4.0",
    "train.stage1.adv_start_step=0",
]


def _trainer(
    tmp: Path, resume: bool = False, steps: int = 2, extra: tuple[str, ...] = ()
) -> Stage1Trainer:
    cfg = load_config("tiny", [*SMALL, *extra])
    torch.set_num_threads(1)
    opts = Stage1Options(run_dir=tmp, resume=resume, steps=steps, device="cpu")
    return Stage1Trainer(cfg, opts, DistInfo())


def test_two_steps_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    neg = ("train.stage1.negatives=true",)  # the explicit-negative path (DDP test: in-batch)
    a = _trainer(tmp_path / "a", steps=2, extra=neg)
    a.fit()
    assert (tmp_path / "a" / "checkpoint.pt").exists()
    assert (tmp_path / "a" / "stage1.safetensors").exists()
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["step"] == 2 and all(
        k in rec for k in ("l1", "perceptual", "mi", "metric", "g_adv", "aux_motion", "l1_region")
    )
    # per-level mean occlusion masks (8² .. S²), the diagnostic for a level that shut off
    masks = [k for k in rec if k.startswith("mask_")]
    assert masks and all(0 < rec[k] < 1 for k in masks)

    # interrupted: 1 step, save, new process state, resume for the second step
    b1 = _trainer(tmp_path / "b", steps=1, extra=neg)
    b1.fit()
    b2 = _trainer(tmp_path / "b", resume=True, steps=2, extra=neg)
    assert b2.step == 1
    b2.fit()
    sa, _ = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    sb, _ = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key in ("model", "disc", "club", "ema"):
        for name, t in sa[key].items():
            assert torch.equal(t, sb[key][name]), f"{key}.{name} differs after resume"
    # and training did change the weights
    fresh = _trainer(tmp_path / "c", steps=0)
    changed = [n for n, t in fresh.model.state_dict().items() if not torch.equal(t, sa["model"][n])]
    assert changed


def test_region_weights_sit_on_the_mouth_and_eyes() -> None:
    """The flagged accelerator's weight map peaks at the world's mouth (1 + peak) and eyes
    (1 + peak/2) of the target frame and is 1 far from the face."""
    import numpy as np

    from training.stage1_data import SyntheticPairs, region_weights

    cfg = load_config("tiny")
    b = SyntheticPairs(cfg.world, 128).sample(
        np.random.default_rng(3), torch.Generator().manual_seed(0), 2
    )
    assert b.regions is not None and b.regions.shape == (2, 7)
    w = region_weights(b.regions, 128, 6.0)
    assert w.shape == (2, 1, 128, 128)
    for i in range(2):
        r = b.regions[i]
        mx, my = int(r[0]), int(r[1])
        assert float(w[i, 0, my, mx]) > 6.0  # near 1 + 6 at the mouth
        ex, ey = int(r[2]), int(r[3])
        assert 3.0 < float(w[i, 0, ey, ex]) < 5.0  # eyes: about 1 + 3
        assert float(w[i, 0, 0, 0]) == pytest.approx(1.0, abs=1e-4)  # a corner: background
    assert torch.equal(region_weights(b.regions, 128, 0.0), torch.ones(2, 1, 128, 128))


def test_near_pairs_setting() -> None:
    """near_pairs = 1 with near_amount = 0 pairs every source with itself; near_pairs = 0 never
    does."""
    import numpy as np

    from training.stage1_data import SyntheticPairs

    cfg = load_config("tiny")
    rng, g = np.random.default_rng(1), torch.Generator().manual_seed(0)
    same = SyntheticPairs(cfg.world, 64, near_pairs=1.0, near_amount=0.0).sample(rng, g, 3)
    assert torch.equal(same.source, same.target)
    apart = SyntheticPairs(cfg.world, 64, near_pairs=0.0).sample(rng, g, 3)
    assert not any(torch.equal(apart.source[i], apart.target[i]) for i in range(3))


def test_closed_source_setting() -> None:
    """closed_source = 1: every source's mouth is closed and at rest (the target's is drawn as
    usual); 0: sources open their mouths as often as random motion does."""
    import numpy as np

    from training.stage1_data import AUX_FIELDS, SyntheticPairs

    cfg = load_config("tiny")
    k = AUX_FIELDS.index("mouth_open")
    rng, g = np.random.default_rng(2), torch.Generator().manual_seed(0)
    closed = SyntheticPairs(cfg.world, 64, near_pairs=0.0, closed_source=1.0).sample(rng, g, 8)
    assert closed.gt_source is not None and closed.gt_target is not None
    assert torch.equal(closed.gt_source[:, k : k + 3], torch.tensor([[0.0, 0.5, 0.0]] * 8))
    assert (closed.gt_target[:, k] > 0).any()
    free = SyntheticPairs(cfg.world, 64, near_pairs=0.0).sample(rng, g, 8)
    assert free.gt_source is not None and (free.gt_source[:, k] > 0).any()


def test_expression_pairs_keep_the_head_and_change_the_face() -> None:
    """expression_pairs = 1 with near_amount = 0: every target has the source's head pose,
    place and scale exactly and a new expression (mouth, lids, brows, gaze); independent pairs
    (the default mix with near_pairs = 0) move the head."""
    import numpy as np

    from training.stage1_data import AUX_FIELDS, SyntheticPairs

    cfg = load_config("tiny")
    k = AUX_FIELDS.index("mouth_open")
    rng, g = np.random.default_rng(3), torch.Generator().manual_seed(0)
    expr = SyntheticPairs(cfg.world, 64, near_amount=0.0, expression_pairs=1.0).sample(rng, g, 8)
    assert expr.gt_source is not None and expr.gt_target is not None
    assert torch.equal(expr.gt_target[:, :k], expr.gt_source[:, :k])
    assert (expr.gt_target[:, k:] != expr.gt_source[:, k:]).any(dim=1).all()
    apart = SyntheticPairs(cfg.world, 64, near_pairs=0.0).sample(rng, g, 8)
    assert apart.gt_source is not None and apart.gt_target is not None
    assert (apart.gt_target[:, :k] != apart.gt_source[:, :k]).any(dim=1).all()


def test_negatives_drawn_only_when_used() -> None:
    """negatives=False (in-batch negatives, or the renderer-only phase): no negative frame is
    rendered; the rest of the batch is the same kind."""
    import numpy as np

    from training.stage1_data import SyntheticPairs

    cfg = load_config("tiny")
    rng, g = np.random.default_rng(3), torch.Generator().manual_seed(0)
    without = SyntheticPairs(cfg.world, 64, negatives=False).sample(rng, g, 2)
    assert without.negative is None and without.source.shape == (2, 3, 64, 64)
    with_neg = SyntheticPairs(cfg.world, 64).sample(rng, g, 2)
    assert with_neg.negative is not None and with_neg.negative.shape == (2, 3, 64, 64)


def test_aux_motion_readouts(tmp_path: Path) -> None:
    """The flagged accelerator regresses standardised fields; 'direct' has no read-out weights
    (alpha's first 14 components are the fields), the default a learned linear map."""
    from torch import nn

    from training.stage1_data import AUX_FIELDS, DirectReadout, aux_stats

    mean, std = aux_stats(2048)
    assert mean.shape == std.shape == (len(AUX_FIELDS),) and (std > 0).all()
    yaw = AUX_FIELDS.index("yaw")
    assert abs(mean[yaw]) < 0.02 and 0.1 < std[yaw] < 0.2  # random_motion: yaw ~ N(0, 0.15)
    alpha = torch.randn(3, 20)
    assert torch.equal(DirectReadout(len(AUX_FIELDS))(alpha), alpha[:, : len(AUX_FIELDS)])

    direct = _trainer(tmp_path, steps=0, extra=("train.stage1.aux_motion_direct=true",))
    assert isinstance(direct.aux, DirectReadout) and not list(direct.aux.parameters())
    no_hw = "stage1.head_warp=false"
    linear = _trainer(tmp_path, steps=0, extra=("train.stage1.aux_motion_direct=false", no_hw))
    assert isinstance(linear.aux, nn.Linear)
    # head_warp reads alpha as the world's fields: only the direct read-out makes it so
    for off in ("train.stage1.aux_motion_direct=false", "train.stage1.w_aux_motion=0"):
        with pytest.raises(UserError, match="head_warp"):
            _trainer(tmp_path, steps=0, extra=(off, "stage1.head_warp=true"))
    with pytest.raises(UserError, match="motion_dim"):
        _trainer(
            tmp_path,
            steps=0,
            extra=("train.stage1.aux_motion_direct=true", "stage1.motion_dim=8"),
        )


def test_teacher_forcing_renders_the_true_motion(tmp_path: Path) -> None:
    """Items marked for teacher forcing are rendered with the given values in alpha's first
    components (the rest: the encoder's reading of the source, teacher_rest "source"); the
    others with the encoder's alpha of the target."""
    t = _trainer(
        tmp_path,
        steps=0,
        extra=("train.stage1.aux_motion_direct=true", "train.stage1.teacher_alpha=0.5"),
    )
    import numpy as np

    b = t.data.sample(np.random.default_rng(0), torch.Generator().manual_seed(0), 2)
    teacher = torch.randn(2, 14)
    use = torch.tensor([True, False])
    m = t.model.eval()
    with torch.no_grad():
        for p in m.renderer.parameters():  # a fresh renderer ignores alpha (zero-init heads)
            p.add_(0.1 * torch.randn_like(p))
        out = t.gstep(b, teacher, use)
        h, feats = m.encode(b.source)
        alpha = m.motion(m.encode(b.target)[0])
        forced = torch.cat([teacher[:1], m.motion(h)[:1, 14:]], dim=1)
        want0 = m.render(h[:1], [f[:1] for f in feats], forced)
        want1 = m.render(h[1:], [f[1:] for f in feats], alpha[1:])
    assert torch.allclose(out["recon"][:1], want0, atol=1e-4)
    assert torch.allclose(out["recon"][1:], want1, atol=1e-4)
    assert torch.allclose(out["alpha_tgt"], alpha, atol=1e-5)  # the aux loss sees the encoder's
    with torch.no_grad():
        plain = m.render(h[:1], [f[:1] for f in feats], alpha[:1])
    assert not torch.allclose(out["recon"][:1], plain, atol=1e-3)
    rec = t.train_step()
    assert 0 <= rec["teacher_frac"] <= 1


def test_renderer_only_phase_trains_only_the_renderer(tmp_path: Path) -> None:
    """train.stage1.renderer_only: encoder, heads and Q stay exactly as they were; the renderer
    moves; no identity/MI/aux terms are logged; warm start from a plain file into a ``paint``
    model works (paint convs at zero)."""
    a = _trainer(tmp_path / "a", steps=1, extra=("stage1.paint=false",))
    a.fit()
    w = tmp_path / "a" / "stage1.safetensors"
    extra = (
        "stage1.paint=true",
        "train.stage1.renderer_only=true",
        "train.stage1.aux_motion_direct=true",
        "train.stage1.teacher_alpha=1.0",
    )
    cfg = load_config("tiny", [*SMALL, *extra])
    b = Stage1Trainer(
        cfg, Stage1Options(run_dir=tmp_path / "b", steps=2, init_from=str(w)), DistInfo()
    )
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in before.items() if ".paint." in k)
    rec = b.train_step()
    assert "metric" not in rec and "mi" not in rec and "aux_motion" not in rec
    assert rec["teacher_frac"] == 1.0
    rec = b.train_step()
    after = b.model.state_dict()
    frozen = ("encoder.", "identity_head.", "motion_head.", "lmd.")
    for k, v in after.items():
        if k.startswith(frozen):
            assert torch.equal(v, before[k]), k
    moved = [
        k for k, v in after.items() if k.startswith("renderer.") and not torch.equal(v, before[k])
    ]
    assert any(".paint." in k for k in moved) and any("to_flows" in k for k in moved)
    b.fit()  # checkpoint + export with the phase recorded
    from engine.weights import load_weights

    _, saved, meta = load_weights(tmp_path / "b" / "stage1.safetensors", "stage1")
    assert saved.stage1.paint and meta["renderer_only"] is True


def test_alpha_readout_r() -> None:
    """The eval's held-out linear read-out: alpha that holds the fields linearly reads ~1,
    alpha of noise reads ~0."""
    import numpy as np

    from training.eval_stage1 import readout_r

    rng = np.random.default_rng(0)
    truths = [rng.normal(size=(40, 3)) for _ in range(6)]
    mix = rng.normal(size=(3, 5))
    good = readout_r([t @ mix + 0.01 * rng.normal(size=(40, 5)) for t in truths], truths)
    assert (good > 0.99).all()
    noise = readout_r([rng.normal(size=(40, 5)) for _ in truths], truths)
    assert (np.abs(noise) < 0.3).all()


def test_resume_without_checkpoint_is_clear(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint"):
        _trainer(tmp_path / "none", resume=True)


def test_exported_weights_evaluate(tmp_path: Path) -> None:
    from training.eval_stage1 import evaluate

    t = _trainer(tmp_path, steps=1)
    t.fit()
    res = evaluate(str(tmp_path / "stage1.safetensors"), n_ids=2, frames=3, real=False)
    for k in ("self_psnr", "self_ssim", "cross_psnr", "id_leakage", "copy_psnr"):
        assert isinstance(res[k], float), k
    # alpha's motion read-out: a correlation, or null where the tiny clips do not move a field
    assert res["meta"]["aux_motion_direct"] is True  # the tiny recipe: so the renderer ceiling
    assert isinstance(res["cross_psnr_true_alpha"], float)
    for k in ("alpha_pose_r", "alpha_mouth_r"):
        assert res[k] is None or -1 <= res[k] <= 1, k
    assert 0 < res["self_psnr"] < 100 and -1 <= res["self_ssim"] <= 1
    # per face: two faces, equal frame counts, so the headline is the mean of the list
    for k in ("self", "cross"):
        pairs = res[f"{k}_psnr_pairs"]
        assert len(pairs) == 2 and abs(sum(pairs) / 2 - res[f"{k}_psnr"]) < 2e-3, k
        assert res[f"{k}_psnr_sem"] == pytest.approx(abs(pairs[0] - pairs[1]) / 2, abs=2e-3)
    assert isinstance(res["drawn_pose_err_deg"], float) and res["drawn_pose_err_deg"] >= 0
    assert res["drawn_mouth_r"] is None or -1 <= res["drawn_mouth_r"] <= 1

    from PIL import Image

    from training.eval_stage1 import load_stage1, side_by_side

    model, cfg, _ = load_stage1(str(tmp_path / "stage1.safetensors"))
    png = side_by_side(model, cfg, tmp_path / "grid.png", rows=2)
    assert Image.open(png).size == (4 * 64, 2 * 64)


class _WorldAsRenderer(torch.nn.Module):
    """A stand-in stage-1 model for ``eval_drawn``: ``render`` draws the world's own frames of
    the motion in alpha's first 14 components (a perfect renderer) or, with ``frozen``, the
    portrait for every frame (a renderer that moves nothing). ``encode`` takes the identities
    in the order the eval visits them."""

    def __init__(self, cfg, ids, frozen: bool) -> None:
        super().__init__()
        self.cfg, self.ids, self.frozen = cfg, list(ids), frozen

    def encode(self, img: torch.Tensor):
        self.ident, self.portrait = self.ids.pop(0), img
        return torch.zeros(1, 4), []

    def motion(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(h), 20)

    def render(self, h, feats, alpha: torch.Tensor) -> torch.Tensor:
        from engine.tensors import to_tensor
        from training.stage1_data import aux_stats
        from training.world import get_identity, render_frames
        from training.world.motion import from_array

        if self.frozen:
            return self.portrait.expand(len(alpha), -1, -1, -1)
        mean, std = aux_stats()
        motion = from_array(alpha[:, :14].double().numpy() * std + mean)
        ident = get_identity(self.cfg.world, self.ident)
        return to_tensor(render_frames(ident, motion, self.cfg.stage1.image_size))


def test_drawn_motion_metrics_tell_a_perfect_renderer_from_a_frozen_one() -> None:
    """``eval_drawn``: a renderer that draws exactly the world's frames scores pose error 0,
    mouth r 1 and gain 1 against the probe's reading of those frames; one that repeats the
    portrait draws none of the mouth (gain 0) and misses the pose by degrees."""
    from training.eval_stage1 import eval_drawn
    from training.probe import PROBE_PATH, load_probe
    from training.world import heldout_ids

    cfg = load_config("tiny", [*SMALL, "stage1.image_size=128"])
    probe, _ = load_probe(PROBE_PATH)
    ids = [int(i) for i in heldout_ids(cfg.world)[:2]]
    perfect = eval_drawn(_WorldAsRenderer(cfg, ids, False), cfg, probe, 2, 12, seed=3)
    assert perfect["drawn_pose_err_deg"] == pytest.approx(0.0, abs=1e-4)
    assert perfect["drawn_mouth_r"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["drawn_mouth_gain"] == pytest.approx(1.0, abs=1e-4)
    frozen = eval_drawn(_WorldAsRenderer(cfg, ids, True), cfg, probe, 2, 12, seed=3)
    assert frozen["drawn_pose_err_deg"] > 2.0
    assert frozen["drawn_mouth_gain"] == pytest.approx(0.0, abs=1e-6)


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes: both ranks end with identical weights."""
    args = ["--config", "tiny", "--run-dir", str(tmp_path), "--steps", "2"]
    r = torchrun("training.stage1", args, SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    st, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert st["step"] == 2
    assert fingerprints_agree(tmp_path)


def test_warm_start_from_exported_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _trainer(tmp_path / "a", steps=1)
    a.fit()
    cfg = load_config("tiny", SMALL)
    w = tmp_path / "a" / "stage1.safetensors"
    capsys.readouterr()
    b = Stage1Trainer(
        cfg, Stage1Options(run_dir=tmp_path / "b", steps=0, init_from=str(w)), DistInfo()
    )
    # same seed as the run that made the file: it would draw that run's batches again
    assert "train.seed" in capsys.readouterr().err
    Stage1Trainer(
        load_config("tiny", [*SMALL, "train.seed=1"]),
        Stage1Options(run_dir=tmp_path / "b1", steps=0, init_from=str(w)),
        DistInfo(),
    )
    assert "train.seed" not in capsys.readouterr().err
    ema = a.ema.state_dict()
    for name, t in b.model.state_dict().items():
        if t.is_floating_point() and name != "lmd.q":
            assert torch.allclose(t, ema[name].to(t.dtype), atol=2e-3, rtol=2e-3), name
    assert not b.model.lmd.frozen  # training re-orthonormalises Q
    bad = load_config("tiny", [*SMALL, "stage1.latent_dim=48", "stage1.head_hidden=48"])
    with pytest.raises(UserError, match="another"):
        Stage1Trainer(bad, Stage1Options(run_dir=tmp_path / "c", init_from=str(w)), DistInfo())
    # the livehead renderer extensions the file lacks start at zero: the same images
    off = [
        "stage1.paint=false",
        "stage1.inject=false",
        "stage1.detail=false",
        "stage1.head_warp=false",
    ]
    plain_cfg = load_config("tiny", [*SMALL, *off])
    p = Stage1Trainer(plain_cfg, Stage1Options(run_dir=tmp_path / "d", steps=1), DistInfo())
    p.fit()
    wp = tmp_path / "d" / "stage1.safetensors"
    p.model.load_state_dict(
        {k: v.to(p.model.state_dict()[k].dtype) for k, v in p.ema.state_dict().items()}
    )
    p.model.eval()
    p.model.lmd.freeze()
    variants = (
        ["stage1.paint=true"],
        ["stage1.inject=true"],
        ["stage1.detail=true"],
        ["stage1.paint=true", "stage1.inject=true", "stage1.detail=true"],
    )
    for extra in variants:
        e = Stage1Trainer(
            load_config("tiny", [*SMALL, *off, *extra]),
            Stage1Options(run_dir=tmp_path / "e", steps=0, init_from=str(wp)),
            DistInfo(),
        )
        e.model.eval()
        e.model.lmd.freeze()
        with torch.no_grad():
            h, feats = p.model.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
            alpha = torch.randn(2, p.model.cfg.motion_dim)
            torch.testing.assert_close(
                e.model.render(h, feats, alpha), p.model.render(h, feats, alpha), atol=2e-3, rtol=0
            )


def test_export_raw_or_ema_weights_from_a_run(tmp_path: Path) -> None:
    import argparse

    from engine.weights import read_metadata
    from training.stage1 import add_args, run

    _trainer(tmp_path, steps=1, extra=("train.stage1.teacher_alpha=0.25",)).fit()
    p = argparse.ArgumentParser()
    add_args(p)
    sets = [x for s in SMALL for x in ("--set", s)]
    for which in ("ema", "model"):
        out = tmp_path / f"{which}.safetensors"
        args = p.parse_args(
            ["--run-dir", str(tmp_path), "--export", str(out), "--export-weights", which, *sets]
        )
        assert run(args) == 0
        meta = json.loads(read_metadata(out)["meta"])
        assert meta["weights"] == which
        assert meta["teacher_alpha"] == 0.25  # the run's settings, not --config's (0.5)


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_checkpoints_the_last_step_and_exits_cleanly(tmp_path: Path, workers: int) -> None:
    """A run stopped by SIGTERM (a session ending, `kill`) saves its last finished step, so
    --resume loses nothing. With loader workers the signal goes to the whole process group (as
    `timeout` sends it): the workers must not die before the loop has saved."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "livehead", "train", "stage1", "--config", "tiny"]
    for o in (*SMALL, "train.stage1.log_every=1", "train.stage1.ckpt_every=100000"):
        cmd += ["--set", o]
    cmd += ["--run-dir", str(run), "--steps", "100000", "--threads", "1", "--device", "cpu"]
    cmd += ["--workers", str(workers)]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        start_new_session=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no training steps within 120 s"
        time.sleep(0.2)
    if workers:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    state, _ = load_checkpoint(run / "checkpoint.pt")
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert state["step"] == logged[-1] >= 2
    assert (run / "stage1.safetensors").exists()


def test_loader_workers_draw_the_same_batches(tmp_path: Path) -> None:
    """--workers draws each step's batch in another process with that step's generators: the
    trained state is bit-identical to drawing in the loop (teacher forcing on, so the torch
    generator's state after drawing matters too)."""
    extra = ("train.stage1.aux_motion_direct=true", "train.stage1.teacher_alpha=0.5")
    a = _trainer(tmp_path / "a", steps=2, extra=extra)
    a.fit()
    cfg = load_config("tiny", [*SMALL, *extra])
    opts = Stage1Options(run_dir=tmp_path / "b", steps=2, device="cpu", workers=2)
    b = Stage1Trainer(cfg, opts, DistInfo())
    b.fit()
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), f"{name} differs with workers"
    ra = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    rb = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ra["teacher_frac"] == rb["teacher_frac"] and ra["l1"] == rb["l1"]


def test_negative_workers_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from livehead.cli import main

    args = ["train", "stage1", "--config", "tiny", "--run-dir", str(tmp_path), "--workers", "-1"]
    assert main(args) != 0
    assert "--workers must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("rest", ["source", "target"])
def test_teacher_forcing_takes_the_free_components_from_the_chosen_frame(
    tmp_path: Path, rest: str
) -> None:
    """Teacher-forced targets are rendered with the true motion in alpha[:14] and, with
    teacher_rest "source", the encoder's reading of the source frame in the rest (so no target
    information leaks past the true motion); "target" keeps the target's reading there."""
    from training.common import step_rngs

    extra = (
        "train.stage1.aux_motion_direct=true",
        "train.stage1.teacher_alpha=1.0",
        "train.stage1.renderer_only=true",
        f"train.stage1.teacher_rest={rest}",
    )
    tr = _trainer(tmp_path, steps=0, extra=extra)
    rng, g = step_rngs(0, 1, 0)
    b = tr._to(tr.data.sample(rng, g, 2))
    assert b.gt_target is not None
    teacher = (b.gt_target - tr.aux_mean) / tr.aux_std
    use = torch.ones(2, dtype=torch.bool)
    m = tr.model
    with torch.no_grad():
        for p in m.renderer.parameters():  # a fresh renderer ignores alpha (zero-init heads)
            p.add_(0.1 * torch.randn_like(p))
        out = tr.gstep(b, teacher, use)["recon"]
        h, feats = m.encode(torch.cat([b.source, b.target]))
        a = m.motion(h)
        free = (a[:2] if rest == "source" else a[2:])[:, teacher.shape[1] :]
        a_want = torch.cat([teacher, free], 1)
        want = m.renderer(m.latent(h[:2], a_want), [f[:2] for f in feats], a_want, a[:2])
        other = (a[2:] if rest == "source" else a[:2])[:, teacher.shape[1] :]
        a_not = torch.cat([teacher, other], 1)
        not_want = m.renderer(m.latent(h[:2], a_not), [f[:2] for f in feats], a_not, a[:2])
    torch.testing.assert_close(out, want)
    assert (out - not_want).abs().max() > 1e-3


def test_relative_teacher_moves_the_head_from_the_source_reading(tmp_path: Path) -> None:
    """teacher_head "relative": the head's pose, place and size (alpha[0:6]) of a teacher-forced
    target are the true move from source to target added to the encoder's reading of the
    source; the face's own fields stay the target's true ones. A bad value is a clear error."""
    from engine.models.stage1 import HEAD_DIMS
    from training.common import step_rngs

    extra = (
        "train.stage1.aux_motion_direct=true",
        "train.stage1.teacher_alpha=1.0",
        "train.stage1.renderer_only=true",
        "train.stage1.teacher_head=relative",
        "stage1.head_warp=true",
    )
    tr = _trainer(tmp_path, steps=0, extra=extra)
    rng, g = step_rngs(0, 1, 0)
    b = tr._to(tr.data.sample(rng, g, 2))
    assert b.gt_target is not None and b.gt_source is not None
    teacher = (b.gt_target - tr.aux_mean) / tr.aux_std
    teacher_src = (b.gt_source - tr.aux_mean) / tr.aux_std
    use = torch.ones(2, dtype=torch.bool)
    m = tr.model
    with torch.no_grad():
        for p in m.renderer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        out = tr.gstep(b, teacher, use, teacher_src)["recon"]
        absolute = tr.gstep(b, teacher, use)["recon"]
        h, feats = m.encode(torch.cat([b.source, b.target]))
        a = m.motion(h)
        k = teacher.shape[1]
        head = teacher[:, :HEAD_DIMS] - teacher_src[:, :HEAD_DIMS] + a[:2, :HEAD_DIMS]
        a_want = torch.cat([head, teacher[:, HEAD_DIMS:], a[:2, k:]], 1)
        want = m.renderer(m.latent(h[:2], a_want), [f[:2] for f in feats], a_want, a[:2])
    torch.testing.assert_close(out, want)
    assert (out - absolute).abs().max() > 1e-3
    with pytest.raises(UserError, match="teacher_head"):
        _trainer(tmp_path / "bad", steps=0, extra=("train.stage1.teacher_head=both",))


def test_teacher_rest_must_be_source_or_target(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="teacher_rest"):
        _trainer(tmp_path, steps=0, extra=("train.stage1.teacher_rest=both",))


def test_old_checkpoints_keep_the_teacher_forcing_they_trained_with(tmp_path: Path) -> None:
    """A checkpoint saved before train.stage1.teacher_rest existed loads as "target" (what it
    did), not as today's default; newer checkpoints keep their value."""
    _trainer(tmp_path, steps=1).fit()
    state, cfg = load_checkpoint(tmp_path / "checkpoint.pt")
    assert cfg.train.stage1.teacher_rest == "source"
    del state["config"]["train"]["stage1"]["teacher_rest"]
    torch.save(state, tmp_path / "old.pt")
    _, old = load_checkpoint(tmp_path / "old.pt")
    assert old.train.stage1.teacher_rest == "target"


def test_placed_heads_move_the_nose_with_the_turn() -> None:
    """placed_heads = 1: source and target heads are placed as in a talking clip (one neck
    pivot, the nose where the turn puts it), so the nose's x follows the yaw and a target that
    turns further than its source has its nose further right; 0: the nose is drawn
    independently of the turn."""
    import numpy as np

    from training.stage1_data import AUX_FIELDS, SyntheticPairs

    cfg = load_config("tiny")
    yaw, x = AUX_FIELDS.index("yaw"), AUX_FIELDS.index("loc_x")
    rng, g = np.random.default_rng(4), torch.Generator().manual_seed(0)
    corr = {}
    for placed in (0.0, 1.0):
        data = SyntheticPairs(cfg.world, 32, near_pairs=0.0, negatives=False, placed_heads=placed)
        b = data.sample(rng, g, 48)
        assert b.gt_source is not None and b.gt_target is not None
        d_yaw = (b.gt_target[:, yaw] - b.gt_source[:, yaw]).numpy()
        d_x = (b.gt_target[:, x] - b.gt_source[:, x]).numpy()
        corr[placed] = float(np.corrcoef(d_yaw, d_x)[0, 1])
    assert abs(corr[0.0]) < 0.4 and corr[1.0] > 0.9


def test_placed_apart_gives_the_target_a_pivot_of_its_own() -> None:
    """placed_apart = 0: a placed pair's source and target share one neck pivot (two frames of
    one clip); 1: the target rests on a pivot of its own, as a cross-reenactment driver's head
    does. The pivot is read back from the drawn nose (nose_from_pivot with the pivot at 0)."""
    import numpy as np

    from training.stage1_data import SyntheticPairs
    from training.world import get_identity
    from training.world.render import nose_from_pivot

    cfg = load_config("tiny")
    ident = get_identity(cfg.world, 3)

    def pivot(m: np.ndarray) -> np.ndarray:
        zero = np.zeros(1)
        nx, ny = nose_from_pivot(ident, m, zero, zero)
        return np.array([m["loc_x"][0] - nx[0], m["loc_y"][0] - ny[0]])

    gaps = {}
    for apart in (0.0, 1.0):
        data = SyntheticPairs(
            cfg.world, 32, near_pairs=0.0, negatives=False, placed_heads=1.0, placed_apart=apart
        )
        rng = np.random.default_rng(7)
        pairs = [data._drawn_pair(ident, rng) for _ in range(16)]
        gaps[apart] = np.array([np.abs(pivot(t) - pivot(s)).max() for s, t in pairs])
    assert gaps[0.0].max() < 1e-5
    assert (gaps[1.0] > 1e-3).mean() > 0.9


def test_avatar_sources_are_the_portrait_and_placed_targets_follow_the_turn() -> None:
    """avatar_sources = 1: every source is the identity's avatar portrait (neutral_motion:
    frontal, centred, mouth closed), the targets vary; with placed_heads the target's nose
    moves with its turn (its own pivot) while the source stays the portrait."""
    import numpy as np

    from training.stage1_data import AUX_FIELDS, SyntheticPairs
    from training.world.motion import as_array, neutral_motion

    cfg = load_config("tiny")
    rng, g = np.random.default_rng(5), torch.Generator().manual_seed(0)
    data = SyntheticPairs(
        cfg.world, 32, near_pairs=0.0, negatives=False, placed_heads=1.0, avatar_sources=1.0
    )
    b = data.sample(rng, g, 48)
    assert b.gt_source is not None and b.gt_target is not None
    portrait = torch.from_numpy(as_array(neutral_motion(1))).float()
    torch.testing.assert_close(b.gt_source, portrait.expand(48, -1), atol=1e-6, rtol=0)
    yaw, x = AUX_FIELDS.index("yaw"), AUX_FIELDS.index("loc_x")
    assert b.gt_target[:, yaw].std() > 0.05
    assert float(np.corrcoef(b.gt_target[:, yaw].numpy(), b.gt_target[:, x].numpy())[0, 1]) > 0.7
    # sources are the same image per identity: the portrait
    none = SyntheticPairs(cfg.world, 32, near_pairs=0.0, negatives=False, avatar_sources=0.0)
    c = none.sample(rng, g, 48)
    assert c.gt_source is not None and c.gt_source[:, yaw].std() > 0.05


def test_squared_error_term_joins_the_loss(tmp_path: Path) -> None:
    """train.stage1.w_l2: the same first batch and forward (equal L1), the squared-error term
    logged as 4·mean(err²·w) > 0, and a different update than L1 alone."""
    extra = ("train.stage1.region_weight=8.0", "train.stage1.renderer_only=true")
    a = _trainer(tmp_path / "a", steps=1, extra=extra)
    b = _trainer(tmp_path / "b", steps=1, extra=(*extra, "train.stage1.w_l2=1.0"))
    ra, rb = a.train_step(), b.train_step()
    assert "l2" not in ra and rb["l2"] > 0
    assert abs(ra["l1"] - rb["l1"]) < 1e-6
    # 4·err² is below 4·|err| for |err| < 1: the term is smaller than 4 × the L1 part
    assert rb["l2"] < 4 * rb["l1_region"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert any(not torch.allclose(sa[k], sb[k]) for k in sa if k.startswith("renderer."))


def test_mouth_pairs_change_only_the_mouth() -> None:
    """mouth_pairs = 1: every target is its source (head, eyes, brows, gaze) with a new mouth."""
    import numpy as np

    from training.stage1_data import AUX_FIELDS, SyntheticPairs

    cfg = load_config("tiny")
    rng, g = np.random.default_rng(6), torch.Generator().manual_seed(0)
    data = SyntheticPairs(
        cfg.world, 32, negatives=False, placed_heads=0.5, avatar_sources=0.5, mouth_pairs=1.0
    )
    b = data.sample(rng, g, 32)
    assert b.gt_source is not None and b.gt_target is not None
    mouth = [AUX_FIELDS.index(f) for f in ("mouth_open", "mouth_width", "mouth_round")]
    rest = [i for i in range(len(AUX_FIELDS)) if i not in mouth]
    torch.testing.assert_close(b.gt_target[:, rest], b.gt_source[:, rest], atol=1e-6, rtol=0)
    opening = b.gt_target[:, mouth[0]] - b.gt_source[:, mouth[0]]
    assert opening.abs().mean() > 0.2
    assert not torch.equal(b.source, b.target)


def test_moved_mouth_pairs_keep_the_targets_head() -> None:
    """mouth_pairs_moved = 1: the target's head moves as drawn, its face is the source's but for
    a new mouth; with 0 the head stays (above)."""
    import numpy as np

    from training.stage1_data import AUX_FIELDS, SyntheticPairs
    from training.world.motion import HEAD_FIELDS

    cfg = load_config("tiny")
    rng, g = np.random.default_rng(6), torch.Generator().manual_seed(0)
    data = SyntheticPairs(
        cfg.world, 32, negatives=False, avatar_sources=0.5, mouth_pairs=1.0, mouth_pairs_moved=1.0
    )
    b = data.sample(rng, g, 16)
    assert b.gt_source is not None and b.gt_target is not None
    mouth = [AUX_FIELDS.index(f) for f in ("mouth_open", "mouth_width", "mouth_round")]
    head = [AUX_FIELDS.index(f) for f in HEAD_FIELDS if f in AUX_FIELDS]
    face = [i for i in range(len(AUX_FIELDS)) if i not in mouth and i not in head]
    assert head and face
    torch.testing.assert_close(b.gt_target[:, face], b.gt_source[:, face], atol=1e-6, rtol=0)
    moved = (b.gt_target[:, head] - b.gt_source[:, head]).abs().amax(dim=1) > 1e-3
    assert moved.float().mean() > 0.8
    assert (b.gt_target[:, mouth[0]] - b.gt_source[:, mouth[0]]).abs().mean() > 0.2


def test_cosine_learning_rate_decay(tmp_path: Path) -> None:
    """train.stage1.lr_decay_steps: warm-up, then a cosine from lr to lr_final ending at that
    step; the optimiser gets it each step; a bad lr_final is a clear error."""
    from training.stage1 import generator_lr

    cfg = load_config(
        "tiny",
        [
            "train.stage1.lr=1e-3",
            "train.stage1.warmup_steps=10",
            "train.stage1.lr_decay_steps=110",
            "train.stage1.lr_final=1e-4",
        ],
    ).train.stage1
    assert generator_lr(cfg, 5) == pytest.approx(0.5 * 1e-3)
    assert generator_lr(cfg, 10) == pytest.approx(1e-3)
    assert generator_lr(cfg, 60) == pytest.approx(0.55e-3)  # half-way down the cosine
    assert generator_lr(cfg, 110) == pytest.approx(1e-4)
    assert generator_lr(cfg, 500) == pytest.approx(1e-4)
    const = load_config(
        "tiny", ["train.stage1.lr=1e-3", "train.stage1.warmup_steps=0"]
    ).train.stage1
    assert generator_lr(const, 7) == 1e-3
    extra = ("train.stage1.warmup_steps=0", "train.stage1.lr_decay_steps=3")
    tr = _trainer(tmp_path / "a", steps=2, extra=extra)
    tr.train_step()
    lr0 = tr.opt_g.param_groups[0]["lr"]
    tr.train_step()
    assert 0 < tr.opt_g.param_groups[0]["lr"] < lr0 < tr.t.lr
    with pytest.raises(UserError, match="lr_final"):
        _trainer(tmp_path / "b", extra=("train.stage1.lr_final=1.0",))


class _CopyRenderer(torch.nn.Module):
    """A stand-in stage-1 model whose every render is the source frame."""

    reads_head = False  # no head reader: absolute reenactment

    def encode(self, img: torch.Tensor):
        return torch.zeros(len(img), 4), [img]

    def motion(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(h), 20)

    def render(self, h, feats, alpha: torch.Tensor) -> torch.Tensor:
        return feats[0][:1].expand(len(alpha), -1, -1, -1)


def test_self_psnr_by_head_move_bins_the_frames() -> None:
    """``self_psnr_by_head_move``: four quartile bins of head movement, in order; a renderer
    that copies the source scores its copy baseline in every bin, and its PSNR falls as the
    head moves further; it rebuilds the source itself exactly (``source_recon_psnr``)."""
    from training.eval_stage1 import eval_synthetic

    cfg = load_config("tiny", [*SMALL, "stage1.image_size=64"])
    res = eval_synthetic(_CopyRenderer(), cfg, n_ids=3, frames=12)
    bins = res["self_psnr_by_head_move"]
    assert len(bins) == 4
    for a, b in zip(bins[:-1], bins[1:]):
        assert a["move"][1] == b["move"][0] and a["move"][0] <= a["move"][1]
    for b in bins:
        assert b["psnr"] == pytest.approx(b["copy_psnr"], abs=1e-4)
    assert bins[0]["psnr"] > bins[-1]["psnr"]
    assert res["source_recon_psnr"] > 60


def test_clip_pairs_are_two_frames_of_one_clip() -> None:
    """clip_pairs = 1: each pair is two distinct frames of one talking clip of its identity
    (replayed from the same random stream)."""
    import numpy as np

    from training.stage1_data import AUX_FIELDS, CLIP_PAIR_FRAMES, SyntheticPairs
    from training.world import clip_motion_only
    from training.world.motion import as_array

    cfg = load_config("tiny")
    data = SyntheticPairs(cfg.world, 32, negatives=False, avatar_sources=0.5, clip_pairs=1.0)
    b = data.sample(np.random.default_rng(3), torch.Generator().manual_seed(0), 4)
    assert b.gt_source is not None and b.gt_target is not None
    rng = np.random.default_rng(3)
    ids = rng.choice(data.ids, size=4, replace=False)
    rng.choice(data.ids, size=4, replace=False)  # the negatives' ids
    for k, i in enumerate(ids):
        assert int(b.label_source[k]) == int(i)
        rng.random()  # the clip_pairs draw
        m = as_array(clip_motion_only(cfg.world, int(i), CLIP_PAIR_FRAMES, rng))
        fs, ft = rng.choice(len(m), size=2, replace=False)
        np.testing.assert_allclose(b.gt_source[k].numpy(), m[fs], atol=1e-6)
        np.testing.assert_allclose(b.gt_target[k].numpy(), m[ft], atol=1e-6)
    assert len(AUX_FIELDS) == m.shape[1]
