"""Video-driven mode (ARCHITECTURE.md §5): motion read off each driving frame, rendered onto
the portrait with the portrait's h and feature pyramid (computed once).

Absolute (LIA, AniTalker, every model without a head reader): each frame renders with the
alpha the encoder reads off it. With a trained ``stage1.head_reader`` each frame renders with

    alpha[0:6]  = alpha_portrait[0:6] + read(frame)[0:6] - read(portrait)[0:6]  (the head)
    alpha[6:F]  = read(frame)[6:F]                      (the face, a reader of F = 14 fields)
    alpha[F:]   = alpha_frame[F:] - alpha_anchor[F:] + alpha_portrait[F:]   (the rest)

where read is the head reader and the anchor the driving video's first frame. The encoder
reads each face's absolute place and pose with a bias of its own per face, and the rest
relative to the driving video's own first frame for the same reason. Rendering every frame's
head as the head reader reads it scored higher, in self- as in cross-reenactment, than the
encoder's moves from the first frame plus one reader offset; the face's fields (mouth,
eyelids, brows, gaze) mean the same for every identity, so a reader of 14 gives them as read
(model card, sessions 15-17)."""

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
    """What ``driving_alpha`` adds to every driving frame's reading (see the module doc):
    (1, motion_dim), or None for models without a trained head reader (absolute mode). The
    head's fields: alpha_portrait - read(portrait); the face's (a reader of 14): 0; the rest:
    alpha_portrait - alpha_anchor. source, anchor: (1, 3, S, S) in [-1, 1]; h_src: the
    source's h."""
    if not model.reads_head:
        return None
    a_src = model.motion(h_src)
    read = model.read_head(source)
    f = read.shape[1]
    rest = a_src[:, f:] - model.motion(model.encode(anchor)[0])[:, f:]
    face = torch.zeros_like(read[:, HEAD_DIMS:])
    return torch.cat([a_src[:, :HEAD_DIMS] - read[:, :HEAD_DIMS], face, rest], dim=1)


@torch.no_grad()
def driving_alpha(
    model: Stage1Model, frames: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """Driving frames (B,3,S,S) in [-1,1] -> the alpha each renders with (B, motion_dim), given
    ``anchor_offset``'s offset (None: absolute, the encoder's reading)."""
    alpha = model.motion(model.encode(frames)[0])
    if offset is None:
        return alpha
    read = model.read_head(frames)
    f = read.shape[1]
    return torch.cat([read, alpha[:, f:]], dim=1) + offset


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
        alpha = driving_alpha(model, driving[i : i + batch], offset)
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
        alpha = driving_alpha(model, to_tensor(np.stack(buf)), offset[0])
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
