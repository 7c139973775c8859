"""Conformer, speech encoder, variance adapter and denoiser."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConformerConfig, Stage2Config, load_config
from engine.models.conformer import Conformer, RelPositionBias
from engine.models.stage2 import (
    CONTROL_DIM,
    Denoiser,
    SpeechEncoder,
    Stage2Nets,
    VarianceAdapter,
    count_parameters,
)

SMALL = ConformerConfig(d_model=32, heads=2, ffn_dim=32, blocks=2, conv_kernel=5, dropout=0.2)


def test_paper_parameter_counts():
    cfg = Stage2Config()  # the paper's sizes are the defaults
    hubert_large = Stage2Nets(cfg, feat_dim=1024, frames_per_video_frame=2)
    speech = count_parameters(hubert_large.speech_encoder)
    adapter = count_parameters(hubert_large.adapter)
    denoiser = count_parameters(hubert_large.denoiser)
    # Paper: speech encoder ~12.7 M (HuBERT-large input), denoiser ~25 M, stage 2 ~40 M.
    assert speech == 12_660_232
    assert denoiser == 24_453_016
    assert adapter == 2_179_717
    assert 39e6 < speech + adapter + denoiser < 41e6
    logmel = Stage2Nets(cfg, feat_dim=80, frames_per_video_frame=4)
    assert count_parameters(logmel.speech_encoder) == 11_775_496  # smaller input projection


def test_tiny_config_builds():
    cfg = load_config("tiny")
    nets = Stage2Nets.from_config(cfg)
    assert count_parameters(nets) < 5e6
    assert nets.denoiser.ref_h_proj.in_features == cfg.stage1.latent_dim
    assert nets.speech_encoder.in_proj.in_features == 4 * 80


def test_rel_pos_bias_depends_only_on_distance():
    rel = RelPositionBias(heads=2, max_distance=4)
    b37 = rel(37, torch.device("cpu"))
    b10 = rel(10, torch.device("cpu"))
    assert b37.shape == (1, 2, 37, 37)
    assert torch.equal(b37[:, :, :10, :10], b10)
    assert torch.equal(b37[:, :, 5:15, 5:15], b10)  # shift-consistent
    assert torch.equal(b37[0, 0, 0, 30], b37[0, 0, 0, 4])  # clipped beyond max_distance


@pytest.mark.parametrize("length", [1, 10, 37])
def test_conformer_dynamic_length(length):
    torch.manual_seed(0)
    net = Conformer(SMALL).eval()
    x = torch.randn(2, length, 32)
    y = net(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # batch independence (LayerNorm, not BatchNorm): item 1 alone == item 1 in the batch
    torch.testing.assert_close(net(x[1:]), y[1:], rtol=1e-5, atol=1e-5)


def test_training_mode_uses_dropout_eval_is_deterministic():
    torch.manual_seed(0)
    net = Conformer(SMALL)
    x = torch.randn(1, 12, 32)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


def test_speech_encoder_downsamples_to_video_rate():
    enc = SpeechEncoder(80, 4, SMALL).eval()
    y = enc(torch.randn(2, 4 * 9, 80))
    assert y.shape == (2, 9, 32)
    # video frame n's input projection reads exactly feature frames 4n .. 4n + 3
    x = torch.randn(1, 36, 80)
    x2 = x.clone()
    x2[:, 32:] = 0
    p1, p2 = enc.in_proj(x.reshape(1, 9, 320)), enc.in_proj(x2.reshape(1, 9, 320))
    assert torch.equal(p1[:, :8], p2[:, :8]) and not torch.equal(p1[:, 8], p2[:, 8])


def test_variance_adapter_uses_given_values():
    torch.manual_seed(0)
    ad = VarianceAdapter(d_model=32, hidden=16, layers=2).eval()
    x = torch.randn(1, 15, 32)
    zeros_v, zeros_m = torch.zeros(1, 15, CONTROL_DIM), torch.zeros(1, 15, 3)
    out_pred, pred = ad(x, zeros_v, zeros_m)
    assert out_pred.shape == (1, 15, 32) and pred.shape == (1, 15, 5)
    # giving exactly the predicted values reproduces the free-running output ...
    out_same, _ = ad(x, pred, torch.ones(1, 15, 3))
    torch.testing.assert_close(out_same, out_pred)
    # ... a different pose changes it, and only the pose mask matters for pose values
    pose = pred.clone()
    pose[..., 2:5] = 0.5
    mask = torch.tensor([0.0, 0.0, 1.0]).expand(1, 15, 3)
    out_pose, pred2 = ad(x, pose, mask)
    assert not torch.allclose(out_pose, out_pred)
    torch.testing.assert_close(pred2[..., :2], pred[..., :2])  # location/scale predictors
    out_unmasked, _ = ad(x, pose, zeros_m)
    torch.testing.assert_close(out_unmasked, out_pred)


def _denoiser_inputs(n: int = 11, b: int = 2):
    torch.manual_seed(1)
    known = torch.randn(b, n, 20)
    mask = torch.zeros(b, n, 1)
    mask[:, :4] = 1
    return (
        torch.randn(b, n, 20),
        torch.tensor([999, 3]),
        torch.randn(b, n, 24),
        torch.randn(b, 20),
        torch.randn(b, 64),
        known,
        mask,
    )


def test_denoiser_shapes_and_conditioning():
    torch.manual_seed(0)
    den = Denoiser(20, speech_dim=24, latent_dim=64, cond_dim=8, cfg=SMALL).eval()
    args = _denoiser_inputs()
    eps = den(*args)
    assert eps.shape == (2, 11, 20)
    x_t, t, speech, ref_a, ref_h, known, mask = args
    # every input reaches the output
    for i, alt in [
        (1, torch.tensor([500, 3])),
        (2, speech + 1),
        (3, ref_a + 1),
        (4, ref_h + 1),
        (5, known + 1),
    ]:
        changed = list(args)
        changed[i] = alt
        assert not torch.allclose(den(*changed), eps), f"input {i} ignored"
    # known values on unknown frames are masked out
    known2 = known.clone()
    known2[:, 4:] = 7.0
    torch.testing.assert_close(den(x_t, t, speech, ref_a, ref_h, known2, mask), eps)
    # dynamic length
    assert den(*_denoiser_inputs(n=37)).shape == (2, 37, 20)


def test_forward_is_pure():
    cfg = load_config("tiny").stage2
    nets = Stage2Nets(cfg, 80, 4).eval()
    before = {k: v.clone() for k, v in nets.state_dict().items()}
    feats = torch.randn(1, 4 * 12, 80)
    s1, p1 = nets.encode(feats, torch.zeros(1, 12, 5), torch.zeros(1, 12, 3))
    s2, p2 = nets.encode(feats, torch.zeros(1, 12, 5), torch.zeros(1, 12, 3))
    assert torch.equal(s1, s2) and torch.equal(p1, p2)
    after = nets.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_conformer_exports_to_onnx_with_dynamic_length(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = Conformer(SMALL).eval()
    path = tmp_path / "conformer.onnx"
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    torch.onnx.export(
        net,
        (torch.randn(2, 12, 32),),  # example sizes >= 2, or the exporter fixes them
        str(path),
        dynamo=True,
        opset_version=18,
        external_data=False,
        input_names=["x"],
        dynamic_shapes=({0: batch, 1: length},),
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t in (10, 37):
        x = torch.randn(1, t, 32)
        (got,) = sess.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), net(x), rtol=1e-4, atol=1e-4)
