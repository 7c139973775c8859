"""Stage-1 evaluation: self- and cross-reenactment against the synthetic world's exact ground
truth, identity leakage, and self-reenactment on real videos when they are present.

    livehead eval stage1 [--checkpoint weights/stage1_tiny.safetensors] --json

Metrics (all on held-out identities, which training never sees):
- ``self_psnr``, ``self_ssim``: source = the clip's first frame; every later frame is rebuilt
  from the source with the motion the encoder reads off that frame. Also ``self_face_psnr``:
  the same PSNR restricted to the central face box (the static background inflates full-frame
  PSNR). ``self_mouth_psnr`` (and ``copy_mouth_psnr``, its copy baseline): the same PSNR in a
  square of side 0.8 head units around the target frame's mouth (from the world's landmarks),
  where speech shows.
- ``cross_psnr``, ``cross_ssim``: identity A's first frame driven by identity B's clip, compared
  with the world's rendering of A with B's motion (exact ground truth).
- ``self_psnr_pairs``, ``cross_psnr_pairs``: the same PSNRs per held-out face (per pair), in
  order, and ``self_psnr_sem``, ``cross_psnr_sem``: their standard error (standard deviation
  over faces / sqrt(faces)), how far the figure could move with another draw of faces. Every
  face has as many frames, so the means above are the means of these lists.
- ``id_leakage``: how far the cross-reenacted output moves from the right answer towards the
  driving frame. With G = ground truth (A with B's motion), D = the driving frame (B with the
  same motion) and O = output, leakage = <O - G, D - G> / ||D - G||² per frame, averaged: the
  least-squares coefficient of the driver's appearance in the error. 0 = no leakage, 1 = the
  output is the driver.
- ``copy_psnr``: PSNR of simply repeating the source frame (the floor a model must beat).
- ``self_psnr_by_head_move``: where the self-reenactment error comes from. The frames are split
  into four quartiles of how far the head has moved from the source frame (|d loc_x| +
  |d loc_y| + |d scale| in the world's units: place and size, which move the whole head's
  outline), each with ``move`` (the bin's edges), ``psnr`` and ``copy_psnr``. A renderer
  that warps exactly keeps its PSNR as the head moves; a soft one falls towards the copy.
- ``source_recon_psnr``: each source frame rendered with its own alpha against itself (no
  motion at all): the renderer's ceiling on these faces.
- ``cross_psnr_true_alpha`` (only for weights trained with ``aux_motion_direct``, else null):
  cross-reenactment as ``cross_psnr`` but with alpha's first 14 components set to the driving
  clip's true standardised motion and the other components the source portrait's own reading
  (until session 6: the driving frame's reading, which let a target leak through) -- the
  renderer's share of the error without the encoder's, i.e. what rendering gets when the
  motion fields are exactly right and nothing else of the driver is given; what stage 2
  trained with ``world_alpha`` is trained to produce.
  For weights trained with ``train.stage1.teacher_head = "relative"`` the head's pose, place
  and size there (and in ``drawn_*``) are the true move from the source frame added to the
  encoder's reading of the source, as the renderer was trained to take them.
- ``alpha_pose_r``, ``alpha_mouth_r``: how much of the world's motion alpha carries. Each
  held-out identity is drawn in ``frames`` independent random poses/expressions; a
  least-squares linear read-out of alpha (+ bias) onto the ground-truth fields is fitted on half
  of the identities and tested on the other half (then the halves swap); the correlation of
  read-out and truth on the test halves, averaged over yaw/pitch/roll and for mouth opening. What
  stage 1 cannot read off a frame, no stage-2 model can make it render.
- ``drawn_pose_err_deg``, ``drawn_mouth_r``, ``drawn_mouth_gain`` (only for weights trained
  with ``aux_motion_direct``, and only when the probe of ``livehead eval stage2`` is there, else
  null): what the renderer draws when it is given exactly the right motion, as the judge of the
  stage-2 eval reads it. Each held-out identity's neutral portrait is rendered with alpha's
  first 14 components set to the true motion of ``frames`` random poses and expressions, the
  heads placed as talking clips place them (the nose moves with the turn: what stage 2 learns
  from clips), the free components the portrait's own reading. The probe reads head pose and
  mouth opening off each rendered frame and off the world's own frame of the same motion:
  ``drawn_pose_err_deg`` is the mean absolute difference in yaw/pitch/roll, ``drawn_mouth_r``
  the correlation of the two mouth readings and ``drawn_mouth_gain`` the least-squares slope
  of the rendered reading on the world's (1 = the whole opening drawn, 0 = none), both within
  each face (each identity's mean reading taken out: the probe reads faces with offsets). Stage 2
  cannot do better in video than this: its pose error and lip sync are bounded by these.
- ``reenact_mode``: "absolute" (each frame's alpha as the encoder reads it) or "read_head"
  (weights with a trained ``stage1.head_reader``; ``engine.reenact``): the head's pose, place
  and size read off every driving frame by the head reader (relative to the portrait's own
  reading), with a reader of 14 fields the face's (mouth, eyelids, brows, gaze) as read, and
  the rest the encoder's, relative to the driving clip's first frame, the anchor. Every
  reenactment here drives with a whole clip whose first frame is the anchor:
  self-reenactment's is the source itself, cross-reenactment's is B's first frame (the output
  is scored on the later frames).
- ``head_reader`` (weights with a trained reader only, else null): the reader's mean absolute
  error on held-out identities (``training.reader.evaluate_reader``): degrees, pixels at 256²,
  relative size (the face's fields in the world's units), ``mae_std`` over the head's six
  fields in alpha's standardised units (``mae_std_face`` over the face's eight);
  ``talking_clips`` splits its error on held-out talking clips into each identity's bias and
  the frame-to-frame rest (``training.reader.reader_error_split``).
- ``real_self_psnr``, ``real_self_ssim``: self-reenactment on face crops of the real videos in
  ../shared/data/real/video (null when that folder is absent).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import Config
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.reenact import reenact_frames
from engine.tensors import to_tensor
from training.losses import psnr, ssim
from training.probe import PROBE_PATH, Probe, load_probe, probe_read

REAL_VIDEO_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "video"


def load_stage1(path: str | Path | None) -> tuple[Stage1Model, Config, dict]:
    """A stage-1 model from safetensors (default: bundled) or a training checkpoint's EMA."""
    from engine import loading
    from engine.weights import load_into
    from training.common import load_checkpoint

    if path is not None and Path(path).suffix == ".pt":
        st, cfg = load_checkpoint(Path(path))
        model = Stage1Model(cfg.stage1)
        load_into(model, st["ema"], str(path))
        model.lmd.freeze()
        t = cfg.train.stage1
        meta = {
            "step": st["step"],
            "perceptual": st.get("perceptual"),
            "data": st.get("data"),
            "aux_motion_direct": bool(t.aux_motion_direct and t.w_aux_motion > 0),
        }
        return model.eval(), cfg, meta
    return loading.load_stage1(path)


def _mouth_psnr(out: torch.Tensor, tgt: torch.Tensor, boxes: list[tuple[int, int, int]]) -> list:
    """Per frame PSNR in a square (cx, cy, half side) of pixels; frames (T, 3, S, S)."""
    s = out.shape[-1]
    vals = []
    for t, (cx, cy, r) in enumerate(boxes):
        y0, y1, x0, x1 = max(0, cy - r), min(s, cy + r), max(0, cx - r), min(s, cx + r)
        if y1 - y0 >= 4 and x1 - x0 >= 4:
            vals.append(psnr(out[t : t + 1, :, y0:y1, x0:x1], tgt[t : t + 1, :, y0:y1, x0:x1]))
    return vals


def _face_box(x: torch.Tensor) -> torch.Tensor:
    s = x.shape[-1]
    return x[..., s // 8 : s - s // 8, s // 5 : s - s // 5]


@torch.no_grad()
def eval_synthetic(
    model: Stage1Model,
    cfg: Config,
    n_ids: int = 8,
    frames: int = 40,
    seed: int = 1234,
    direct: bool = False,
    relative: bool = False,
) -> dict[str, Any]:
    from training.world import clip_motion_only, get_identity, heldout_ids, render_frames
    from training.world.motion import MOTION_FIELDS, random_motion
    from training.world.motion import as_array as motion_array
    from training.world.render import face_regions

    size = cfg.stage1.image_size
    ids = heldout_ids(cfg.world)[:n_ids]
    if len(ids) < 2:
        raise UserError("stage-1 eval needs at least 2 held-out identities")
    rng = np.random.default_rng(seed)
    rng_r = np.random.default_rng(seed + 1)
    clips = {}
    for i in ids:
        motion = clip_motion_only(cfg.world, int(i), frames, rng)
        clips[int(i)] = (get_identity(cfg.world, int(i)), motion)
    sp, ss, sf, cp, cs, leak, copy = [], [], [], [], [], [], []
    mouth, copy_mouth, cp_true = [], [], []
    alphas, truths, moves, recon = [], [], [], []
    for k, a in enumerate(clips):
        ident_a, mot_a = clips[a]
        video = to_tensor(render_frames(ident_a, mot_a, size))
        src, tgt = video[:1], video[1:]
        out = reenact_frames(model, src, tgt, anchor=src)  # the clip's first frame is the source
        # independent random poses/expressions of this identity: alpha's motion read-out
        mot_r = random_motion(rng_r, frames)
        frames_r = to_tensor(render_frames(ident_a, mot_r, size))
        alphas.append(model.motion(model.encode(frames_r)[0]).float().numpy())
        truths.append(motion_array(mot_r))
        sp.append(psnr(out, tgt))
        ss.append(ssim(out, tgt))
        place = motion_array(mot_a)[
            :, [MOTION_FIELDS.index(f) for f in ("loc_x", "loc_y", "scale")]
        ]
        moves.append(np.abs(place[1:] - place[:1]).sum(1))
        h_s, feats_s = model.encode(src)
        alpha_s = model.motion(h_s)
        recon.append(psnr(model.render(h_s, feats_s, alpha_s).clamp(-1, 1), src))
        sf.append(psnr(_face_box(out), _face_box(tgt)))
        copy.append(psnr(src.expand_as(tgt), tgt))
        boxes = []
        for row in mot_a[1:]:
            r = face_regions(ident_a, row, size)
            boxes.append((int(r[0]), int(r[1]), max(2, int(0.4 * r[6]))))
        mouth += _mouth_psnr(out, tgt, boxes)
        copy_mouth += _mouth_psnr(src.expand_as(tgt), tgt, boxes)
        # cross: A's first frame driven by B's clip
        b = list(clips)[(k + 1) % len(clips)]
        ident_b, mot_b = clips[b]
        drive_clip = to_tensor(render_frames(ident_b, mot_b, size))
        driving = drive_clip[1:]  # B's clip after its first frame, as the self frames
        truth = to_tensor(render_frames(ident_a, mot_b[1:], size))
        out_x = reenact_frames(model, src, driving, anchor=drive_clip[:1])
        cp.append(psnr(out_x, truth))
        if direct:
            from training.stage2_data import world_motion_alpha

            # the free components from the portrait (teacher_rest "source"): only the true
            # motion tells the output apart from the source, as in audio-driven rendering
            rest = alpha_s.expand(driving.shape[0], -1)
            rel = (mot_a[:1], alpha_s) if relative else None
            alpha = world_motion_alpha(mot_b[1:], rest, rel)
            cp_true.append(psnr(model.render(h_s, feats_s, alpha).clamp(-1, 1), truth))
        cs.append(ssim(out_x, truth))
        d = (driving - truth).flatten(1)
        e = (out_x - truth).flatten(1)
        denom = d.pow(2).sum(1)
        ok = denom > 1e-3
        if bool(ok.any()):
            leak.append((e * d).sum(1)[ok] / denom[ok])

    def mean(xs: list[torch.Tensor]) -> float:
        return float(torch.cat(xs).mean()) if xs else float("nan")

    def per_face(xs: list[torch.Tensor]) -> tuple[list[float], float | None]:
        each = np.array([float(x.mean()) for x in xs])
        sem = float(each.std(ddof=1) / np.sqrt(len(each))) if len(each) > 1 else None
        return [round(float(v), 3) for v in each], sem

    self_pairs, self_sem = per_face(sp)
    cross_pairs, cross_sem = per_face(cp)

    r = readout_r(alphas, truths)
    pose = [MOTION_FIELDS.index(f) for f in ("yaw", "pitch", "roll")]
    move = np.concatenate(moves)
    self_frames, copy_frames = torch.cat(sp).numpy(), torch.cat(copy).numpy()
    edges = np.quantile(move, [0.0, 0.25, 0.5, 0.75, 1.0])
    by_move = []
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        sel = (move >= lo) & ((move < hi) if k < 3 else (move <= hi))
        by_move.append(
            {
                "move": [round(float(lo), 4), round(float(hi), 4)],
                # a bin is empty only where many frames share one movement (ties at an edge)
                "psnr": float(self_frames[sel].mean()) if sel.any() else None,
                "copy_psnr": float(copy_frames[sel].mean()) if sel.any() else None,
            }
        )
    return {
        "self_psnr": mean(sp),
        "self_ssim": mean(ss),
        "self_face_psnr": mean(sf),
        "self_mouth_psnr": mean(mouth),
        "copy_mouth_psnr": mean(copy_mouth),
        "cross_psnr": mean(cp),
        "cross_ssim": mean(cs),
        "cross_psnr_true_alpha": mean(cp_true),
        "self_psnr_pairs": self_pairs,
        "self_psnr_sem": self_sem,
        "cross_psnr_pairs": cross_pairs,
        "cross_psnr_sem": cross_sem,
        "id_leakage": mean(leak),
        "copy_psnr": mean(copy),
        "self_psnr_by_head_move": by_move,
        "source_recon_psnr": mean(recon),
        "alpha_pose_r": float(np.mean(r[pose])),
        "alpha_mouth_r": float(r[MOTION_FIELDS.index("mouth_open")]),
    }


@torch.no_grad()
def eval_drawn(
    model: Stage1Model,
    cfg: Config,
    probe: Probe,
    n_ids: int,
    frames: int,
    seed: int,
    relative: bool = False,
) -> dict[str, float]:
    """``drawn_*`` (module docstring): true motion of clip-placed heads rendered on each
    held-out portrait, read by the probe next to the world's frames of the same motion."""
    from training.stage2_data import world_motion_alpha
    from training.world import get_identity, heldout_ids, neutral_motion, render_frames
    from training.world.motion import place_like_a_clip, random_motion

    size = cfg.stage1.image_size
    rng = np.random.default_rng(seed)
    pose_err, drawn, world = [], [], []
    for i in heldout_ids(cfg.world)[:n_ids]:
        ident = get_identity(cfg.world, int(i))
        h, feats = model.encode(to_tensor(render_frames(ident, neutral_motion(1), size)))
        motion = random_motion(rng, frames)
        place_like_a_clip(ident, motion, rng)
        own = model.motion(h)
        rel = (neutral_motion(1), own) if relative else None
        alpha = world_motion_alpha(motion, own.expand(frames, -1), rel)
        out = probe_read(probe, model.render(h, feats, alpha).clamp(-1, 1))
        truth = probe_read(probe, to_tensor(render_frames(ident, motion, size)))
        pose_err.append(np.abs(out[:, 1:4] - truth[:, 1:4]).mean() * 90.0)
        # within each face: the probe reads each identity's mouth with its own offset
        drawn.append(out[:, 0] - out[:, 0].mean())
        world.append(truth[:, 0] - truth[:, 0].mean())
    d, w = np.concatenate(drawn).astype(np.float64), np.concatenate(world).astype(np.float64)
    ok = d.std() > 1e-8 and w.std() > 1e-8
    return {
        "drawn_pose_err_deg": float(np.mean(pose_err)),
        "drawn_mouth_r": float(np.corrcoef(d, w)[0, 1]) if ok else float("nan"),
        "drawn_mouth_gain": float(d @ w / (w @ w)) if w.std() > 1e-8 else float("nan"),
    }


def readout_r(alphas: list[np.ndarray], truths: list[np.ndarray]) -> np.ndarray:
    """Per field, the held-out correlation of a linear read-out of alpha: clips (lists of
    (T, motion_dim) alpha and (T, F) truth) split in two halves, fit least squares on one half,
    test on the other, both ways; correlations pooled over both test halves -> (F,)."""
    if len(alphas) < 2:
        return np.full(truths[0].shape[1] if truths else 0, np.nan)
    h = len(alphas) // 2
    preds, gts = [], []
    for fit, test in ((slice(0, h), slice(h, None)), (slice(h, None), slice(0, h))):
        a = np.concatenate(alphas[fit])
        w = np.linalg.lstsq(np.c_[a, np.ones(len(a))], np.concatenate(truths[fit]), rcond=None)[0]
        at = np.concatenate(alphas[test])
        preds.append(np.c_[at, np.ones(len(at))] @ w)
        gts.append(np.concatenate(truths[test]))
    p, g = np.concatenate(preds), np.concatenate(gts)
    r = np.full(g.shape[1], np.nan)
    for j in range(g.shape[1]):
        if p[:, j].std() > 1e-8 and g[:, j].std() > 1e-8:
            r[j] = float(np.corrcoef(p[:, j], g[:, j])[0, 1])
    return r


@torch.no_grad()
def eval_real(
    model: Stage1Model, cfg: Config, video_dir: Path, max_videos: int = 6, frames: int = 40
) -> dict[str, float | None]:
    """Self-reenactment on fixed face crops of real videos (first frame as source)."""
    if not video_dir.is_dir():
        return {"real_self_psnr": None, "real_self_ssim": None, "real_videos": 0}
    from training.realdata.prepare import crop_clip_frames

    size = cfg.stage1.image_size
    sp, ss, used = [], [], 0
    for path in sorted(video_dir.iterdir()):
        if used >= max_videos:
            break
        clip = crop_clip_frames(path, size=size, max_frames=frames)
        if clip is None or len(clip) < 2:
            continue
        video = to_tensor(clip)
        out = reenact_frames(model, video[:1], video[1:], anchor=video[:1])
        sp.append(psnr(out, video[1:]))
        ss.append(ssim(out, video[1:]))
        used += 1
    if not used:
        return {"real_self_psnr": None, "real_self_ssim": None, "real_videos": 0}
    return {
        "real_self_psnr": float(torch.cat(sp).mean()),
        "real_self_ssim": float(torch.cat(ss).mean()),
        "real_videos": used,
    }


def evaluate(
    checkpoint: str | None, n_ids: int, frames: int, real: bool, probe_path: Path = PROBE_PATH
) -> dict[str, Any]:
    model, cfg, meta = load_stage1(checkpoint)
    res: dict[str, Any] = {"checkpoint": str(checkpoint or "bundled"), "config": cfg.name}
    res.update(meta=meta)
    direct = bool(meta.get("aux_motion_direct"))
    # the true motion given as the renderer was trained to take it (train.stage1.teacher_head)
    rel = cfg.train.stage1.teacher_head == "relative"
    res.update(eval_synthetic(model, cfg, n_ids=n_ids, frames=frames, direct=direct, relative=rel))
    drawn = dict.fromkeys(("drawn_pose_err_deg", "drawn_mouth_r", "drawn_mouth_gain"), math.nan)
    if direct and probe_path.is_file():
        probe, _ = load_probe(probe_path)
        drawn = eval_drawn(model, cfg, probe, n_ids, frames, seed=4321, relative=rel)
    res.update(drawn)
    res["reenact_mode"] = "read_head" if model.reads_head else "absolute"
    res["head_reader"] = None
    if model.reads_head:
        from training.reader import evaluate_reader

        assert model.head_reader is not None
        res["head_reader"] = evaluate_reader(model.head_reader, cfg.world)
    if real:
        res.update(eval_real(model, cfg, REAL_VIDEO_DIR, frames=frames))
    else:
        res.update(real_self_psnr=None, real_self_ssim=None)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}


@torch.no_grad()
def side_by_side(model: Stage1Model, cfg: Config, path: Path, rows: int = 4) -> Path:
    """A PNG a person can look at: per row source | driving | output | ground truth, for
    cross-reenactment of held-out identities (A's first frame driven by B's clip)."""
    from PIL import Image

    from engine.tensors import to_uint8
    from training.world import clip_motion_only, get_identity, heldout_ids, render_frames

    size = cfg.stage1.image_size
    ids = heldout_ids(cfg.world)
    rng = np.random.default_rng(7)
    out_rows = []
    for r in range(rows):
        a, b = int(ids[2 * r]), int(ids[2 * r + 1])
        mot_a = clip_motion_only(cfg.world, a, 1, rng)
        mot_b = clip_motion_only(cfg.world, b, 30, rng)[[0, -1]]  # the clip's first and last
        src = render_frames(get_identity(cfg.world, a), mot_a, size)
        clip = to_tensor(render_frames(get_identity(cfg.world, b), mot_b, size))
        drv = to_uint8(clip[1:])
        truth = render_frames(get_identity(cfg.world, a), mot_b[1:], size)
        out = to_uint8(reenact_frames(model, to_tensor(src), clip[1:], anchor=clip[:1]))
        out_rows.append(np.concatenate([src[0], drv[0], out[0], truth[0]], axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(out_rows, axis=0)).save(path)
    return path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default=None,
        help="safetensors or checkpoint.pt (default: the bundled weights/stage1_tiny.safetensors)",
    )
    p.add_argument("--identities", type=int, default=8, help="held-out identities to use")
    p.add_argument("--frames", type=int, default=40, help="frames per clip")
    p.add_argument("--no-real", action="store_true", help="skip the real-video evaluation")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--grid", default=None, help="also write a PNG: source | driving | output | ground truth"
    )


def run(args: argparse.Namespace) -> int:
    if args.identities < 2 or args.frames < 2:
        raise UserError("--identities and --frames must be at least 2")
    res = evaluate(args.checkpoint, args.identities, args.frames, real=not args.no_real)
    if args.grid:
        model, cfg, _ = load_stage1(args.checkpoint)
        res["grid"] = str(side_by_side(model, cfg, Path(args.grid)))
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>16}: {v}")
    return 0
