"""Stage-2 evaluation on held-out identities speaking held-out sentences.

    livehead eval stage2 [--checkpoint weights/stage2_tiny.safetensors] --json

An independent judge reads the generated video: the probe (training/probe.py), a small CNN
trained on the synthetic world's frames and ground truth, reads mouth opening and head pose off
every generated frame. Its own held-out accuracy is printed with the results (``probe``).

- ``lipsync_r``: Pearson r between the probe's mouth opening on the generated video and the
  world's ground-truth mouth track for that speech (the mouth the world would draw for it).
- ``av_offset_ms``: the lag (video relative to audio, ±400 ms searched) of the best
  cross-correlation between the two; positive = the mouth moves late. 0 is perfect.
- ``pose_control_err_deg``: mean absolute error between commanded yaw/pitch/roll (constant
  poses, several) and the probe's reading of the generated frames.
- ``diversity``: mean over time and α dimensions of the standard deviation of α across seeds
  for the same audio (normalised α units), with ``diversity_lipsync_r`` the mean lip-sync r of
  those seeds (diversity only counts while lip-sync holds).
- ``pose_jitter_deg``: mean absolute change of the probe's yaw/pitch/roll from one generated
  frame to the next (seed 0, no controls), and ``pose_jitter_deg_world`` the same on the
  world's own frames of those clips: how steady the head is against how steady it should be.
- ``long_drift``: a 10-minute generation (α only) of looped held-out speech: per-dimension mean
  and standard deviation of α in the first and the last minute, summarised as the mean
  absolute change of the mean and the mean ratio of the standard deviations (1 = stable).
- ``reenact_lipsync_r``: the same r for stage 1 alone -- α encoded from the world's own frames
  of each clip and rendered on the portrait -- the ceiling ``lipsync_r`` can reach with this
  stage-1 model (low: the renderer does not draw the mouth; high while ``lipsync_r`` is low:
  stage 2 does not move it).
- ``reenact_lipsync_r_true_alpha`` (stage-2 weights trained with ``world_alpha`` only): the
  same with alpha's first 14 components set to the clip's true standardised motion and the
  rest the portrait's own reading -- what that stage 2 is trained to produce; then the
  read-out below is fitted on that alpha too.
- ``alpha_lipsync_r``: lip sync in motion space, renderer left out: a linear read-out of the
  mouth opening from α, fitted (least squares, on these clips) on α encoded from the world's
  frames, applied to the generated α; ``alpha_mouth_r_encoded`` is that read-out's own r on
  the encoded α (how much of the mouth α carries at all).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import Config, check_sampling
from engine.diffusion import DiffusionSchedule
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.models.stage2 import Stage2Nets
from engine.session_api import Controls
from engine.tensors import to_tensor
from engine.windowing import ControlTrack, WindowPlan, generate_offline, offline_features
from training.probe import PROBE_PATH, probe_read
from training.stage2_data import encode_frames, world_motion_alpha


class Generator:
    """Audio -> α -> frames with the offline windowing (the same code path streaming uses)."""

    def __init__(self, s1: Stage1Model, s2: Stage2Nets, cfg: Config, steps: int | None = None):
        from engine.audio import LogMelFrontend, silence_feature_row

        self.s1, self.s2, self.cfg = s1, s2, cfg
        self.front = LogMelFrontend(cfg.stage2.audio)
        self.pad_row = torch.as_tensor(silence_feature_row(self.front)).float()
        self.plan = WindowPlan.from_config(cfg.stage2, self.front.frames_per_video_frame)
        self.schedule = DiffusionSchedule.linear(
            cfg.stage2.timesteps, cfg.stage2.beta_start, cfg.stage2.beta_end
        )
        self.steps = steps or cfg.stage2.sample_steps
        self.noise_scale = cfg.stage2.noise_scale
        self.control_guidance = cfg.stage2.control_guidance

    @torch.no_grad()
    def avatar(self, portrait: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        h, feats = self.s1.encode(to_tensor(portrait[None]))
        return h, feats, self.s1.motion(h)[0]

    @torch.no_grad()
    def alpha(
        self,
        audio: np.ndarray,
        h: torch.Tensor,
        ref_alpha: torch.Tensor,
        seed: int,
        controls: Controls | None = None,
    ) -> torch.Tensor:
        feats, n = offline_features(self.front, audio, self.plan)
        track = None
        if controls is not None:
            track = ControlTrack()
            track.set(0, controls)
        return generate_offline(
            self.s2,
            self.plan,
            torch.as_tensor(feats).float(),
            ref_alpha,
            h[0],
            n,
            seed=seed,
            steps=self.steps,
            schedule=self.schedule,
            pad_row=self.pad_row,
            controls=track,
            noise_scale=self.noise_scale,
            control_guidance=self.control_guidance,
        )

    @torch.no_grad()
    def frames(self, h, feats, alpha: torch.Tensor, batch: int = 16) -> torch.Tensor:
        return torch.cat(
            [self.s1.render(h, feats, alpha[i : i + batch]) for i in range(0, len(alpha), batch)]
        )


def best_lag(x: np.ndarray, y: np.ndarray, max_lag: int = 10) -> int:
    """Lag (frames) of y relative to x maximising their correlation; positive = y is late."""
    best, arg = -2.0, 0
    for lag in range(-max_lag, max_lag + 1):
        a = x[: len(x) - lag] if lag > 0 else x[-lag:]
        b = y[lag:] if lag > 0 else y[: len(y) + lag]
        if len(a) > 3 and a.std() > 0 and b.std() > 0:
            r = float(np.corrcoef(a, b)[0, 1])
            if r > best:
                best, arg = r, lag
    return arg


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def alpha_lipsync(a_true: np.ndarray, a_gen: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Lip sync in motion space, without the renderer: a least-squares linear read-out of the
    mouth opening from α, fitted on α encoded from the world's frames (``a_true`` (T, D)
    against ``gt`` (T,)), applied to the α stage 2 generated for the same speech."""
    x = np.concatenate([a_true, np.ones((len(a_true), 1))], axis=1)
    w, *_ = np.linalg.lstsq(x, gt, rcond=None)
    xg = np.concatenate([a_gen, np.ones((len(a_gen), 1))], axis=1)
    return {
        "alpha_mouth_r_encoded": _pearson(x @ w, gt),
        "alpha_lipsync_r": _pearson(xg @ w, gt),
    }


@torch.no_grad()
def evaluate(
    s1: Stage1Model,
    s2: Stage2Nets,
    cfg: Config,
    probe,
    clips: int = 4,
    seconds: float = 6.0,
    seeds: int = 3,
    drift_minutes: float = 10.0,
    steps: int | None = None,
    world_alpha: bool = False,
    relative: bool = False,
) -> dict[str, Any]:
    """world_alpha: stage 2 was trained on the world's true motion in alpha's first components
    (``train.stage2.world_alpha``); the motion-space read-out is then fitted on that alpha, and
    ``reenact_lipsync_r_true_alpha`` renders it. relative: stage 1 takes the head's pose, place
    and size relative to the portrait's reading (``train.stage1.teacher_head``); that rendering
    then gives them so."""
    from training.world import get_identity, heldout_ids, make_clip, neutral_motion, render_frames

    gen = Generator(s1, s2, cfg, steps)
    size = s1.cfg.image_size
    ids = heldout_ids(cfg.world)
    mouth_gen, mouth_gt, r_clips, lags, pose_err, div, div_r = [], [], [], [], [], [], []
    jitter, jitter_world = [], []
    long_audio, reenact_gen, alpha_true, alpha_gen, reenact_true = [], [], [], [], []
    for k in range(clips):
        ident = int(ids[k % len(ids)])
        clip = make_clip(
            cfg.world, ident, seconds, size=size, seed=777 + k, split="heldout", render=True
        )
        long_audio.append(clip.audio)
        portrait = render_frames(get_identity(cfg.world, ident), neutral_motion(1), size)[0]
        h, feats, ref_alpha = gen.avatar(portrait)
        gt = np.asarray(clip.motion["mouth_open"], np.float64)
        # stage 1 alone: α read off the world's own frames of this clip, rendered on the portrait
        assert clip.frames is not None
        a_true = encode_frames(s1, clip.frames)[1]
        reenact_gen.append(probe_read(probe, gen.frames(h, feats, a_true))[: len(gt), 0])
        world_pose = probe_read(probe, to_tensor(clip.frames))[:, 1:4] * 90.0
        jitter_world.append(float(np.abs(np.diff(world_pose, axis=0)).mean()))
        if world_alpha:
            # the world's motion, the free components the portrait's own (as the renderer and
            # stage 2 are trained; each frame's reading there would carry that frame's face)
            ref = ref_alpha.reshape(1, -1)
            rel = (neutral_motion(1), ref) if relative else None
            a_true = world_motion_alpha(clip.motion, ref.expand_as(a_true), rel)
            reenact_true.append(probe_read(probe, gen.frames(h, feats, a_true))[: len(gt), 0])
        alpha_true.append(a_true[: len(gt)].double().numpy())
        alphas = []
        for seed in range(seeds):
            a = gen.alpha(clip.audio, h, ref_alpha, seed)
            alphas.append(s2.normalizer.normalize(a))
            read = probe_read(probe, gen.frames(h, feats, a))
            m = read[: len(gt), 0].astype(np.float64)
            r = _pearson(m, gt)
            div_r.append(r)
            if seed == 0:
                pose = read[: len(gt), 1:4] * 90.0
                jitter.append(float(np.abs(np.diff(pose, axis=0)).mean()))
                alpha_gen.append(a[: len(gt)].double().numpy())
                mouth_gen.append(m)
                mouth_gt.append(gt)
                r_clips.append(r)
                lags.append(best_lag(gt, m))
        div.append(float(torch.stack(alphas).std(0).mean()))
        # pose control: a constant commanded pose per clip, different for each clip
        cmd = [(20.0, 0.0, 0.0), (-15.0, 8.0, 0.0), (0.0, -10.0, 6.0), (10.0, 5.0, -5.0)][k % 4]
        a = gen.alpha(clip.audio, h, ref_alpha, 0, Controls(pose_deg=cmd))
        read = probe_read(probe, gen.frames(h, feats, a))
        pose_err.append(np.abs(read[:, 1:4] * 90.0 - np.asarray(cmd)[None]).mean())
    all_gen, all_gt = np.concatenate(mouth_gen), np.concatenate(mouth_gt)
    res: dict[str, Any] = {
        "lipsync_r": _pearson(all_gen, all_gt),
        "reenact_lipsync_r": _pearson(np.concatenate(reenact_gen).astype(np.float64), all_gt),
        "reenact_lipsync_r_true_alpha": _pearson(
            np.concatenate(reenact_true).astype(np.float64), all_gt
        )
        if reenact_true
        else None,
        **alpha_lipsync(np.concatenate(alpha_true), np.concatenate(alpha_gen), all_gt),
        "lipsync_r_per_clip": [round(r, 4) for r in r_clips],
        "av_offset_ms": float(np.median(lags) * 40.0),
        "pose_control_err_deg": float(np.mean(pose_err)),
        "pose_jitter_deg": float(np.mean(jitter)),
        "pose_jitter_deg_world": float(np.mean(jitter_world)),
        "diversity": float(np.mean(div)),
        "diversity_lipsync_r": float(np.nanmean(div_r)) if np.isfinite(div_r).any() else None,
    }
    if drift_minutes > 0:
        res["long_drift"] = long_drift(gen, np.concatenate(long_audio), cfg, drift_minutes)
    return res


@torch.no_grad()
def long_drift(gen: Generator, audio: np.ndarray, cfg: Config, minutes: float) -> dict:
    from training.world import get_identity, heldout_ids, neutral_motion, render_frames

    n = int(minutes * 60 * 16000)
    looped = np.tile(audio, math.ceil(n / len(audio)))[:n].astype(np.float32)
    ident = int(heldout_ids(cfg.world)[0])
    portrait = render_frames(
        get_identity(cfg.world, ident), neutral_motion(1), gen.s1.cfg.image_size
    )[0]
    h, _, ref_alpha = gen.avatar(portrait)
    a = gen.s2.normalizer.normalize(gen.alpha(looped, h, ref_alpha, 0))
    per_min = 25 * 60
    first, last = a[: min(per_min, len(a))], a[-min(per_min, len(a)) :]
    return {
        "minutes": minutes,
        "mean_abs_change": float((first.mean(0) - last.mean(0)).abs().mean()),
        "std_ratio": float((last.std(0) / first.std(0).clamp_min(1e-6)).mean()),
        "first_std": float(first.std(0).mean()),
        "last_std": float(last.std(0).mean()),
        "finite": bool(torch.isfinite(a).all()),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="stage-2 safetensors (default: bundled)")
    p.add_argument("--stage1", default=None, help="stage-1 safetensors (default: bundled)")
    p.add_argument("--probe", default=str(PROBE_PATH), help="probe safetensors")
    p.add_argument("--clips", type=int, default=4, help="held-out clips")
    p.add_argument("--seconds", type=float, default=6.0, help="seconds per clip")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the diversity measure")
    p.add_argument("--drift-minutes", type=float, default=10.0, help="0 skips long_drift")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: config)")
    p.add_argument(
        "--noise-scale",
        type=float,
        default=None,
        help="sampling temperature, stage2.noise_scale (default: the weights' config)",
    )
    p.add_argument(
        "--control-guidance",
        type=float,
        default=None,
        help="stage2.control_guidance (default: the weights' config)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from engine.loading import load_stage1, load_stage2
    from training.probe import load_probe

    if args.clips < 1 or args.seconds <= 0 or args.seeds < 1:
        raise UserError("--clips and --seeds must be >= 1, --seconds > 0")
    s1, cfg1, _ = load_stage1(args.stage1)
    # the same check as the engine: stage 2 needs stage 1's motion space (renderer-only
    # changes such as stage1.inject keep it; stage 2 sees only the encoder's h and alpha)
    s2, cfg, meta = load_stage2(args.checkpoint, stage1=cfg1.stage1)
    if args.noise_scale is not None:
        cfg.stage2.noise_scale = args.noise_scale
    if args.steps is not None:
        cfg.stage2.sample_steps = args.steps
    if args.control_guidance is not None:
        cfg.stage2.control_guidance = args.control_guidance
    check_sampling(cfg.stage2)  # as the engine does
    probe, acc = load_probe(Path(args.probe))
    res = evaluate(
        s1,
        s2,
        cfg,
        probe,
        args.clips,
        args.seconds,
        args.seeds,
        args.drift_minutes,
        world_alpha=bool(meta.get("world_alpha")),
        relative=cfg1.train.stage1.teacher_head == "relative",
    )
    res["noise_scale"] = cfg.stage2.noise_scale
    res["control_guidance"] = cfg.stage2.control_guidance
    res["probe"] = acc
    res["checkpoint"] = args.checkpoint or "bundled"
    res["meta"] = meta
    res = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))
    return 0
