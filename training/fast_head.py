"""Train the draft exit of a stage-1 model (``stage1.fast_head``, ``FastHead``).

    livehead train fast --init-from weights/stage1_tiny.safetensors \\
        --out runs/fast/stage1.safetensors --steps 1500

Everything else stays frozen. The head learns to draw what the full renderer draws (the
full render is the target: distillation, so the live stream's draft frames look like its full
frames) from the renderer's second-finest level and the portrait. A live server renders a
window by the draft exit only when a full render would make it late
(``server.render_deadline_ms``).

Pairs as video-driven reenactment makes them: a training identity's talking clip, its motion
read off 8 of its frames by the model (``engine.reenact``), rendered onto the clip's first
frame or, half the time, onto the identity's neutral portrait. Checkpoints
(``RUN_DIR/checkpoint.pt``) every ``--ckpt-every`` steps; ``--resume`` continues exactly (each
step's batch comes from its own seed). Metrics go to ``RUN_DIR/metrics.jsonl``. At the end the
draft and the full renderer are compared on held-out identities (PSNR against the world's
truth and against each other); the figures are printed and stored in the file's metadata.
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

from engine.errors import UserError
from engine.models.stage1 import FastHead, Stage1Model
from engine.reenact import anchor_offset, driving_alpha
from engine.tensors import to_tensor
from engine.weights import load_into, load_weights, save_weights
from training.common import (
    MetricsLog,
    add_part_trainer_args,
    resume_part,
    save_checkpoint,
    step_rngs,
)
from training.losses import psnr

CLIP_FRAMES = 40


def fast_batch(
    model: Stage1Model, world: Any, ids: np.ndarray, rng: np.random.Generator, frames: int
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One identity's pair: (h, feats, alpha (frames, motion_dim), source (1, 3, S, S), the
    world's truth (frames, 3, S, S)), everything computed without gradients."""
    from training.world import clip_motion_only, get_identity, render_frames
    from training.world.motion import neutral_motion

    size = model.cfg.image_size
    i = int(rng.choice(ids))
    ident = get_identity(world, i)
    motion = clip_motion_only(world, i, CLIP_FRAMES, rng)
    pick = np.sort(rng.choice(np.arange(1, CLIP_FRAMES), frames, replace=False))
    video = to_tensor(render_frames(ident, motion[np.concatenate([[0], pick])], size))
    anchor, truth = video[:1], video[1:]
    source = anchor
    if rng.random() < 0.5:  # the identity's portrait, as a live avatar is
        source = to_tensor(render_frames(ident, neutral_motion(1), size))
    with torch.no_grad():
        h, feats = model.encode(source)
        alpha = driving_alpha(model, truth, anchor_offset(model, source, h, anchor))
    return h, feats, alpha, source, truth


@torch.no_grad()
def evaluate_fast(model: Stage1Model, world: Any, n_ids: int = 8, frames: int = 16) -> dict:
    """Draft against full render on held-out identities (same pairs for both): PSNR of each
    against the world's truth, and of the draft against the full render."""
    from training.world import heldout_ids

    rng = np.random.default_rng(4321)
    ids = heldout_ids(world)[:n_ids]
    fast, full, agree = [], [], []
    for i in ids:
        h, feats, alpha, src, truth = fast_batch(model, world, np.array([i]), rng, frames)
        a = model.render_fast(h, feats, alpha, src)
        b = model.render(h, feats, alpha).clamp(-1, 1)
        fast.append(psnr(a, truth))
        full.append(psnr(b, truth))
        agree.append(psnr(a, b))
    return {
        "fast_psnr": round(float(torch.cat(fast).mean()), 3),
        "full_psnr": round(float(torch.cat(full).mean()), 3),
        "fast_vs_full_psnr": round(float(torch.cat(agree).mean()), 3),
        "eval_identities": int(n_ids),
        "eval_frames": int(n_ids * frames),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    add_part_trainer_args(
        p, "draft exit", "runs/fast", 1500, 8, "frames per step (one identity)", 2e-3
    )


def run(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    if a.steps < 1 or a.batch < 1 or a.ckpt_every < 1 or not a.lr > 0:
        raise UserError("--steps, --batch and --ckpt-every must be >= 1, --lr > 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    tensors, cfg, meta = load_weights(a.init_from, "stage1")
    if cfg.stage1.image_size < 16:
        raise UserError(f"{a.init_from}: a draft exit needs image_size >= 16")
    own = {k[len("fast_head.") :]: v for k, v in tensors.items() if k.startswith("fast_head.")}
    if a.warm_start and (not own or float(own["ready"]) < 0.5):
        raise UserError(f"--warm-start: {a.init_from} holds no trained fast head")
    cfg = dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, fast_head=True))
    torch.manual_seed(a.seed)  # the fresh head's first layer
    model = Stage1Model(cfg.stage1)
    model.lmd.freeze()
    rest = {k: v for k, v in tensors.items() if not k.startswith("fast_head.")}
    head = model.fast_head
    assert isinstance(head, FastHead)
    fresh = {f"fast_head.{k}": v for k, v in head.state_dict().items()}
    load_into(
        model,
        rest | ({f"fast_head.{k}": v for k, v in own.items()} if a.warm_start else fresh),
        a.init_from,
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head.ready.zero_()  # ready again only once this run has finished
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=a.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1
    )
    run_dir = Path(a.run_dir)
    ckpt = run_dir / "checkpoint.pt"
    want = {"steps": (a.steps, None), "seed": (a.seed, None), "batch": (a.batch, None)}
    parts = {"head": head, "opt": opt, "sched": sched}
    step = resume_part(ckpt, run_dir, a.resume, "fast_head", want, parts)
    from training.world import train_ids

    ids = train_ids(cfg.world)
    log = MetricsLog(run_dir)

    def checkpoint() -> None:
        state = {
            "kind": "fast_head",
            "step": step,
            "steps": a.steps,
            "seed": a.seed,
            "batch": a.batch,
            "head": head.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
        }
        save_checkpoint(ckpt, state, cfg)

    bar = tqdm(total=a.steps, initial=step, desc="fast head", unit="step")
    t0, done0 = time.perf_counter(), step
    while step < a.steps:
        step += 1
        rng, _ = step_rngs(a.seed, step, 0)
        h, feats, alpha, src, _ = fast_batch(model, cfg.world, ids, rng, a.batch)
        with torch.no_grad():
            target = model.render(h, feats, alpha).clamp(-1, 1)
        out = model.render_fast(h, feats, alpha, src)
        err = out - target
        loss = err.abs().mean() + 4.0 * err.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 10 == 0:
            rate = (step - done0) * a.batch / (time.perf_counter() - t0)
            agree = float(psnr(out.detach(), target).mean())
            log.log(step, {"loss": float(loss), "vs_full_psnr": agree, "frames_per_s": rate})
        if step % a.ckpt_every == 0 or step == a.steps:
            checkpoint()
    bar.close()
    head.ready.fill_(1.0)
    acc = evaluate_fast(model, cfg.world)
    tensors = rest | {f"fast_head.{k}": v for k, v in head.state_dict().items()}
    record: dict[str, Any] = {"steps": a.steps, "batch": a.batch, "seed": a.seed, "lr": a.lr}
    before = meta.get("fast_head")
    if a.warm_start and isinstance(before, dict):
        record["warm_from"] = before
    meta = dict(meta, fast_head=record | acc)
    save_weights(a.out, tensors, cfg, kind="stage1", dtype=torch.float16, meta=meta)
    print(json.dumps(acc))
    return 0


if __name__ == "__main__":
    from training.common import recipe_main

    recipe_main("training.fast_head", add_args, run)
