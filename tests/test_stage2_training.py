"""Stage-2 training: data extraction with a frozen stage 1, a short run, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.weights import save_weights
from tests.small import SMALL_STAGE1, SMALL_STAGE2, SMALL_WORLD, fingerprints_agree, torchrun
from training.common import DistInfo, load_checkpoint
from training.stage2 import Stage2Options, Stage2Trainer

SMALL = [
    *SMALL_STAGE1,
    *SMALL_STAGE2,
    *SMALL_WORLD,
    "train.stage2.batch_size=4",
    "train.stage2.log_every=1",
]


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    m = Stage1Model(cfg.stage1)
    m.lmd.freeze()
    p = tmp_path_factory.mktemp("s1") / "stage1.safetensors"
    save_weights(p, m.state_dict(), cfg, kind="stage1", meta={"aux_motion_direct": True})
    return p


def _trainer(run: Path, s1: Path, resume: bool = False, steps: int = 2) -> Stage2Trainer:
    cfg = load_config("tiny", SMALL)
    torch.set_num_threads(1)
    opts = Stage2Options(
        run_dir=run,
        resume=resume,
        steps=steps,
        stage1=str(s1),
        extract_clips=2,
        clip_seconds=2.0,
        device="cpu",
    )
    return Stage2Trainer(cfg, opts, DistInfo())


def test_train_resume_equals_uninterrupted(tmp_path: Path, stage1_file: Path) -> None:
    a = _trainer(tmp_path / "a", stage1_file)
    a.fit()
    rec = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 2 and rec["diffusion"] > 0 and rec["adapter"] >= 0
    assert (tmp_path / "a" / "stage2.safetensors").exists()
    # the same cached data for the interrupted run
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "data.pt").write_bytes((tmp_path / "a" / "data.pt").read_bytes())
    _trainer(tmp_path / "b", stage1_file, steps=1).fit()
    b = _trainer(tmp_path / "b", stage1_file, resume=True, steps=2)
    assert b.step == 1
    b.fit()
    sa, _ = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    sb, _ = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for name, t in sa["nets"].items():
        assert torch.equal(t, sb["nets"][name]), name
    # the normaliser was fitted to the data (not left at identity)
    assert not torch.equal(sa["nets"]["normalizer.center"], torch.zeros(20))


def test_stage1_config_mismatch_is_clear(tmp_path: Path, stage1_file: Path) -> None:
    cfg = load_config("tiny", [*SMALL, "stage1.latent_dim=48", "stage1.head_hidden=48"])
    opts = Stage2Options(run_dir=tmp_path, stage1=str(stage1_file), extract_clips=1)
    with pytest.raises(UserError, match="stage-1 weights"):
        Stage2Trainer(cfg, opts, DistInfo())


def test_world_alpha_needs_direct_stage1_weights(tmp_path: Path) -> None:
    cfg = load_config("tiny", [*SMALL, "train.stage2.world_alpha=true"])
    m = Stage1Model(cfg.stage1)
    m.lmd.freeze()
    plain = tmp_path / "plain.safetensors"
    save_weights(plain, m.state_dict(), cfg, kind="stage1")
    opts = Stage2Options(run_dir=tmp_path / "run", stage1=str(plain), extract_clips=1)
    with pytest.raises(UserError, match="aux_motion_direct"):
        Stage2Trainer(cfg, opts, DistInfo())


def test_world_motion_alpha_is_the_standardised_motion() -> None:
    import numpy as np

    from training.stage1_data import aux_stats
    from training.stage2_data import world_motion_alpha
    from training.world.motion import as_array, random_motion

    motion = random_motion(np.random.default_rng(3), 5)
    enc = torch.randn(5, 20)
    a = world_motion_alpha(motion, enc)
    mean, std = aux_stats()
    want = torch.from_numpy((as_array(motion) - mean) / std)
    assert torch.allclose(a[:, :14], want) and torch.equal(a[:, 14:], enc[:, 14:])
    with pytest.raises(UserError, match="do not match"):
        world_motion_alpha(motion, enc[:4])


def _ramp_clip(t: int = 40):
    """A clip whose every frame is recognisable: alpha row n = n + (0 .. 0.19), h row n = n,
    feature rows (4 per frame) = their frame + 1, controls row n = n."""
    import numpy as np

    from engine.audio import LogMelFrontend
    from engine.config import load_config
    from engine.models.stage2 import Stage2Nets
    from engine.windowing import WindowPlan
    from training.stage2_data import Stage2Clip

    cfg = load_config("tiny")
    front = LogMelFrontend(cfg.stage2.audio)
    plan = WindowPlan.from_config(cfg.stage2, front.frames_per_video_frame)
    alpha = torch.arange(t, dtype=torch.float32)[:, None] + torch.arange(20)[None] / 100
    rows = torch.arange(t * 4 + 50) // 4 + 1.0
    clip = Stage2Clip(
        audio=np.zeros(16000 * 2, np.float32),
        feats=rows[:, None].expand(-1, cfg.stage2.audio.n_mels).contiguous(),
        alpha=alpha,
        h=torch.arange(t, dtype=torch.float32)[:, None].expand(t, cfg.stage1.latent_dim),
        controls=torch.arange(t, dtype=torch.float32)[:, None].expand(t, 5).contiguous(),
        identity=0,
    )
    norm = Stage2Nets.from_config(cfg).normalizer
    norm.fit(alpha, mode="minmax")
    return cfg, plan, clip, norm


def test_sampler_takes_free_components_from_the_reference_frame() -> None:
    """With world_alpha (rest_from = 14), every window frame's components 14.. are the
    reference frame's (as the stage-1 renderer is trained); without it, each frame's own."""
    import numpy as np

    from training.stage2_data import WindowSampler

    cfg, plan, clip, norm = _ramp_clip()
    alpha = clip.alpha
    for rest_from in (None, 14):
        sampler = WindowSampler([clip], plan, cfg, norm, rest_from=rest_from)
        b = sampler.sample(np.random.default_rng(1), 6)
        x0 = norm.denormalize(b.x0)
        ref = norm.denormalize(b.ref_alpha)
        ref_frame = b.ref_h[:, 0].round().long()
        torch.testing.assert_close(ref, alpha[ref_frame])
        frames = x0[..., 0].round().long()  # which frame each row came from
        torch.testing.assert_close(x0[..., :14], alpha[frames][..., :14])
        want = ref[:, None, 14:].expand_as(x0[..., 14:]) if rest_from else alpha[frames][..., 14:]
        torch.testing.assert_close(x0[..., 14:], want)
        if rest_from:
            assert not torch.equal(alpha[frames][..., 14:], want)  # the test can tell them apart


def test_start_windows_look_like_a_stream_start() -> None:
    """start_windows = 1: every window is a stream's first at its own target frame s -- prefix
    all the reference alpha, silence features and the frame-s controls before s, the clip from s
    on. start_windows = 0: the prefix is the clip's own frames wherever s >= K."""
    import numpy as np

    from training.stage2_data import WindowSampler

    cfg, plan, clip, norm = _ramp_clip()
    k, w, c = plan.prefix_frames, plan.window_frames, plan.context_frames
    f = plan.feature_frames_per_video_frame
    sampler = WindowSampler([clip], plan, cfg, norm)
    pad = torch.as_tensor(sampler.pad_row).float()
    b = sampler.sample(np.random.default_rng(3), 32, start_windows=1.0)
    x0 = norm.denormalize(b.x0)
    ref = norm.denormalize(b.ref_alpha)
    for i in range(32):
        s = int(x0[i, k, 0].round())  # the first target frame
        torch.testing.assert_close(x0[i, :k], ref[i].expand(k, -1))
        torch.testing.assert_close(x0[i, k:, 0], torch.arange(s, s + w).float())
        torch.testing.assert_close(b.feats[i, : c * f], pad.expand(c * f, -1))
        assert b.feats[i, c * f, 0] == s + 1  # the clip's own audio from frame s on
        assert (b.controls[i, : c + 1, 0] == s).all()
    b = sampler.sample(np.random.default_rng(3), 32, start_windows=0.0)
    x0 = norm.denormalize(b.x0)
    s = x0[:, k, 0].round()
    late = s >= k
    assert late.sum() > 10
    torch.testing.assert_close(x0[late, 0, 0], s[late] - k)  # the prefix: the clip's frames


def test_ddp_two_cpu_processes(tmp_path: Path, stage1_file: Path) -> None:
    args = [
        "--config",
        "tiny",
        "--run-dir",
        str(tmp_path),
        "--steps",
        "2",
        "--stage1",
        str(stage1_file),
        "--extract-clips",
        "2",
        "--clip-seconds",
        "2",
    ]
    r = torchrun("training.stage2", args, SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    st, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert st["step"] == 2
    assert fingerprints_agree(tmp_path)
