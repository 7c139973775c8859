"""Train the head reader of a stage-1 model (``stage1.head_reader``; synthetic world only).

    livehead train reader --init-from weights/stage1_tiny.safetensors \\
        --out runs/reader/stage1.safetensors --steps 3000

A small CNN of its own (``engine.models.stage1.HeadReader``) learns to read the head's absolute
yaw, pitch, roll, place and size off a frame from the world's exact truth, on training
identities only, and with ``--fields 14`` the face's expression too (mouth, eyelids, brows,
gaze). Nothing else of the model changes: the output file is the input file plus the reader
(marked ready), so ``livehead reenact`` and ``livehead eval stage1`` use it. Video-driven
reenactment takes those fields of every driving frame from it (``engine.reenact``): the shared
encoder reads each face's absolute place with a bias of its own (model card, sessions 15-17).

Frames: 40 % independent random poses (half of them with the head placed as in a talking
clip), 40 % a frame of a talking clip, 20 % the identity's avatar portrait (neutral pose).
Checkpoints (``RUN_DIR/checkpoint.pt``) every ``--ckpt-every`` steps; ``--resume`` continues
exactly (each step's batch comes from its own seed). Metrics go to ``RUN_DIR/metrics.jsonl``.
Accuracy on held-out identities is printed at the end and stored in the file's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import WorldConfig
from engine.errors import UserError
from engine.models.stage1 import HEAD_DIMS, HEAD_FIELD_MEAN, READ_FIELDS, HeadReader
from engine.tensors import to_tensor
from engine.weights import load_weights, save_weights
from training.common import (
    MetricsLog,
    add_part_trainer_args,
    resume_part,
    save_checkpoint,
    step_rngs,
)
from training.world.motion import MOTION_FIELDS

# alpha[6:14] (engine.models.stage1.FACE_FIELD_*), read by a reader of 14 fields
FACE_FIELDS = MOTION_FIELDS[HEAD_DIMS : READ_FIELDS[1]]
# read-out units of each field for the accuracy report: degrees, pixels at 256², relative size
_UNITS = {
    "yaw_deg": 90.0,
    "pitch_deg": 90.0,
    "roll_deg": 90.0,
    "loc_x_px": 128.0,
    "loc_y_px": 128.0,
    "scale_rel": 1.0 / HEAD_FIELD_MEAN[5],  # error over the mean head size
    # the face's fields (a reader of 14) in the world's own units ([0, 1]; gaze [-1, 1])
    **{f: 1.0 for f in FACE_FIELDS},
}


def head_truth(motion: np.ndarray, fields: int = HEAD_DIMS) -> np.ndarray:
    """The world's motion rows (MOTION_DTYPE) -> their first ``fields`` fields (the head's, and
    with 14 the face's) in alpha's standardised units, (n, fields)."""
    from training.stage1_data import aux_stats
    from training.world.motion import as_array

    mean, std = aux_stats()
    return (as_array(motion)[:, :fields] - mean[:fields]) / std[:fields]


def reader_batch(
    world: WorldConfig,
    ids: np.ndarray,
    rng: np.random.Generator,
    n: int,
    size: int = 256,
    fields: int = HEAD_DIMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n frames of random identities (see the module doc for the mix) -> images (n, 3, S, S) in
    [-1, 1] and their first ``fields`` fields (n, fields) standardised as alpha."""
    from training.world import (
        clip_motion_only,
        get_identity,
        neutral_motion,
        place_like_a_clip,
        random_motion,
        render_frames,
    )

    imgs, rows = [], []
    for _ in range(n):
        i = int(rng.choice(ids))
        ident = get_identity(world, i)
        u = rng.random()
        if u < 0.4:
            m = random_motion(rng, 1)
            if rng.random() < 0.5:
                place_like_a_clip(ident, m, rng)
        elif u < 0.8:
            clip = clip_motion_only(world, i, 12, rng)
            m = clip[int(rng.integers(len(clip))) :][:1]
        else:
            m = neutral_motion(1)
        imgs.append(render_frames(ident, m, size)[0])
        rows.append(head_truth(m, fields)[0])
    truth = np.stack(rows)
    return to_tensor(np.stack(imgs)), torch.tensor(truth, dtype=torch.float32)


@torch.no_grad()
def evaluate_reader(
    reader: HeadReader, world: WorldConfig, n: int = 192, seed: int = 99
) -> dict[str, Any]:
    """Mean absolute error of ``HeadReader.read`` (what reenactment uses) on held-out
    identities, per field in degrees / pixels at 256² / relative size (the face's fields in
    the world's units), and in standardised units over the head's fields (``mae_std``) and,
    for a reader of 14, over the face's (``mae_std_face``); ``talking_clips``:
    ``reader_error_split``."""
    from training.stage1_data import aux_stats
    from training.world import heldout_ids

    _, std = aux_stats()
    f = reader.fields
    x, y = reader_batch(world, heldout_ids(world), np.random.default_rng(seed), n, fields=f)
    p = torch.cat([reader.read(x[i : i + 64]) for i in range(0, n, 64)])
    err = (p - y).abs()
    out: dict[str, Any] = {"mae_std": float(err[:, :HEAD_DIMS].mean())}
    if f > HEAD_DIMS:
        out["mae_std_face"] = float(err[:, HEAD_DIMS:].mean())
    raw = err.mean(0).numpy() * std[:f]
    for k, (name, unit) in enumerate(list(_UNITS.items())[:f]):
        out[name] = float(raw[k] * unit)
    out["frames"] = n
    out["talking_clips"] = reader_error_split(reader, world)
    return out


@torch.no_grad()
def reader_error_split(
    reader: HeadReader, world: WorldConfig, n_ids: int = 16, frames: int = 16, seed: int = 7
) -> dict[str, Any]:
    """Where the reader's error on talking clips lies: ``frames`` frames (every 5th) of one
    held-out clip for each of ``n_ids`` held-out identities. Each field's error splits into the
    identity's mean (``per_identity_bias``: mean absolute over identities) and what is left
    frame to frame (``within_identity``), both in alpha's standardised units. Reenactment reads
    every driving frame's head relative to the portrait's reading and pays both; averaging
    frames could only remove the second, never a face's bias."""
    from training.world import clip_motion_only, get_identity, heldout_ids, render_frames

    rng = np.random.default_rng(seed)
    errs = []
    for i in heldout_ids(world)[:n_ids]:
        mot = clip_motion_only(world, int(i), frames * 5, rng)[::5]
        x = to_tensor(render_frames(get_identity(world, int(i)), mot, 256))
        errs.append(reader.read(x).numpy() - head_truth(mot, reader.fields))
    e = np.stack(errs)  # (ids, frames, fields)
    bias = e.mean(1, keepdims=True)
    return {
        "fields": list(MOTION_FIELDS[: reader.fields]),
        "mae_std": [round(float(v), 4) for v in np.abs(e).mean((0, 1))],
        "per_identity_bias": [round(float(v), 4) for v in np.abs(bias).mean((0, 1))],
        "within_identity": [round(float(v), 4) for v in np.abs(e - bias).mean((0, 1))],
        "identities": int(e.shape[0]),
        "frames": int(e.shape[1]),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    add_part_trainer_args(p, "head reader", "runs/reader", 3000, 32, "frames per step", 2e-3)
    p.add_argument(
        "--size",
        type=int,
        default=0,
        help="side the reader reads frames at, 128 · 2^k (default: the file's "
        "stage1.head_reader_size, 128 unless set); with --warm-start a reader of 128² grows "
        "to it (a fine branch at that size, starting out as the old reader)",
    )
    p.add_argument(
        "--fields",
        type=int,
        default=0,
        choices=(0, *READ_FIELDS),
        help="what the reader reads: 6 (the head's pose, place and size) or 14 (also the face's "
        "expression); default: the file's stage1.head_reader_fields (6 unless set). A "
        "--warm-start from a reader of 6 to 14 keeps the 6 and learns the 8 new outputs",
    )


def run(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    if a.steps < 1 or a.batch < 2 or a.ckpt_every < 1 or not a.lr > 0:
        raise UserError("--steps and --ckpt-every must be >= 1, --batch >= 2, --lr > 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    tensors, cfg, meta = load_weights(a.init_from, "stage1")
    run_dir = Path(a.run_dir)
    ckpt = run_dir / "checkpoint.pt"
    torch.manual_seed(a.seed)
    own = {k[len("head_reader.") :]: v for k, v in tensors.items() if k.startswith("head_reader.")}
    if a.warm_start and (not cfg.stage1.head_reader or not own or float(own["ready"]) < 0.5):
        raise UserError(f"--warm-start: {a.init_from} holds no trained head reader")
    held = cfg.stage1.head_reader_size
    size = a.size or held
    if a.warm_start and size != held and held != HeadReader.BASE:  # only 128² readers grow
        raise UserError(
            f"--warm-start: the reader in {a.init_from} reads at {held}²; it can continue at "
            f"that size only (a reader of 128² can also grow to --size {size})"
        )
    fields = a.fields or cfg.stage1.head_reader_fields
    if a.warm_start and fields < cfg.stage1.head_reader_fields:
        raise UserError(f"--warm-start: {a.init_from}'s reader reads more than --fields {fields}")
    reader = HeadReader(size=size, fields=fields)
    before: dict[str, Any] | None = None  # the warm start's own record
    if a.warm_start:
        # a reader of 6 grown to 14 (new outputs fresh), of 128² to a bigger size (a fine
        # branch whose way into the body starts at zero)
        reader.grow_from({k: v.float() for k, v in own.items()})
        reader.ready.zero_()  # ready again only once this run has finished
        prev = meta.get("head_reader")
        before = prev if isinstance(prev, dict) else {}
    opt = torch.optim.AdamW(reader.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps)
    want = {
        "steps": (a.steps, None),
        "seed": (a.seed, None),
        "size": (size, 128),
        "fields": (fields, HEAD_DIMS),
    }
    parts = {"reader": reader, "opt": opt, "sched": sched}
    step = resume_part(ckpt, run_dir, a.resume, "reader", want, parts)
    from training.world import train_ids

    ids = train_ids(cfg.world)
    log = MetricsLog(run_dir)

    def checkpoint() -> None:
        state: dict[str, Any] = {
            "kind": "reader",
            "step": step,
            "steps": a.steps,
            "seed": a.seed,
            "size": size,
            "fields": fields,
            "reader": reader.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
        }
        save_checkpoint(ckpt, state, cfg)

    bar = tqdm(total=a.steps, initial=step, desc="reader", unit="step")
    t0, done0 = time.perf_counter(), step
    while step < a.steps:
        step += 1
        rng, _ = step_rngs(a.seed, step, 0)
        x, y = reader_batch(cfg.world, ids, rng, a.batch, fields=fields)
        loss = F.smooth_l1_loss(reader(x), y, beta=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 10 == 0:
            rate = (step - done0) * a.batch / (time.perf_counter() - t0)
            log.log(step, {"loss": float(loss), "frames_per_s": rate})
        if step % a.ckpt_every == 0 or step == a.steps:
            checkpoint()
    bar.close()
    reader.eval()
    reader.ready.fill_(1.0)
    acc = evaluate_reader(reader, cfg.world)
    s1 = dataclasses.replace(
        cfg.stage1, head_reader=True, head_reader_size=size, head_reader_fields=fields
    )
    cfg = dataclasses.replace(cfg, stage1=s1)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("head_reader.")}
    tensors |= {f"head_reader.{k}": v for k, v in reader.state_dict().items()}
    record: dict[str, Any] = {
        "steps": a.steps,
        "batch": a.batch,
        "seed": a.seed,
        "lr": a.lr,
        "size": size,
        "fields": fields,
    }
    prev_run = before or {}
    record["total_steps"] = a.steps + int(prev_run.get("total_steps", prev_run.get("steps", 0)))
    if before is not None:
        record["warm_from"] = before
    meta = dict(meta, head_reader=record | acc)
    save_weights(a.out, tensors, cfg, kind="stage1", dtype=torch.float16, meta=meta)
    print(json.dumps(acc))
    return 0


if __name__ == "__main__":
    from training.common import recipe_main

    recipe_main("training.reader", add_args, run)
