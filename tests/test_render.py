"""Offline rendering (``livehead render``) and the stream benchmark, end to end with tiny random
weights written to a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from engine.config import load_config
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.models.stage2 import Stage2Nets
from engine.render import PoseTrack, read_pose_file, render_frames
from engine.session_api import Controls
from engine.stream import Engine
from engine.weights import save_weights
from livehead.cli import main
from tests.test_stream import SMALL, speechy


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("weights")
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    m1 = Stage1Model(cfg.stage1).eval()
    m1.lmd.freeze()
    nets = Stage2Nets.from_config(cfg)
    nets.normalizer.half_range.fill_(3.0)
    save_weights(d / "s1.safetensors", m1.state_dict(), cfg, "stage1")
    save_weights(d / "s2.safetensors", nets.state_dict(), cfg, "stage2")
    return d / "s1.safetensors", d / "s2.safetensors"


@pytest.fixture(scope="module")
def portrait(tmp_path_factory) -> Path:
    from PIL import Image

    p = tmp_path_factory.mktemp("img") / "face.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)).save(p)
    return p


def probe(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(video frames, audio seconds, (width, height)) of an mp4."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        size = (v.codec_context.width, v.codec_context.height)
        n_video = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        n_audio = sum(f.samples for f in c.decode(audio=0))
        rate = c.streams.audio[0].rate
    return n_video, n_audio / rate, size


def render_cli(weights, portrait, audio, out, *extra: str) -> int:
    s1, s2 = weights
    args = ["render", "--image", str(portrait), "--audio", str(audio), "--out", str(out)]
    return main(args + ["--stage1", str(s1), "--checkpoint", str(s2), "--quiet", *extra])


def test_render_cli_48k_stereo_wav(tmp_path, weights, portrait, capsys):
    n48 = int(48000 * 1.3)
    mono = np.repeat(speechy(-(-n48 // 3)), 3)[:n48]
    wav = tmp_path / "speech.wav"
    sf.write(wav, np.stack([mono, 0.5 * mono], axis=1), 48000)
    out = tmp_path / "out.mp4"
    assert render_cli(weights, portrait, wav, out, "--seed", "3", "--steps", "2") == 0
    n_video, audio_s, size = probe(out)
    assert n_video == -(-int(1.3 * 16000) // 640) == 33
    assert abs(audio_s - 1.3) < 0.05  # AAC pads a little at the edges
    assert size == (64, 64)
    assert "wrote" in capsys.readouterr().out
    assert not (tmp_path / "out.partial.mp4").exists()


def test_render_cli_short_silent_audio_and_controls(tmp_path, weights, portrait):
    wav = tmp_path / "short.flac"
    sf.write(wav, np.zeros(1000, np.float32), 8000)  # 0.125 s at 8 kHz: shorter than a window
    out = tmp_path / "short.mp4"
    extra = ["--pose-yaw", "20", "--location", "0.1", "--scale", "1.1"]
    assert render_cli(weights, portrait, wav, out, *extra) == 0
    assert probe(out)[0] == 4


def test_render_cli_pose_file(tmp_path, weights, portrait):
    wav = tmp_path / "a.wav"
    sf.write(wav, speechy(16000), 16000)
    pose = tmp_path / "pose.txt"
    pose.write_text("\n".join(f"{k}, 0, {k / 2}" for k in range(10)))
    assert render_cli(weights, portrait, wav, tmp_path / "p.mp4", "--pose-file", str(pose)) == 0
    assert probe(tmp_path / "p.mp4")[0] == 25
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((10, 2)))
    assert render_cli(weights, portrait, wav, tmp_path / "b.mp4", "--pose-file", str(bad)) == 2
    assert not (tmp_path / "b.mp4").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (np.zeros((5, 2)), "shape"),
        (np.zeros(3), "shape"),
        (np.full((4, 3), np.nan), "finite"),
        (np.full((4, 3), 120.0), "90"),
    ],
)
def test_pose_file_errors(tmp_path, content, match):
    p = tmp_path / "pose.npy"
    np.save(p, content)
    with pytest.raises(UserError, match=match):
        read_pose_file(p)
    t = tmp_path / "pose.txt"
    t.write_text("1 2 x\n")
    with pytest.raises(UserError):
        read_pose_file(t)


def test_pose_track_drives_the_motion(weights):
    engine = Engine.load(*weights)
    avatar = engine.prepare_avatar(np.full((64, 64, 3), 90, np.uint8))
    x = speechy(12000)
    pose = np.linspace(-30, 30, 30)[:, None].repeat(3, axis=1).astype(np.float32)
    a = [f.meta["alpha"] for f in render_frames(engine, avatar, x, controls=PoseTrack(pose))]
    b = [f.meta["alpha"] for f in render_frames(engine, avatar, x)]
    assert len(a) == len(b) and not np.array_equal(np.stack(a), np.stack(b))
    # A track equal to fixed controls gives what fixed controls give.
    fixed = Controls(pose_deg=(10.0, 10.0, 10.0))
    c = [f.image for f in render_frames(engine, avatar, x, controls=fixed)]
    d = [
        f.image for f in render_frames(engine, avatar, x, controls=PoseTrack(np.full((1, 3), 10.0)))
    ]
    assert all(np.array_equal(p, q) for p, q in zip(c, d))


def test_render_cli_bad_inputs(tmp_path, weights, portrait, capsys):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage")
    assert render_cli(weights, portrait, corrupt, tmp_path / "c.mp4") == 2
    assert "audio" in capsys.readouterr().err
    wav = tmp_path / "ok.wav"
    sf.write(wav, speechy(4000), 16000)
    assert render_cli(weights, portrait, tmp_path / "missing.wav", tmp_path / "m.mp4") == 2
    assert render_cli(weights, portrait, wav, tmp_path / "x.mp4", "--pose-yaw", "100") == 2
    assert render_cli(weights, portrait, wav, tmp_path / "y.mp4", "--steps", "0") == 2
    assert render_cli(weights, portrait, wav, tmp_path / "n.mp4", "--noise-scale", "-1") == 2
    assert render_cli(weights, portrait, wav, tmp_path / "g.mp4", "--control-guidance", "9") == 2
    assert (
        render_cli(weights, portrait, wav, tmp_path / "z.mp4", "--set", "stage1.latent_dim=8") == 2
    )
    err = capsys.readouterr().err
    assert "90" in err and "fixed by the weights" in err and "noise_scale must be" in err
    assert "control_guidance must be in [0, 4]" in err


def test_bench_stream_json(tmp_path, weights, capsys):
    s1, s2 = weights
    png = tmp_path / "lat.png"
    args = ["bench", "stream", "--stage1", str(s1), "--checkpoint", str(s2), "--duration", "1.5"]
    assert main(args + ["--chunk-ms", "30", "--json", "--plot", str(png)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["weights"] == "trained" and res["frames"] == 38
    assert res["av_offset_ms"] == 0 and res["audio_exact"] == 1.0 and res["pts_contiguous"]
    assert res["dropped_frames"] == 0 and abs(res["drift_frames"]) < 1
    for key in ("fps", "rtf", "first_frame_ms", "rss_mb", "machine", "config"):
        assert res[key] is not None
    assert set(res["latency_ms"]) == {"p50", "p95", "p99"}
    assert set(res["stage_ms_per_window"]) == {"features", "encoder", "denoiser", "render", "total"}
    assert png.stat().st_size > 1000


def test_bench_stream_with_a_commanded_pose(weights, capsys):
    """--pose runs the controlled path (guided, a second denoiser pass); a bad --pose is a
    clear error."""
    s1, s2 = weights
    args = ["bench", "stream", "--stage1", str(s1), "--checkpoint", str(s2), "--duration", "0.5"]
    guided = ["--set", "stage2.control_guidance=1.0", "--json"]
    assert main(args + ["--pose", "15,0,-5", *guided]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pose_deg"] == [15.0, 0.0, -5.0] and res["frames"] == 13
    assert res["config"]["stage2"]["control_guidance"] == 1.0
    assert main(args + ["--pose", "15,0", "--json"]) == 2
    assert "--pose wants YAW,PITCH,ROLL" in capsys.readouterr().err
