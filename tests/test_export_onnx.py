"""ONNX export and the ONNX Runtime backend: parity with PyTorch per graph, the same stream as
offline rendering through ONNX Runtime, stale or missing exports refused. Small random
networks at 64² (export takes a few seconds per graph)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from engine.backends_ort import model_fingerprint  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.models.stage2 import Stage2Nets  # noqa: E402
from engine.render import render_frames  # noqa: E402
from engine.stream import Engine, plan_dict  # noqa: E402
from export.onnx import export_onnx  # noqa: E402
from tests.small import SMALL_STAGE1, SMALL_STAGE2, small_models  # noqa: E402
from tests.test_stream import speechy, stream  # noqa: E402

SMALL = [*SMALL_STAGE1, *SMALL_STAGE2, "stage2.sample_steps=3"]
AUDIO = speechy(16000 + 1000, seed=4)


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return small_models()


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    m1, nets, cfg = models
    out = tmp_path_factory.mktemp("onnx") / "export"
    manifest = export_onnx(m1, nets, plan_dict(cfg), out)
    return out, manifest


def test_export_writes_graphs_and_a_manifest_with_parity(exported, models) -> None:
    out, manifest = exported
    m1, nets, cfg = models
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{g}.onnx" for g in manifest["graphs"]] + ["manifest.json"]), names
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["model_fingerprint"] == model_fingerprint(m1, nets, plan_dict(cfg))
    parity = manifest["parity"]["max_abs"]
    assert set(parity) == set(manifest["graphs"])
    assert all(0 <= v < 1e-4 for v in parity.values()), parity
    # the renderer's lerps are written as arithmetic while exporting (engine.models.layers.lerp):
    # the exporter's own lerp adds a Where and a second branch per element (10 % of the tiny
    # render graph's time on 2 cores)
    import onnx

    render = onnx.load(str(out / "stage1_render.onnx"), load_external_data=False)
    assert not [n.name for n in render.graph.node if n.op_type == "Where"]


def _engines(models, onnx_dir: Path) -> tuple[Engine, Engine]:
    m1, nets, cfg = models
    torch_engine = Engine.from_models(m1, nets, cfg, backend="torch")
    cfg_onnx = load_config("tiny", [*SMALL, f"stream.onnx_dir={onnx_dir}"])
    onnx_engine = Engine.from_models(m1, nets, cfg_onnx, backend="onnx", threads=1)
    return torch_engine, onnx_engine


def test_onnx_backend_streams_like_offline_and_like_torch(exported, models) -> None:
    out, _ = exported
    torch_engine, onnx_engine = _engines(models, out)
    assert onnx_engine.info["backend"] == "onnx" and onnx_engine.info["onnx_dir"] == str(out)
    rng = np.random.default_rng(1)
    portrait = rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)
    av_onnx = onnx_engine.prepare_avatar(portrait)
    av_torch = torch_engine.prepare_avatar(portrait)
    assert torch.allclose(av_onnx.h.cpu(), av_torch.h.cpu(), atol=1e-4)
    n = AUDIO.shape[0]
    offline = list(render_frames(onnx_engine, av_onnx, AUDIO, seed=3))
    for step in (160, 5328):
        chunks = [step] * (-(-n // step))
        streamed = stream(onnx_engine.session(av_onnx, seed=3), AUDIO, chunks)
        # The same backend, the same shapes: the stream equals offline rendering exactly.
        assert np.array_equal(
            np.stack([f.meta["alpha"] for f in streamed]),
            np.stack([f.meta["alpha"] for f in offline]),
        )
        assert np.array_equal(
            np.stack([f.image for f in streamed]), np.stack([f.image for f in offline])
        )
    # Against PyTorch: the same motion within export tolerance (8-bit images within 2 levels).
    ref = list(render_frames(torch_engine, av_torch, AUDIO, seed=3))
    a_onnx = np.stack([f.meta["alpha"] for f in offline])
    a_torch = np.stack([f.meta["alpha"] for f in ref])
    assert a_onnx.shape == a_torch.shape and np.std(a_torch, axis=0).max() > 0
    assert np.abs(a_onnx - a_torch).max() < 1e-3, np.abs(a_onnx - a_torch).max()
    diff = np.abs(
        np.stack([f.image for f in offline]).astype(int) - np.stack([f.image for f in ref])
    )
    assert diff.max() <= 2, diff.max()


def test_stale_or_missing_exports_are_refused(exported, models, tmp_path: Path) -> None:
    out, _ = exported
    m1, nets, cfg = models
    with pytest.raises(UserError, match="no ONNX export"):
        _engines(models, tmp_path / "nothing")
    # Other weights: one number changed.
    nets2 = Stage2Nets.from_config(cfg).eval()
    nets2.load_state_dict(nets.state_dict())
    with torch.no_grad():
        nets2.denoiser.out.bias.add_(0.01)
    cfg_onnx = load_config("tiny", [*SMALL, f"stream.onnx_dir={out}"])
    with pytest.raises(UserError, match="other weights"):
        Engine.from_models(m1, nets2, cfg_onnx, backend="onnx")
    # Another window plan (the stage-2 graphs have its shapes).
    cfg_plan = load_config("tiny", [*SMALL, f"stream.onnx_dir={out}", "stage2.window_frames=4"])
    with pytest.raises(UserError, match="other weights or plan"):
        Engine.from_models(m1, nets, cfg_plan, backend="onnx")
    with pytest.raises(UserError, match="unknown backend"):
        Engine.from_models(m1, nets, cfg, backend="tensorflow")


def test_onnx_render_splits_a_batch_over_two_sessions(exported, models) -> None:
    """With two threads or more a batch renders as two halves side by side (engine/backends_ort
    OrtStage1): the frames must be those of one run over the whole batch, in order."""
    from engine.backends_ort import OrtStage1

    out, _ = exported
    m1, _, _ = models
    one, two = OrtStage1(out, m1, threads=1), OrtStage1(out, m1, threads=2)
    assert len(one._render) == 1 and len(two._render) == 3  # whole + two halves
    rng = np.random.default_rng(5)
    img = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    h, feats = one.encode(img)
    for b in (1, 2, 3, 5):
        alpha = torch.from_numpy(rng.normal(0, 0.5, (b, m1.cfg.motion_dim)).astype(np.float32))
        whole, split = one.render(h, feats, alpha), two.render(h, feats, alpha)
        assert split.shape == whole.shape == (b, 3, 64, 64)
        assert torch.allclose(split, whole, atol=1e-5), (split - whole).abs().max()
        # each frame is its own: reversed alphas give the frames reversed
        flipped = two.render(h, feats, alpha.flip(0))
        assert torch.allclose(flipped.flip(0), whole, atol=1e-5)


def test_export_writes_the_draft_exit_of_a_model_that_has_one(exported, models, tmp_path) -> None:
    """A model with a trained stage1.fast_head gets a sixth graph, checked for parity like the
    others; the ONNX backend's render_fast (whole and in halves) gives the PyTorch draft."""
    from engine.backends_ort import FAST_GRAPH, OrtStage1

    torch.set_num_threads(1)
    m1, nets, cfg = small_models(["stage1.fast_head=true"])
    assert m1.fast_head is not None
    with torch.no_grad():
        torch.manual_seed(5)
        for p in m1.fast_head.parameters():
            p.normal_(0.0, 0.1)
        m1.fast_head.ready.fill_(1.0)
    manifest = export_onnx(m1, nets, plan_dict(cfg), tmp_path / "x")
    assert FAST_GRAPH in manifest["graphs"] and (tmp_path / "x" / f"{FAST_GRAPH}.onnx").is_file()
    assert manifest["parity"]["max_abs"][FAST_GRAPH] < 1e-4
    rng = np.random.default_rng(6)
    src = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    alpha = torch.from_numpy(rng.normal(0, 0.5, (3, m1.cfg.motion_dim)).astype(np.float32))
    with torch.no_grad():
        h, feats = m1.encode(src)
        ref = m1.render_fast(h, feats, alpha, src)
    for threads in (1, 2):
        ort1 = OrtStage1(tmp_path / "x", m1, threads=threads)
        assert ort1.fast
        got = ort1.render_fast(h, feats, alpha, src)
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    # a model without one: five graphs, no draft exit
    out, manifest = exported
    assert FAST_GRAPH not in manifest["graphs"]
    assert not OrtStage1(out, models[0], threads=1).fast
