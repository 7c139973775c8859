"""Audio loading, resampling and the incremental log-mel front end."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from engine.audio import (
    HubertFrontend,
    LogMelFrontend,
    LogMelStream,
    load_audio,
    log_mel,
    make_frontend,
    silence_feature_row,
    to_mono_16k,
)
from engine.config import AudioConfig
from engine.errors import UserError


def _speechy(n: int, seed: int = 0) -> np.ndarray:
    """Noise plus a few sweeping tones: non-stationary, like speech, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.05 * rng.standard_normal(n)
    for f0 in (180.0, 900.0, 2500.0):
        x += 0.2 * np.sin(2 * np.pi * f0 * t * (1 + 0.3 * np.sin(2 * np.pi * 1.3 * t)))
    return (x * np.hanning(n) ** 0.1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Log-mel: framing and streaming == offline
# --------------------------------------------------------------------------------------------
def test_log_mel_framing():
    x = _speechy(16000)
    f = log_mel(x)
    assert f.shape == (100, 80) and f.dtype == np.float32
    assert log_mel(x[:639]).shape == (3, 80)  # N // 160
    assert log_mel(x[:0]).shape == (0, 80)
    # Causal: frame j ends at sample (j + 1) * 160; later samples cannot change it.
    y = x.copy()
    y[1600:] = 0.0
    assert np.array_equal(log_mel(y)[:10], f[:10])
    assert not np.array_equal(log_mel(y)[10], f[10])
    # Silence is one constant row, the padding row windows use before the stream starts.
    sil = log_mel(np.zeros(1280, np.float32))
    assert np.all(sil == sil[0, 0])
    assert torch.equal(silence_feature_row(LogMelFrontend()), torch.from_numpy(sil[0]))


def test_log_mel_tone_lands_in_the_right_band():
    t = np.arange(16000) / 16000
    f = log_mel((0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    low = log_mel((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    assert f[50].argmax() > low[50].argmax() + 5
    assert np.isfinite(f).all() and f.min() > -4 and f.max() < 6


@pytest.mark.parametrize("chunk", [160, 320, 5328, 1, 401, "random"])
def test_log_mel_stream_equals_offline(chunk):
    x = _speechy(16000 * 2 + 77, seed=1)
    offline = log_mel(x)
    stream = LogMelStream()
    rng = np.random.default_rng(3)
    outs, pos = [], 0
    while pos < x.size:
        n = int(rng.integers(0, 3000)) if chunk == "random" else int(chunk)
        outs.append(stream.push(x[pos : pos + n]))
        pos += n
    got = np.concatenate(outs)
    assert got.shape == offline.shape
    assert np.array_equal(got, offline)  # bit for bit
    assert stream.frames_emitted == offline.shape[0] and stream.samples_seen == x.size
    stream.reset()
    assert np.array_equal(stream.push(x[:1600]), offline[:10])


def test_frontend_protocol_and_alignment():
    fe = make_frontend(AudioConfig())
    assert isinstance(fe, LogMelFrontend)
    assert fe.frames_per_video_frame == 4 and fe.dim == 80 and fe.incremental
    feats = fe.features(_speechy(640 * 5))
    assert feats.shape == (20, 80) and feats.dtype == torch.float32  # 4 per video frame
    with pytest.raises(UserError, match="hop_samples"):
        LogMelFrontend(AudioConfig(hop_samples=150))
    with pytest.raises(UserError, match="frontend"):
        make_frontend(AudioConfig(frontend="mfcc"))


# --------------------------------------------------------------------------------------------
# Resampling and loading
# --------------------------------------------------------------------------------------------
def test_to_mono_16k_rates_channels_and_types():
    t48 = np.arange(48000) / 48000
    tone48 = np.sin(2 * np.pi * 440 * t48).astype(np.float32)
    y = to_mono_16k(tone48, 48000)
    assert y.shape == (16000,) and y.dtype == np.float32
    ref = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(y[200:-200] - ref[200:-200]).max() < 1e-2
    t8 = np.arange(8000) / 8000
    y8 = to_mono_16k(np.sin(2 * np.pi * 440 * t8), 8000)
    assert y8.shape == (16000,) and np.abs(y8[200:-200] - ref[200:-200]).max() < 2e-2
    stereo = np.stack([tone48, -tone48 * 0.5], axis=1)  # (N, 2) -> mean of the channels
    assert np.allclose(to_mono_16k(stereo, 48000), to_mono_16k(tone48 * 0.25, 48000), atol=1e-6)
    pcm = np.array([0, 16384, -32768]).astype(np.int16)
    assert np.allclose(to_mono_16k(pcm, 16000), [0.0, 0.5, -1.0])
    assert to_mono_16k(np.zeros(0, np.float32), 44100).shape == (0,)


@pytest.mark.parametrize(
    "bad, rate, match",
    [
        (np.array([0.0, np.nan], np.float32), 16000, "NaN"),
        (np.array([0.0, np.inf]), 16000, "NaN"),
        (np.zeros((2, 2, 2), np.float32), 16000, "shape"),
        (np.array(["a"]), 16000, "type"),
        (np.zeros(10, np.float32), 0, "sample rate"),
    ],
)
def test_to_mono_16k_rejects_bad_input(bad, rate, match):
    with pytest.raises(UserError, match=match):
        to_mono_16k(bad, rate)


def test_load_audio_wav_flac_stereo(tmp_path):
    t = np.arange(44100) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 300 * t)
    sf.write(tmp_path / "a.wav", np.stack([tone, tone], 1), 44100, subtype="PCM_16")
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == (16000,)
    assert abs(np.abs(y).max() - 0.5) < 0.02
    sf.write(tmp_path / "b.flac", tone[:8000], 8000)
    assert load_audio(tmp_path / "b.flac").shape == (16000,)


def test_load_audio_compressed_via_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "c.m4a"
    try:
        with av.open(str(path), "w") as out:
            stream = out.add_stream("aac", rate=22050)
            stream.layout = "mono"
            t = np.arange(22050) / 22050
            pcm = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="mono")
            frame.sample_rate = 22050
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    except Exception as e:  # noqa: BLE001 - no AAC encoder in this ffmpeg build
        pytest.skip(f"cannot encode AAC here: {e}")
    y = load_audio(path)
    assert y.dtype == np.float32 and abs(y.shape[0] - 16000) < 2000
    assert 0.3 < np.abs(y[4000:12000]).max() < 0.7


def test_load_audio_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match="could not decode"):
        load_audio(junk)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(UserError, match="no samples"):
        load_audio(empty)
    with pytest.raises(UserError):
        load_audio(tmp_path)


# --------------------------------------------------------------------------------------------
# HuBERT plug-in (optional: needs transformers, uses a tiny random model)
# --------------------------------------------------------------------------------------------
def test_hubert_frontend_tiny_random(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16, 16, 16, 16, 16),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    transformers.HubertModel(cfg).save_pretrained(tmp_path)
    fe = make_frontend(AudioConfig(frontend="hubert", hubert_path=str(tmp_path)))
    assert isinstance(fe, HubertFrontend)
    assert fe.frames_per_video_frame == 2 and fe.dim == 32 and not fe.incremental
    feats = fe.features(_speechy(640 * 7))
    assert feats.shape == (14, 32) and torch.isfinite(feats).all()
    # softmax mixing weights start at 0 (a plain average) and are the only trainable params
    trainable = [n for n, p in fe.named_parameters() if p.requires_grad]
    assert trainable == ["layer_logits"] and fe.layer_logits.shape == (3,)
    assert torch.count_nonzero(fe.layer_logits) == 0
    out = fe(torch.from_numpy(_speechy(640 * 3))[None])
    out.sum().backward()
    assert fe.layer_logits.grad is not None
    with pytest.raises(UserError, match="hubert_path"):
        HubertFrontend(tmp_path / "nope")
