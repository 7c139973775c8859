"""Video-driven mode (ARCHITECTURE.md §5): motion read off each driving frame by the encoder,
rendered onto the portrait with the portrait's h and feature pyramid (computed once)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.tensors import to_tensor, to_uint8


@torch.no_grad()
def reenact_frames(
    model: Stage1Model, source: torch.Tensor, driving: torch.Tensor, batch: int = 8
) -> torch.Tensor:
    """source (1,3,S,S), driving (T,3,S,S) in [-1,1] -> (T,3,S,S): driving motion on source."""
    h, feats = model.encode(source)
    out = []
    for i in range(0, driving.shape[0], batch):
        alpha = model.motion(model.encode(driving[i : i + batch])[0])
        out.append(model.render(h, feats, alpha).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def reenact_stream(
    model: Stage1Model, portrait: np.ndarray, driving: Iterable[np.ndarray], batch: int = 8
) -> Iterator[np.ndarray]:
    """Portrait (S,S,3) uint8 and driving frames (S,S,3) uint8 -> output frames, streamed in
    batches so any length runs in bounded memory."""
    h, feats = model.encode(to_tensor(portrait[None]))
    buf: list[np.ndarray] = []

    def flush() -> Iterator[np.ndarray]:
        alpha = model.motion(model.encode(to_tensor(np.stack(buf)))[0])
        yield from to_uint8(model.render(h, feats, alpha))
        buf.clear()

    for frame in driving:
        buf.append(frame)
        if len(buf) == batch:
            yield from flush()
    if buf:
        yield from flush()


def reenact_file(
    model: Stage1Model,
    image: str | Path,
    driving: str | Path,
    out: str | Path,
    max_frames: int | None = None,
) -> int:
    """Write ``out`` (mp4, the driving video's frame rate, its audio kept). Returns frames."""
    from tqdm import tqdm

    from engine.media import (
        VideoWriter,
        iter_video,
        load_portrait,
        read_audio_track,
        video_fps,
    )

    size = model.cfg.image_size
    portrait = load_portrait(image, size)
    fps = video_fps(driving)
    audio = read_audio_track(driving)
    frames = iter_video(driving, size)
    if max_frames:
        frames = (f for i, f in zip(range(max_frames), frames))
    n = 0
    with VideoWriter(out, fps=round(fps), sample_rate=16000 if audio is not None else None) as w:
        for img in tqdm(reenact_stream(model, portrait, frames), desc="reenact", unit="frame"):
            w.write_frame(img)
            n += 1
        if n == 0:
            raise UserError(f"{driving}: no frames could be decoded (empty video?)")
        if audio is not None:
            w.write_audio(audio[: int(round(n / fps * 16000))])
    return n
