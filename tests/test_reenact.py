"""``livehead reenact``: video-driven animation end to end, and its bad-input errors."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import load_config
from engine.media import VideoWriter
from engine.models.stage1 import Stage1Model
from engine.weights import save_weights
from livehead.cli import main
from tests.small import SMALL_STAGE1
from training.world import get_identity, heldout_ids, random_motion, render_frames

SMALL = SMALL_STAGE1


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reenact")
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    m = Stage1Model(cfg.stage1)
    m.lmd.freeze()
    save_weights(d / "s1.safetensors", m.state_dict(), cfg, kind="stage1")
    other = load_config("tiny", [*SMALL, "stage1.latent_dim=48", "stage1.head_hidden=48"])
    save_weights(d / "other.safetensors", Stage1Model(other.stage1).state_dict(), cfg, "stage1")
    ids = heldout_ids(cfg.world)
    rng = np.random.default_rng(0)
    portrait = render_frames(get_identity(cfg.world, int(ids[0])), random_motion(rng, 1), 96)[0]
    Image.fromarray(portrait).save(d / "portrait.png")
    frames = render_frames(get_identity(cfg.world, int(ids[1])), random_motion(rng, 10), 64)
    with VideoWriter(d / "driving.mp4", fps=25, sample_rate=16000) as w:
        for f in frames:
            w.write_frame(f)
        w.write_audio(0.1 * np.sin(np.arange(6400) / 10).astype(np.float32))
    (d / "not_image.png").write_text("hello")
    (d / "empty.mp4").write_bytes(b"")
    return {
        k: d / v
        for k, v in [
            ("s1", "s1.safetensors"),
            ("other", "other.safetensors"),
            ("portrait", "portrait.png"),
            ("driving", "driving.mp4"),
            ("not_image", "not_image.png"),
            ("empty", "empty.mp4"),
        ]
    }


def _run(files: dict[str, Path], out: Path, **over: str) -> int:
    args = {
        "--image": files["portrait"],
        "--driving": files["driving"],
        "--out": out,
        "--checkpoint": files["s1"],
    }
    args.update(over)
    return main(["reenact", *[str(x) for kv in args.items() for x in kv]])


def test_reenact_writes_video_with_audio(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    assert _run(files, out) == 0
    with av.open(str(out)) as c:
        n = sum(1 for _ in c.decode(video=0))
        assert c.streams.video[0].width == 64
        assert c.streams.audio, "the driving video's audio must be kept"
    assert n == 10


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("--image", "not_image", "not an image"),
        ("--driving", "empty", "empty"),
        ("--checkpoint", "other", "do not fit"),
    ],
)
def test_bad_input_is_one_clear_line(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    value: str,
    message: str,
) -> None:
    out = tmp_path / "bad.mp4"
    assert _run(files, out, **{key: files[value]}) == 2
    err = capsys.readouterr().err
    assert "livehead: error:" in err and "Traceback" not in err
    assert message in err or message in err.lower(), err
    assert not out.exists(), "no half-written output"
