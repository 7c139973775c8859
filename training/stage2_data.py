"""Stage-2 training data: clips of speech with the frozen stage-1 encoder's per-frame h and α.

``extract`` renders synthetic clips (speech from espeak-ng, motion driven by it), runs the
frozen stage-1 encoder over every frame, and caches per clip:

    audio (N,) float32 16 kHz; feats (F·T', D) log-mel of the audio zero-padded at the end;
    alpha (T, 20) float32; h (T, latent) float16; controls (T, 5): location (nose x in
    [-1, 1]), scale (brow-to-chin / image height, absolute), yaw, pitch, roll (degrees/90).

``WindowSampler`` draws training windows exactly as inference forms them
(``engine.windowing``): window start s, segment [s - C, s + W + L) of audio features, the
denoiser's K + W frames [s - K, s + W) with the first K known (reference α where s - K < 0),
a reference frame (the "portrait") anywhere in the clip, and controls in the adapter's units
(scale relative to the reference frame). A share ``start_windows`` of the windows are a
stream's first at their own frame s (silence before s, a prefix all reference α), so that the
controls, not only the prefix, say where the head is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.audio import LogMelFrontend, silence_feature_row
from engine.config import Config
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.tensors import to_tensor
from engine.windowing import WindowPlan

CONTROL_FIELDS = ("loc_x", "scale", "yaw", "pitch", "roll")


@dataclass
class Stage2Clip:
    audio: np.ndarray
    feats: torch.Tensor
    alpha: torch.Tensor
    h: torch.Tensor
    controls: torch.Tensor
    identity: int


@torch.no_grad()
def encode_frames(model: Stage1Model, frames: np.ndarray, batch: int = 16):
    """(T, S, S, 3) uint8 -> h (T, latent) float32, alpha (T, motion_dim) float32."""
    hs, alphas = [], []
    for i in range(0, len(frames), batch):
        h, _ = model.encode(to_tensor(frames[i : i + batch]))
        hs.append(h.float())
        alphas.append(model.motion(h).float())
    return torch.cat(hs), torch.cat(alphas)


def world_motion_alpha(
    motion: np.ndarray,
    alpha: torch.Tensor,
    relative_to: tuple[np.ndarray, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(T,) MOTION_DTYPE + the encoder's alpha (T, motion_dim) -> alpha with its first 14
    components replaced by the standardised motion (the stage-1 aux read-out's units).

    relative_to (ref_motion (1,) MOTION_DTYPE, ref_alpha (1, motion_dim)): the head's pose,
    place and size (alpha[0:6]) become the true move from ref_motion added to ref_alpha's
    reading, as a stage 1 trained with ``train.stage1.teacher_head = "relative"`` was given
    them (the source frame or portrait as the reference)."""
    from training.stage1_data import aux_stats, relative_head
    from training.world.motion import as_array

    mean, std = aux_stats()
    true = torch.from_numpy((as_array(motion) - mean) / std).to(alpha.dtype)
    if alpha.shape[1] < true.shape[1] or len(true) != len(alpha):
        raise UserError("world_alpha: alpha and the clip's motion do not match")
    if relative_to is not None:
        ref_motion, ref_alpha = relative_to
        ref = torch.from_numpy((as_array(ref_motion) - mean) / std)
        true = relative_head(true, ref, ref_alpha)
    return torch.cat([true, alpha[:, true.shape[1] :]], dim=1)


def clip_features(cfg: Config, audio: np.ndarray, plan: WindowPlan) -> torch.Tensor:
    """Log-mel of the clip, zero-padded at the end for the last windows' look-ahead."""
    front = LogMelFrontend(cfg.stage2.audio)
    pad = (plan.lookahead_frames + plan.window_frames) * plan.samples_per_frame
    x = np.concatenate([audio.astype(np.float32), np.zeros(pad, np.float32)])
    return torch.as_tensor(front.features(x)).float()


def extract(
    model: Stage1Model,
    cfg: Config,
    out: Path,
    clips: int,
    seconds: float,
    seed: int = 0,
    split: str = "train",
    progress: bool = True,
    world_alpha: bool = False,
) -> Path:
    """Render ``clips`` synthetic clips, encode them, save them to ``out`` (a .pt file).
    world_alpha: alpha's first 14 components are the world's standardised motion (see
    ``TrainStage2Config.world_alpha``), the rest the encoder's."""
    from tqdm import tqdm

    from training.world import identity as wid
    from training.world import make_clip

    if clips < 1 or seconds <= 0:
        raise UserError("stage-2 data: clips must be >= 1 and seconds > 0")
    ids = wid.train_ids(cfg.world) if split == "train" else wid.heldout_ids(cfg.world)
    rng = np.random.default_rng(seed)
    size = model.cfg.image_size
    items = []
    for k in tqdm(range(clips), desc="stage2 data", disable=not progress, unit="clip"):
        ident = int(rng.choice(ids))
        clip = make_clip(cfg.world, ident, seconds, size=size, seed=seed * 100003 + k, split=split)
        assert clip.frames is not None
        h, alpha = encode_frames(model, clip.frames)
        if world_alpha:
            alpha = world_motion_alpha(clip.motion, alpha)
        ctrl = np.stack([np.asarray(clip.motion[f], np.float32) for f in CONTROL_FIELDS], 1)
        items.append(
            {
                "audio": torch.from_numpy(clip.audio.astype(np.float32)),
                "alpha": alpha,
                "h": h.half(),
                "controls": torch.from_numpy(ctrl),
                "identity": ident,
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save({"clips": items, "image_size": size}, tmp)
    tmp.replace(out)
    return out


def load_clips(path: Path, cfg: Config, plan: WindowPlan) -> list[Stage2Clip]:
    if not path.is_file():
        raise UserError(f"stage-2 data not found: {path} (run with --extract first)")
    data = torch.load(path, map_location="cpu", weights_only=False)
    out = []
    for it in data["clips"]:
        audio = it["audio"].numpy()
        out.append(
            Stage2Clip(
                audio=audio,
                feats=clip_features(cfg, audio, plan),
                alpha=it["alpha"].float(),
                h=it["h"].float(),
                controls=it["controls"].float(),
                identity=int(it["identity"]),
            )
        )
    return out


@dataclass
class Stage2Batch:
    """feats (B, F·S, D); controls (B, S, 5); control_mask (B, S, 3); x0 (B, K+W, 20)
    normalised; known_mask (B, K+W, 1); ref_alpha (B, 20) normalised; ref_h (B, latent);
    gt_controls (B, S, 5) (adapter targets). S = C + W + L segment frames."""

    feats: torch.Tensor
    controls: torch.Tensor
    control_mask: torch.Tensor
    x0: torch.Tensor
    known_mask: torch.Tensor
    ref_alpha: torch.Tensor
    ref_h: torch.Tensor
    gt_controls: torch.Tensor


class WindowSampler:
    """Training windows (``sample``). rest_from: with world_alpha, the index of the first
    component the world does not define (14); every frame's components from there on are then
    the reference frame's, which is what the stage-1 renderer was trained to receive there
    (``train.stage1.teacher_rest = "source"``) and what an avatar portrait supplies."""

    def __init__(
        self,
        clips: list[Stage2Clip],
        plan: WindowPlan,
        cfg: Config,
        normalizer,
        rest_from: int | None = None,
    ):
        if not clips:
            raise UserError("stage-2 data holds no clips")
        self.clips, self.plan, self.norm = clips, plan, normalizer
        self.rest_from = rest_from
        self.pad_row = silence_feature_row(LogMelFrontend(cfg.stage2.audio))

    def sample(
        self,
        rng: np.random.Generator,
        batch: int,
        p_given: float = 0.5,
        start_windows: float = 0.0,
    ) -> Stage2Batch:
        p = self.plan
        k, w, c, la = p.prefix_frames, p.window_frames, p.context_frames, p.lookahead_frames
        f = p.feature_frames_per_video_frame
        feats, ctrls, masks, x0s, refa, refh, gts = [], [], [], [], [], [], []
        for _ in range(batch):
            clip = self.clips[int(rng.integers(len(self.clips)))]
            t = clip.alpha.shape[0]
            if t < w:
                raise UserError("a stage-2 clip is shorter than one window")
            # start anywhere, including the first windows (prefix partly the reference)
            s = int(rng.integers(0, t - w + 1))
            r = int(rng.integers(t))  # the reference frame plays the portrait
            # a stream start at frame s (probability start_windows): silence before it and a
            # prefix that is all reference, as the first window of every stream sees them --
            # the target's pose then differs from the prefix's and only a given control says
            # where it is (otherwise the prefix carries it and the controls are never needed)
            start = s if rng.random() < start_windows else 0
            lo, hi = (s - c) * f, (s + w + la) * f
            seg = clip.feats[max(lo, start * f) : hi]
            if lo < start * f:
                seg = torch.cat([self.pad_row.expand(start * f - lo, -1), seg])
            if seg.shape[0] < hi - lo:  # past the padded end: silence
                seg = torch.cat([seg, self.pad_row.expand(hi - lo - seg.shape[0], -1)])
            feats.append(seg)
            idx = torch.arange(s - c, s + w + la).clamp(start, t - 1)
            gt = clip.controls[idx].clone()
            gt[:, 1] = gt[:, 1] / clip.controls[r, 1].clamp_min(1e-6)  # scale rel. to the ref
            gts.append(gt)
            ctrls.append(gt)
            given = torch.from_numpy((rng.random(3) < p_given).astype(np.float32))
            masks.append(given.expand(len(idx), 3))
            ai = torch.arange(s - k, s + w)
            a = clip.alpha[ai.clamp(start, t - 1)].clone()
            a[ai < start] = clip.alpha[r]  # before the stream start, the prefix is the reference
            if self.rest_from is not None:
                a[:, self.rest_from :] = clip.alpha[r, self.rest_from :]
            x0s.append(self.norm.normalize(a))
            refa.append(self.norm.normalize(clip.alpha[r]))
            refh.append(clip.h[r])
        known = torch.cat([torch.ones(k, 1), torch.zeros(w, 1)])
        return Stage2Batch(
            feats=torch.stack(feats),
            controls=torch.stack(ctrls),
            control_mask=torch.stack(masks),
            x0=torch.stack(x0s),
            known_mask=known.expand(batch, -1, -1).contiguous(),
            ref_alpha=torch.stack(refa),
            ref_h=torch.stack(refh),
            gt_controls=torch.stack(gts),
        )
