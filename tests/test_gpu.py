"""The CUDA paths: the torch backend on a GPU against the CPU, CUDA graphs against eager calls,
the streaming engine on a GPU, and both training recipes on a GPU. Opt in with ``-m gpu`` (they
skip without a CUDA device); the first test runs everywhere."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.backends import TorchStage1, TorchStage2
from engine.config import load_config
from engine.errors import UserError
from engine.stream import Engine
from tests.small import SMALL_STAGE1, SMALL_WORLD, small_models

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_graphs_need_a_cuda_device() -> None:
    m1, nets, _ = small_models()
    with pytest.raises(UserError, match="cuda_graphs"):
        TorchStage1(m1, "cpu", cuda_graphs=True)
    with pytest.raises(UserError, match="cuda_graphs"):
        TorchStage2(nets, "cpu", cuda_graphs=True)


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(16000 * seconds)
    x = rng.standard_normal(n).astype(np.float32) * 0.2
    env = (np.sin(np.arange(n) / 16000 * 2 * np.pi * 1.5) > -0.3).astype(np.float32)
    return x * env


def _frames(engine: Engine, audio: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    avatar = engine.prepare_avatar(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    s = engine.session(avatar, seed=3, live=False)
    out = []
    for i in range(0, audio.shape[0], 320):
        s.push_audio(audio[i : i + 320], 16000)
        out += s.pull()
    s.finish()
    out += s.pull()
    return np.stack([f.image for f in out]).astype(np.float32)


def _stage_inputs(m1: torch.nn.Module, nets: torch.nn.Module, cfg, seed: int):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    s = cfg.stage1.image_size
    img = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    alpha = torch.randn(4, cfg.stage1.motion_dim, generator=g)
    return img, alpha


@pytest.mark.gpu
@needs_cuda
def test_torch_backend_on_cuda_matches_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage-1 render and the whole stream on the GPU agree with the CPU (TF32 off: exact
    fp32 arithmetic up to summation order)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    m1, nets, cfg = small_models()
    img, alpha = _stage_inputs(m1, nets, cfg, 0)
    cpu = TorchStage1(copy.deepcopy(m1), "cpu")
    gpu = TorchStage1(copy.deepcopy(m1), "cuda")
    ref = cpu.render(*cpu.encode(img), alpha)
    out = gpu.render(*gpu.encode(img), alpha).cpu()
    assert (out - ref).abs().max() < 1e-3

    audio = _speech(2.0)
    engines = [
        Engine.from_models(copy.deepcopy(m1), copy.deepcopy(nets), cfg, device=d)
        for d in ("cpu", "cuda")
    ]
    a, b = (_frames(e, audio) for e in engines)
    assert a.shape == b.shape and a.shape[0] >= 45
    # uint8 frames: a pixel may round the other way; the motion must not drift apart
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_equal_eager_calls() -> None:
    """Replaying the captured graphs gives the eager results, for new inputs each call (the
    static buffers are refilled) and for a second batch size (a second graph)."""
    m1, nets, cfg = small_models()
    for dtype in ("bf16", "fp32"):  # bf16: autocast inside the capture
        eager = TorchStage1(copy.deepcopy(m1), "cuda", render_dtype=dtype)
        graphed = TorchStage1(copy.deepcopy(m1), "cuda", render_dtype=dtype, cuda_graphs=True)
        for seed in (0, 1, 2):
            img, alpha = _stage_inputs(m1, nets, cfg, seed)
            h, feats = eager.encode(img)  # inference tensors, as the engine passes them
            for a in (alpha, alpha[:2]):
                want = eager.render(h, feats, a)
                torch.testing.assert_close(graphed.render(h, feats, a), want)
                with torch.inference_mode():  # callers in inference mode are fine too
                    torch.testing.assert_close(graphed.render(h, feats, a), want)
        assert graphed._graphed is not None and len(graphed._graphed.graphs) == 2

    e2 = TorchStage2(copy.deepcopy(nets), "cuda")
    g2 = TorchStage2(copy.deepcopy(nets), "cuda", cuda_graphs=True)
    audio = _speech(2.0)
    a = _frames(Engine(eager, e2, cfg, {}), audio)
    b = _frames(Engine(graphed, g2, cfg, {}), audio)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    assert g2._graphed is not None and len(g2._graphed.graphs) >= 1


@pytest.mark.gpu
@needs_cuda
def test_stage1_training_on_cuda_with_loader_workers(tmp_path: Path) -> None:
    from training.common import DistInfo, init_distributed
    from training.stage1 import Stage1Options, Stage1Trainer

    cfg = load_config(
        "tiny",
        [
            *SMALL_STAGE1,
            *SMALL_WORLD,
            "train.stage1.disc_channels=[8, 16, 16, 16, 16]",
            "train.stage1.batch_size=4",
            "train.stage1.adv_start_step=0",
            "train.stage1.d_reg_every=2",
            "train.stage1.bf16=true",
        ],
    )
    info = init_distributed("cuda")
    assert isinstance(info, DistInfo) and info.device.type == "cuda"
    opts = Stage1Options(run_dir=tmp_path, steps=4, device="cuda", workers=2)
    tr = Stage1Trainer(cfg, opts, info)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.fit()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 4 and np.isfinite(rec["loss"]) and "d_loss" in rec
    moved = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved
    assert (tmp_path / "stage1.safetensors").exists()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the world's speech needs espeak-ng")
def test_stage2_training_on_cuda(tmp_path: Path) -> None:
    from engine.models.stage1 import Stage1Model
    from engine.weights import save_weights
    from tests.test_stage2_training import SMALL
    from training.common import init_distributed
    from training.stage2 import Stage2Options, Stage2Trainer

    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    m = Stage1Model(cfg.stage1)
    m.lmd.freeze()
    s1 = tmp_path / "stage1.safetensors"
    save_weights(s1, m.state_dict(), cfg, kind="stage1", meta={"aux_motion_direct": True})
    opts = Stage2Options(
        run_dir=tmp_path / "run",
        steps=3,
        stage1=str(s1),
        extract_clips=2,
        clip_seconds=2.0,
        device="cuda",
    )
    tr = Stage2Trainer(cfg, opts, init_distributed("cuda"))
    tr.fit()
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 3 and np.isfinite(rec["diffusion"])
