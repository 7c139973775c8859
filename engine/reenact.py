"""Video-driven mode (ARCHITECTURE.md §5): motion read off each driving frame by the encoder,
rendered onto the portrait with the portrait's h and feature pyramid (computed once).

Absolute (LIA, AniTalker, every model without a head reader): each frame renders with the
alpha the encoder reads off it. Anchored (models with a trained ``stage1.head_reader``): each
frame renders with

    alpha_t - alpha_anchor + alpha_portrait,  plus  read(anchor) - read(portrait) in alpha[0:6]

where the anchor is the driving video's first frame. The encoder's moves within one face are
precise, its reading of each face's absolute place and pose is not (a bias of its own per face);
the head reader supplies the one offset between the two faces. When the anchor *is* the
portrait (self-reenactment from a clip's first frame) the offset is exactly zero and this is
the absolute mode."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError
from engine.models.stage1 import HEAD_DIMS, Stage1Model
from engine.tensors import to_tensor, to_uint8


@torch.no_grad()
def anchor_offset(
    model: Stage1Model, source: torch.Tensor, h_src: torch.Tensor, anchor: torch.Tensor
) -> torch.Tensor | None:
    """What anchored reenactment adds to every driving frame's alpha (see the module doc):
    (1, motion_dim), or None for models without a trained head reader (absolute mode).
    source, anchor: (1, 3, S, S) in [-1, 1]; h_src: the source's h."""
    if not model.reads_head:
        return None
    offset = model.motion(h_src) - model.motion(model.encode(anchor)[0])
    head = model.read_head(anchor) - model.read_head(source)
    return torch.cat([offset[:, :HEAD_DIMS] + head, offset[:, HEAD_DIMS:]], dim=1)


@torch.no_grad()
def reenact_frames(
    model: Stage1Model,
    source: torch.Tensor,
    driving: torch.Tensor,
    batch: int = 8,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """source (1,3,S,S), driving (T,3,S,S) in [-1,1] -> (T,3,S,S): driving motion on source.
    anchor (1,3,S,S): the driving video's first frame (default: driving[:1]); only models with
    a head reader use it (module doc)."""
    h, feats = model.encode(source)
    offset = anchor_offset(model, source, h, driving[:1] if anchor is None else anchor)
    out = []
    for i in range(0, driving.shape[0], batch):
        alpha = model.motion(model.encode(driving[i : i + batch])[0])
        if offset is not None:
            alpha = alpha + offset
        out.append(model.render(h, feats, alpha).clamp(-1, 1))
    return torch.cat(out)


@torch.no_grad()
def reenact_stream(
    model: Stage1Model, portrait: np.ndarray, driving: Iterable[np.ndarray], batch: int = 8
) -> Iterator[np.ndarray]:
    """Portrait (S,S,3) uint8 and driving frames (S,S,3) uint8 -> output frames, streamed in
    batches so any length runs in bounded memory. The first driving frame is the anchor."""
    source = to_tensor(portrait[None])
    h, feats = model.encode(source)
    buf: list[np.ndarray] = []
    offset: list[torch.Tensor | None] = []

    def flush() -> Iterator[np.ndarray]:
        alpha = model.motion(model.encode(to_tensor(np.stack(buf)))[0])
        if offset[0] is not None:
            alpha = alpha + offset[0]
        yield from to_uint8(model.render(h, feats, alpha))
        buf.clear()

    for frame in driving:
        if not offset:
            offset.append(anchor_offset(model, source, h, to_tensor(frame[None])))
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
