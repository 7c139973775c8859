"""``stage1.fast_head``: the draft exit (engine/models/stage1.py ``FastHead``), its trainer
(training/fast_head.py) and the live session's use of it (engine/stream.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError, load_config
from engine.models.stage1 import FastHead, Stage1Model, identity_grid
from engine.stream import Engine
from engine.tensors import to_tensor, to_uint8
from engine.weights import KEEP_FP32, load_weights, save_weights
from tests.small import SMALL_STAGE1, crash_on_call, small_models
from tests.test_stream import AUDIO


def _model(fast: bool = True, ready: bool = True) -> Stage1Model:
    cfg = load_config("tiny", SMALL_STAGE1).stage1
    torch.manual_seed(0)
    m = Stage1Model(dataclasses.replace(cfg, fast_head=fast))
    m.lmd.freeze()
    if fast and ready:
        assert m.fast_head is not None
        m.fast_head.ready.fill_(1.0)
    return m.eval()


def _images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_fast_head_with_no_motion_and_an_open_gate_gives_the_source() -> None:
    """Identity flow, the source fully visible (mask 1) and the detail gate open: the draft is
    the portrait itself (its r² average upsampled plus the high-pass of the full-size warp), so
    a wrong warp, scale or upsampling shows. 708 parameters at the tiny config's 128² width."""
    assert sum(p.numel() for p in FastHead(16).parameters()) == 708
    head = FastHead(16).eval()
    with torch.no_grad():
        head.out.bias[3] = 50.0  # sigmoid(52): the gate open
    src = _images(1, 1)
    b, r = 2, 32
    x = torch.randn(b, 16, r, r)
    out = head(
        src,
        [identity_grid(r), identity_grid(64)],
        x,
        torch.randn(b, 16, r, r),
        torch.randn(b, 3, r, r),
        torch.zeros(b, 2, r, r),
        torch.ones(b, 1, r, r),
    )
    assert out.shape == (b, 3, 64, 64)
    torch.testing.assert_close(out, src.expand(b, -1, -1, -1), atol=1e-5, rtol=0)
    # a shifted flow moves the picture: it must not still be the source
    moved = head(
        src,
        [identity_grid(r), identity_grid(64)],
        x,
        torch.randn(b, 16, r, r),
        torch.randn(b, 3, r, r),
        torch.full((b, 2, r, r), 0.25),
        torch.ones(b, 1, r, r),
    )
    assert (moved - src).abs().mean() > 0.05


def test_render_fast_skips_the_finest_level() -> None:
    m = _model()
    src = _images(1, 2)
    with torch.no_grad():
        h, feats = m.encode(src)
        alpha = m.motion(h).repeat(3, 1) + 0.3 * torch.randn(3, m.cfg.motion_dim)
        out = m.render_fast(h, feats, alpha, src)
        coarse = m.render_fast(h, feats[:-1], alpha, src)  # the finest features never read
    assert out.shape == (3, 3, 64, 64) and out.abs().max() <= 1.0
    assert torch.equal(out, coarse)
    assert m.renders_fast and not _model(ready=False).renders_fast
    with pytest.raises(ConfigError, match="no fast head"):
        _model(fast=False).render_fast(h, feats, alpha, src)
    assert m.param_counts()["fast_head"] == sum(p.numel() for p in m.fast_head.parameters())


def _args(tmp: Path, init: Path, **over: object) -> argparse.Namespace:
    a = dict(
        init_from=str(init),
        out=str(tmp / "out.safetensors"),
        run_dir=str(tmp / "run"),
        steps=4,
        batch=2,
        lr=1e-3,
        seed=3,
        ckpt_every=2,
        resume=False,
        threads=0,
        warm_start=False,
    )
    a.update(over)
    return argparse.Namespace(**a)


def test_fast_head_training_resume_and_output(tmp_path: Path, monkeypatch) -> None:
    """4 steps straight = 2 steps, a crash, --resume; the output is the input plus a ready
    draft exit that ``load_stage1`` builds, with its comparison in the metadata; the loss
    goes down over a few more steps."""
    import training.fast_head as tf
    from engine.loading import load_stage1

    m = _model(fast=False)
    cfg = dataclasses.replace(load_config("tiny", SMALL_STAGE1), stage1=m.cfg)
    init = tmp_path / "s1.safetensors"
    save_weights(init, m.state_dict(), cfg, kind="stage1")
    monkeypatch.setattr(tf, "evaluate_fast", lambda model, world: {"fast_psnr": 1.0})

    straight = tmp_path / "a"
    assert tf.run(_args(straight, init)) == 0
    crashed = tmp_path / "b"
    restore = crash_on_call(monkeypatch, tf, "fast_batch")
    with pytest.raises(KeyboardInterrupt):
        tf.run(_args(crashed, init))
    restore()
    with pytest.raises(Exception, match="--resume"):
        tf.run(_args(crashed, init))  # a run dir with a checkpoint is never overwritten
    with pytest.raises(Exception, match="not a fast-head run"):
        tf.run(_args(crashed, init, steps=5, resume=True))
    assert tf.run(_args(crashed, init, resume=True)) == 0

    ta, cfg_a, meta_a = load_weights(straight / "out.safetensors", "stage1")
    tb, _, _ = load_weights(crashed / "out.safetensors", "stage1")
    assert cfg_a.stage1.fast_head and meta_a["fast_head"]["fast_psnr"] == 1.0
    keys = [k for k in ta if k.startswith("fast_head.")]
    assert keys and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["fast_head.out.weight"], torch.zeros_like(ta["fast_head.out.weight"]))
    src, _, _ = load_weights(init, "stage1")
    for k, v in src.items():  # nothing else changed (stored as fp16)
        assert torch.equal(ta[k], v if k.endswith(KEEP_FP32) else v.half().float()), k
    loaded, _, _ = load_stage1(straight / "out.safetensors")
    assert loaded.renders_fast

    with pytest.raises(Exception, match="no trained fast head"):
        tf.run(_args(tmp_path / "c", init, warm_start=True))
    done = straight / "out.safetensors"
    assert tf.run(_args(tmp_path / "d", done, warm_start=True, lr=1e-9, steps=2)) == 0
    td, _, meta_d = load_weights(tmp_path / "d" / "out.safetensors", "stage1")
    assert all(torch.allclose(td[k], ta[k], atol=1e-3) for k in keys)
    assert meta_d["fast_head"]["warm_from"]["steps"] == 4

    # learning: 30 steps on one fixed batch bring the draft closer to the full render
    monkeypatch.setattr(tf, "step_rngs", lambda seed, step, rank: (np.random.default_rng(0), None))
    assert tf.run(_args(tmp_path / "e", init, steps=30, lr=3e-3, ckpt_every=100)) == 0
    import json

    logged = [
        json.loads(x) for x in (tmp_path / "e" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged[-1]["loss"] < logged[0]["loss"], logged


@pytest.fixture(scope="module")
def fast_engine() -> Engine:
    torch.set_num_threads(1)
    m1, nets, cfg = small_models(["stage1.fast_head=true", "stream.fast_draft=true"])
    assert m1.fast_head is not None
    with torch.no_grad():  # some trained-looking weights: the draft is not the plain blend
        torch.manual_seed(5)
        for p in m1.fast_head.parameters():
            p.normal_(0.0, 0.1)
        m1.fast_head.ready.fill_(1.0)
    return Engine.from_models(m1, nets, cfg)


def test_late_windows_are_drawn_by_the_draft_exit(fast_engine: Engine) -> None:
    """A window that a full render would make late but the draft would not is drawn by the
    draft (frames marked fast, their images the draft's); when neither is in time the window
    repeats; offline rendering never uses it."""
    rng = np.random.default_rng(1)
    av = fast_engine.prepare_avatar(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    model = fast_engine.stage1.model  # type: ignore[attr-defined]
    s = fast_engine.session(av, render_deadline_ms=4000.0)
    # a full render would be late for the next windows; the estimate falls by 5 % a draft:
    # 5 -> 4.75 -> 4.51 -> 4.29 -> 4.07 (drafts) -> 3.87 (+ the wait: full again)
    s._render_estimate_s = 5.0
    for i in range(0, 16000, 1280):
        s.push_audio(AUDIO[i : i + 1280])
    frames = s.pull()
    fast = [bool(f.meta["fast"]) for f in frames]
    assert fast[:10] == [True] * 10 and not any(fast[10:]), fast
    assert not any(f.meta["dropped"] for f in frames)
    assert s.stats.frames_fast == 10
    alpha = torch.from_numpy(np.stack([f.meta["alpha"] for f in frames[:2]]))
    with torch.no_grad():
        draft = to_uint8(model.render_fast(av.h, av.feats, alpha, to_tensor(av.image[None])))
        full = to_uint8(model.render(av.h, av.feats, alpha))
    assert np.array_equal(np.stack([f.image for f in frames[:2]]), draft)
    assert not np.array_equal(draft, full)

    s = fast_engine.session(av, render_deadline_ms=1000.0)
    s._render_estimate_s = s._fast_estimate_s = 1.3  # neither in time: the images repeat
    for i in range(0, 16000, 1280):
        s.push_audio(AUDIO[i : i + 1280])
    frames = s.pull()
    assert [bool(f.meta["dropped"]) for f in frames[:4]] == [True] * 4
    assert not any(f.meta["fast"] for f in frames)

    s = fast_engine.session(av)  # no deadline: every window in full
    s.push_audio(AUDIO[:16000])
    assert s.pull() and s.stats.frames_fast == 0

    # stream.fast_draft off (the default): the same late windows repeat instead
    off = dataclasses.replace(
        fast_engine.cfg, stream=dataclasses.replace(fast_engine.cfg.stream, fast_draft=False)
    )
    plain = Engine(fast_engine.stage1, fast_engine.stage2, off)
    s = plain.session(av, render_deadline_ms=1000.0)
    s._render_estimate_s = 1.3
    for i in range(0, 16000, 1280):
        s.push_audio(AUDIO[i : i + 1280])
    frames = s.pull()
    assert [bool(f.meta["dropped"]) for f in frames[:4]] == [True] * 4
    assert s.stats.frames_fast == 0


def test_stage1_training_from_a_file_with_a_draft_exit(tmp_path: Path) -> None:
    """Continuing the renderer from weights that have a draft exit (the bundled file) works
    with the tiny config, which has none: the exit is dropped (it was distilled from the old
    renderer; `livehead train fast` makes a new one). A config with one carries it, frozen."""
    from tests.test_stage1_training import SMALL
    from training.common import DistInfo
    from training.stage1 import Stage1Options, Stage1Trainer

    cfg = load_config("tiny", SMALL)
    assert not cfg.stage1.fast_head
    torch.manual_seed(1)
    m = Stage1Model(dataclasses.replace(cfg.stage1, fast_head=True))
    m.lmd.freeze()
    assert m.fast_head is not None
    m.fast_head.ready.fill_(1.0)
    w = tmp_path / "s1.safetensors"
    save_weights(w, m.state_dict(), dataclasses.replace(cfg, stage1=m.cfg), kind="stage1")
    torch.set_num_threads(1)
    opts = Stage1Options(run_dir=tmp_path / "a", steps=0, init_from=str(w))
    assert Stage1Trainer(cfg, opts, DistInfo()).model.fast_head is None
    with_fast = load_config("tiny", [*SMALL, "stage1.fast_head=true"])
    t = Stage1Trainer(
        with_fast, Stage1Options(run_dir=tmp_path / "b", steps=0, init_from=str(w)), DistInfo()
    )
    assert t.model.fast_head is not None and t.model.renders_fast
    assert not any(p.requires_grad for p in t.model.fast_head.parameters())
