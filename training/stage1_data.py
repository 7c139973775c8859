"""Stage-1 training batches: the 4-tuple of AniTalker (source, target, negative, augmented).

Per item: a source and a target frame of one clip (same identity, same background, different
motion; sometimes adjacent frames, i.e. a small motion change), a frame of another identity
(negative) and an augmented copy of the source for the identity branch only (flip, colour
jitter, blur, small rotation). The reconstruction pair is never augmented, so it keeps its
background.

Two sources: the synthetic world (default; also returns the target's ground-truth motion for the
optional auxiliary loss) and a dataset prepared by ``livehead data prepare`` from real videos.
"""

from __future__ import annotations

import functools
import math
import signal
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import WorldConfig
from engine.tensors import to_tensor
from training.common import step_rngs
from training.world.motion import MOTION_FIELDS

# Ground-truth motion regressed by the optional auxiliary loss (synthetic world only): all of it.
AUX_FIELDS = MOTION_FIELDS
# ``clip_pairs``: the length of the clip two frames are drawn from (2 s at 25 fps), about the
# span of the eval's self-reenactment clips (source = first frame, 39 frames after it)
CLIP_PAIR_FRAMES = 50

if TYPE_CHECKING:
    from training.world.identity import Identity


@functools.lru_cache(maxsize=4)
def aux_stats(n: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread (len(AUX_FIELDS),) float32 of the world's motion fields over independent
    random poses/expressions (fixed seed): the auxiliary loss regresses standardised fields, so
    every field weighs alike (raw, the head angles' spread is ~0.05 and the loss ignored them)."""
    from training.world import motion

    assert AUX_FIELDS == motion.MOTION_FIELDS
    v = motion.as_array(motion.random_motion(np.random.default_rng(0), n)).astype(np.float64)
    mean, std = v.mean(0).astype(np.float32), np.maximum(v.std(0), 1e-3).astype(np.float32)
    mean.setflags(write=False)  # cached: shared by every caller
    std.setflags(write=False)
    return mean, std


def relative_head(
    true: torch.Tensor, true_ref: torch.Tensor, alpha_ref: torch.Tensor
) -> torch.Tensor:
    """``train.stage1.teacher_head = "relative"``: standardised true motion (B, k) with the
    head's pose, place and size (its first ``HEAD_DIMS``) replaced by the true move from a
    reference (true_ref, (1 or B, k)) added to the encoder's reading of that reference
    (alpha_ref, (1 or B, >= HEAD_DIMS)). In true's dtype."""
    from engine.models.stage1 import HEAD_DIMS

    d = HEAD_DIMS
    head = true[:, :d] - true_ref[:, :d].to(true.dtype) + alpha_ref[:, :d].to(true.dtype)
    return torch.cat([head, true[:, d:]], dim=1)


class DirectReadout(torch.nn.Module):
    """The auxiliary read-out with no weights: alpha's first ``k`` components *are* the
    standardised motion fields. A learned linear read-out lets the encoder carry a field in a
    direction of alpha too small for the renderer to use (measured: a full mouth opening moved
    alpha by ~0.01 against ~0.12 spread, and the renderer never drew it); here each field has
    unit spread in its own LMD direction."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        return alpha[:, : self.k]


@dataclass
class Stage1Batch:
    """Images (B, 3, S, S) float32 in [-1, 1]; labels (B,) int64 identity classes.

    gt_target / gt_source: (B, len(AUX_FIELDS)) float32 ground-truth motion of the target /
    the source, or None.
    regions: (B, 7) float32 ``face_regions`` of the target (mouth, left eye, right eye pixel
    (x, y), pixels per head unit) -- synthetic world only, for ``region_weights``; or None."""

    source: torch.Tensor
    target: torch.Tensor
    negative: torch.Tensor | None
    augmented: torch.Tensor
    label_source: torch.Tensor
    label_negative: torch.Tensor
    gt_target: torch.Tensor | None = None
    regions: torch.Tensor | None = None
    gt_source: torch.Tensor | None = None


def region_weights(regions: torch.Tensor, size: int, peak: float) -> torch.Tensor:
    """Per-pixel L1 weights (B, 1, S, S): 1 + peak·bump(mouth) + peak/2·bump(each eye).

    regions: (B, 7) -- mouth, left eye, right eye (x, y) in pixels, then pixels per head unit
    K (``training.world.render.face_regions``). The bumps are Gaussians of sigma 0.25·K
    (mouth) and 0.15·K (eyes): the mouth with its full opening, the eyes with their lids. A
    synthetic-world accelerator (the world knows where they are); the paper's L1 is
    ``peak = 0``.
    """
    b = regions.shape[0]
    dev = regions.device
    ax = torch.arange(size, dtype=torch.float32, device=dev) + 0.5
    yy, xx = ax.view(1, size, 1), ax.view(1, 1, size)
    k = regions[:, 6].view(b, 1, 1)
    w = torch.ones(b, size, size, device=dev)
    for j, (amp, sig) in enumerate(((peak, 0.25), (peak / 2, 0.15), (peak / 2, 0.15))):
        cx = regions[:, 2 * j].view(b, 1, 1)
        cy = regions[:, 2 * j + 1].view(b, 1, 1)
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        w = w + amp * torch.exp(-d2 / (2 * (sig * k) ** 2))
    return w.unsqueeze(1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Identity-branch augmentation: random flip, colour jitter, blur, rotation (<= 10 deg)."""
    b = x.shape[0]

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    # colour jitter: brightness, contrast, saturation, per-channel gain
    y = (x + 1) / 2
    y = y * u(0.75, 1.25).view(b, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * u(0.75, 1.25).view(b, 1, 1, 1) + mean
    grey = y.mean(dim=1, keepdim=True)
    y = (y - grey) * u(0.6, 1.4).view(b, 1, 1, 1) + grey
    y = y * u(0.9, 1.1, 3 * b).view(b, 3, 1, 1)
    x = y.clamp(0, 1) * 2 - 1
    # blur with a random-width Gaussian (sigma 0..1.5 px) on half of the batch
    sigma = u(0.3, 1.5) * (torch.rand(b, generator=g) < 0.5)
    if bool((sigma > 0).any()):
        r = torch.arange(-3, 4, dtype=torch.float32)
        k = torch.exp(-(r.view(1, -1) ** 2) / (2 * sigma.clamp_min(1e-3).view(-1, 1) ** 2))
        k = torch.where(sigma.view(-1, 1) > 0, k, (r == 0).float().expand_as(k))
        k = k / k.sum(dim=1, keepdim=True)  # (B, 7)
        xp = F.pad(x, (3, 3, 3, 3), mode="reflect")
        c = x.shape[1]
        kh = k.repeat_interleave(c, 0).view(b * c, 1, 7, 1)
        kw = k.repeat_interleave(c, 0).view(b * c, 1, 1, 7)
        xp = xp.reshape(1, b * c, *xp.shape[-2:])
        xp = F.conv2d(F.conv2d(xp, kh, groups=b * c), kw, groups=b * c)
        x = xp.view_as(x)
    # small rotation and scale around the centre
    ang = u(-10, 10) * math.pi / 180
    sc = u(0.95, 1.05)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack(
        [torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


class SyntheticPairs:
    """Stage-1 batches drawn on the fly from the synthetic world (training identities only)."""

    def __init__(
        self,
        world: WorldConfig,
        image_size: int,
        near_pairs: float = 0.3,
        near_amount: float = 0.3,
        closed_source: float = 0.0,
        negatives: bool = True,
        expression_pairs: float = 0.0,
        placed_heads: float = 0.0,
        placed_apart: float = 0.0,
        avatar_sources: float = 0.0,
        mouth_pairs: float = 0.0,
        mouth_pairs_moved: float = 0.0,
        clip_pairs: float = 0.0,
    ):
        """negatives: render the explicit negative frame (another identity) of each item;
        False leaves ``Stage1Batch.negative`` None and saves a third of the rendering.
        placed_heads: share of pairs whose head is placed as in a talking clip
        (``training.world.place_like_a_clip``; one neck pivot for source and target).
        placed_apart: share of those placed pairs (with a source other than the portrait,
        whose targets always do) whose target gets a neck pivot of its own (as a
        cross-reenactment driver's head rests where its own clip put it).
        avatar_sources: share of pairs whose source is the identity's avatar portrait
        (``neutral_motion``); a placed target then gets a pivot of its own.
        mouth_pairs: share of pairs whose target is exactly the source with a new mouth.
        mouth_pairs_moved: share of those mouth pairs that keep the target's head (pose, place,
        scale) instead of the source's: the face as in the source, the head moved, a new mouth.
        clip_pairs: share of pairs that are two frames of one talking clip
        (``clip_motion_only``, CLIP_PAIR_FRAMES long); the other options do not touch them."""
        from training.world import identity as wid

        self.near_pairs, self.near_amount = near_pairs, near_amount
        self.closed_source = closed_source
        self.expression_pairs = expression_pairs
        self.placed_heads = placed_heads
        self.placed_apart = placed_apart
        self.avatar_sources = avatar_sources
        self.mouth_pairs = mouth_pairs
        self.mouth_pairs_moved = mouth_pairs_moved
        self.clip_pairs = clip_pairs
        self.negatives = negatives
        self.world = world
        self.size = image_size
        self.ids = wid.train_ids(world)
        self.num_classes = int(world.identities)

    def _drawn_pair(
        self, ident: Identity, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Source and target motion (1,) each, drawn as the pair options say."""
        from training.world import motion

        m_src = motion.random_motion(rng, 1)
        avatar = self.avatar_sources > 0 and rng.random() < self.avatar_sources
        if avatar:
            m_src = motion.neutral_motion(1)
        elif self.closed_source > 0 and rng.random() < self.closed_source:
            # as a portrait is: the mouth closed and at rest (the target says what opens)
            m_src["mouth_open"], m_src["mouth_round"], m_src["mouth_width"] = 0.0, 0.0, 0.5
        if self.expression_pairs > 0 and rng.random() < self.expression_pairs:
            # the head as in the source (a near pair's jitter), a new expression
            amount = float(rng.uniform(0.0, self.near_amount))
            m_tgt = motion.perturb_motion(rng, m_src, amount)
            fresh = motion.random_motion(rng, 1)
            for f in motion.EXPRESSION_FIELDS:
                m_tgt[f] = fresh[f]
        elif rng.random() < self.near_pairs:
            # two frames of one video: a motion change of random size, down to none
            amount = float(rng.uniform(0.0, self.near_amount))
            m_tgt = motion.perturb_motion(rng, m_src, amount)
        else:
            m_tgt = motion.random_motion(rng, 1)
        if self.placed_heads > 0 and rng.random() < self.placed_heads:
            if avatar:  # the portrait stays as it is; the frame goes where a clip puts it
                motion.place_like_a_clip(ident, m_tgt, rng)
            else:
                pivot = motion.place_like_a_clip(ident, m_src, rng)
                apart = self.placed_apart > 0 and rng.random() < self.placed_apart
                motion.place_like_a_clip(ident, m_tgt, rng, None if apart else pivot)
        if self.mouth_pairs > 0 and rng.random() < self.mouth_pairs:
            # the source's face (and head, unless moved); only the mouth is new (uniform)
            moved = self.mouth_pairs_moved > 0 and rng.random() < self.mouth_pairs_moved
            face = m_src.copy()
            if moved:  # the target's head as drawn above
                for f in motion.HEAD_FIELDS:
                    face[f] = m_tgt[f]
            m_tgt = face
            m_tgt["mouth_open"] = rng.uniform(0.0, 1.0)
            m_tgt["mouth_round"] = rng.beta(1.0, 2.5)
            m_tgt["mouth_width"] = motion.mouth_width_for(m_tgt["mouth_round"], rng)
        return m_src, m_tgt

    def sample(self, rng: np.random.Generator, g: torch.Generator, batch: int) -> Stage1Batch:
        from training.world import clip_motion_only, get_identity, motion, render_frames
        from training.world.render import face_regions

        src, tgt, neg, gts, gts_src, regions = [], [], [], [], [], []
        ids = rng.choice(self.ids, size=batch, replace=False)
        neg_ids = rng.choice(self.ids, size=batch, replace=False)
        for k, (i, nid) in enumerate(zip(ids, neg_ids)):
            if nid == i:
                nid = self.ids[(np.searchsorted(self.ids, i) + 1) % len(self.ids)]
            ident = get_identity(self.world, int(i))
            if self.clip_pairs > 0 and rng.random() < self.clip_pairs:
                # as the paper samples: two frames of one (synthetic) talking clip
                m = clip_motion_only(self.world, int(i), CLIP_PAIR_FRAMES, rng)
                fs, ft = rng.choice(len(m), size=2, replace=False)
                m_src, m_tgt = m[fs : fs + 1].copy(), m[ft : ft + 1].copy()
            else:
                m_src, m_tgt = self._drawn_pair(ident, rng)
            pair = render_frames(ident, np.concatenate([m_src, m_tgt]), self.size)
            src.append(pair[0])
            tgt.append(pair[1])
            if self.negatives:
                neg.append(
                    render_frames(
                        get_identity(self.world, int(nid)), motion.random_motion(rng, 1), self.size
                    )[0]
                )
            gts.append([float(m_tgt[f][0]) for f in AUX_FIELDS])
            gts_src.append([float(m_src[f][0]) for f in AUX_FIELDS])
            regions.append(face_regions(ident, m_tgt[0], self.size))
            neg_ids[k] = nid
        source = to_tensor(np.stack(src))
        return Stage1Batch(
            source=source,
            target=to_tensor(np.stack(tgt)),
            negative=to_tensor(np.stack(neg)) if neg else None,
            augmented=augment(source, g),
            label_source=torch.from_numpy(ids.astype(np.int64)),
            label_negative=torch.from_numpy(neg_ids.astype(np.int64)),
            gt_target=torch.tensor(gts, dtype=torch.float32),
            gt_source=torch.tensor(gts_src, dtype=torch.float32),
            regions=torch.from_numpy(np.stack(regions)).float(),
        )


class RealPairs:
    """Stage-1 batches from a dataset prepared by ``livehead data prepare`` (real videos)."""

    def __init__(self, root: Path, image_size: int):
        from training.realdata.dataset import RealClips

        self.clips = RealClips(root)
        self.size = image_size
        self.labels = {name: i for i, name in enumerate(self.clips.identities)}
        self.num_classes = len(self.labels)

    def sample(self, rng: np.random.Generator, g: torch.Generator, batch: int) -> Stage1Batch:
        items = [self.clips.sample_pair(rng) for _ in range(batch)]
        src = to_tensor(np.stack([it[0] for it in items]))
        tgt = to_tensor(np.stack([it[1] for it in items]))
        neg = to_tensor(np.stack([it[2] for it in items]))
        if src.shape[-1] != self.size:
            src, tgt, neg = (
                F.interpolate(
                    t, size=self.size, mode="bilinear", antialias=True, align_corners=False
                )
                for t in (src, tgt, neg)
            )
        return Stage1Batch(
            source=src,
            target=tgt,
            negative=neg,
            augmented=augment(src, g),
            label_source=torch.tensor([self.labels[it[3]] for it in items]),
            label_negative=torch.tensor([self.labels[it[4]] for it in items]),
        )


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` is the batch of global step ``s``, drawn with that step's generators
    (``step_rngs``), plus the state of its torch generator after drawing. So the batches, and
    everything after them, do not depend on how many loader workers drew them."""

    def __init__(self, data: SyntheticPairs | RealPairs, seed: int, rank: int, batch: int):
        self.data, self.seed, self.rank, self.batch = data, seed, rank, batch

    def __getitem__(self, step: int) -> tuple[int, tuple[torch.Tensor | None, ...], torch.Tensor]:
        rng, g = step_rngs(self.seed, step, self.rank)
        b = self.data.sample(rng, g, self.batch)
        return step, tuple(vars(b).values()), g.get_state()


def _worker_init(_: int) -> None:
    # A stop signal sent to the whole process group (timeout, a terminal's Ctrl-C, a job
    # scheduler) is the training loop's to handle: it finishes the step, checkpoints and exports.
    # Workers ignore it, and the loader shuts them down when the loop ends.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def step_loader(
    data: SyntheticPairs | RealPairs,
    seed: int,
    rank: int,
    batch: int,
    first: int,
    last: int,
    workers: int,
    pin: bool,
) -> Generator[tuple[int, Stage1Batch, torch.Tensor], None, None]:
    """(step, batch, generator state) for steps ``first..last`` in order, drawn ahead by
    ``workers`` processes (torch's DataLoader). Each worker runs one CPU thread; the batches
    equal the training loop's own draws bit for bit when the loop runs one thread too (with
    more, the augmentation's float reductions may round differently)."""
    loader = torch.utils.data.DataLoader(
        StepBatches(data, seed, rank, batch),
        batch_size=None,
        sampler=range(first, last + 1),
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4,
        worker_init_fn=_worker_init,
    )
    for step, fields, g_state in loader:
        yield step, Stage1Batch(*fields), g_state
