"""Stage-2 training recipe: the audio-driven motion generator.

    livehead train stage2 --config tiny --run-dir runs/s2 --extract-clips 400   # first run
    livehead train stage2 --config tiny --run-dir runs/s2 --resume              # continue exactly
    torchrun --nproc_per_node 4 -m training.stage2 --config paper --run-dir runs/p2

Frozen stage 1 (default: the bundled weights) gives per-frame h and α of synthetic clips (cached
in RUN/data.pt). α is normalised per dimension (min-max, 5 % margin; statistics stored in the
checkpoint). Each step draws windows exactly as inference forms them (training/stage2_data.py)
and minimises MSE on the noise of the W unknown frames + ``w_adapter`` · MSE of the variance
adapter's predictions. Adam 1e-4, grad clip 1, EMA; DDP through torchrun.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.config import Config, add_config_args, load_config
from engine.diffusion import DiffusionSchedule
from engine.errors import UserError
from engine.models.stage2 import Stage2Nets
from engine.weights import save_weights
from engine.windowing import WindowPlan
from training.common import (
    EMA,
    DistInfo,
    MetricsLog,
    StopRequest,
    cleanup_distributed,
    init_distributed,
    load_checkpoint,
    recipe_main,
    save_checkpoint,
    step_rngs,
    truncate_metrics,
    write_ddp_fingerprint,
)
from training.stage1_data import AUX_FIELDS
from training.stage2_data import Stage2Batch, WindowSampler, extract, load_clips


class Stage2Step(nn.Module):
    """One forward of the training loss, so DDP can wrap it."""

    def __init__(self, nets: Stage2Nets, schedule: DiffusionSchedule, plan: WindowPlan):
        super().__init__()
        self.nets = nets
        self.schedule = schedule
        self.plan = plan

    def forward(
        self, b: Stage2Batch, t: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.plan
        k, w, c = p.prefix_frames, p.window_frames, p.context_frames
        speech, pred = self.nets.encode(b.feats, b.controls, b.control_mask)
        speech = speech[:, c - k : c + w]
        x_t = self.schedule.q_sample(b.x0, t, noise)
        known = b.x0 * b.known_mask
        eps = self.nets.denoise(x_t, t, speech, b.ref_alpha, b.ref_h, known, b.known_mask)
        unknown = 1.0 - b.known_mask
        diff = F.mse_loss(eps * unknown, noise * unknown, reduction="sum") / (
            unknown.sum() * noise.shape[-1]
        )
        adapter = F.mse_loss(pred, b.gt_controls)
        return diff, adapter


@dataclass
class Stage2Options:
    run_dir: Path
    resume: bool = False
    steps: int | None = None
    stage1: str | None = None  # stage-1 safetensors (default: bundled)
    extract_clips: int = 200
    clip_seconds: float | None = None
    device: str = "auto"
    threads: int = 0


class Stage2Trainer:
    def __init__(self, cfg: Config, opts: Stage2Options, info: DistInfo):
        from engine.loading import load_stage1

        self.cfg, self.opts, self.dist = cfg, opts, info
        self.t = cfg.train.stage2
        s1, s1_cfg, s1_meta = load_stage1(opts.stage1)
        if s1_cfg.stage1 != cfg.stage1:
            raise UserError(
                f"the stage-1 weights were trained with config '{s1_cfg.name}', whose [stage1] "
                f"differs from --config {cfg.name}"
            )
        from engine.audio import LogMelFrontend

        f = LogMelFrontend(cfg.stage2.audio).frames_per_video_frame
        self.plan = WindowPlan.from_config(cfg.stage2, f)
        data_path = opts.run_dir / "data.pt"
        if not data_path.exists():
            if info.is_main:
                seconds = opts.clip_seconds or self.t.clip_seconds
                if self.t.world_alpha and not s1_meta.get("aux_motion_direct"):
                    raise UserError(
                        "train.stage2.world_alpha needs stage-1 weights trained with "
                        f"train.stage1.aux_motion_direct; {opts.stage1 or 'the bundled weights'} "
                        "were not"
                    )
                extract(
                    s1,
                    cfg,
                    data_path,
                    opts.extract_clips,
                    seconds,
                    seed=cfg.train.seed,
                    world_alpha=self.t.world_alpha,
                )
            if info.enabled:
                import torch.distributed as dist

                dist.barrier()
        self.clips = load_clips(data_path, cfg, self.plan)
        torch.manual_seed(cfg.train.seed)
        self.nets = Stage2Nets.from_config(cfg).to(info.device)
        self.nets.normalizer.fit(torch.cat([c.alpha for c in self.clips]), mode="minmax")
        self.schedule = DiffusionSchedule.linear(
            cfg.stage2.timesteps, cfg.stage2.beta_start, cfg.stage2.beta_end
        )
        self.sampler = WindowSampler(
            self.clips,
            self.plan,
            cfg,
            self.nets.normalizer,
            rest_from=len(AUX_FIELDS) if self.t.world_alpha else None,
        )
        self.step_mod: nn.Module = Stage2Step(self.nets, self.schedule, self.plan)
        if info.enabled:
            ids = [info.local_rank] if info.device.type == "cuda" else None
            self.step_mod = DDP(self.step_mod, device_ids=ids)
        self.opt = torch.optim.Adam(self.nets.parameters(), lr=self.t.lr)
        self.ema = EMA(self.nets, self.t.ema_decay)
        self.step = 0
        self.log = MetricsLog(opts.run_dir, enabled=info.is_main)
        self.ckpt_path = opts.run_dir / "checkpoint.pt"
        if opts.resume:
            self.load()

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "nets": self.nets.state_dict(),
            "opt": self.opt.state_dict(),
            "ema": self.ema.state_dict(),
        }

    def save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, self.state(), self.cfg)

    def load(self) -> None:
        if not self.ckpt_path.exists():
            raise UserError(f"--resume: no checkpoint at {self.ckpt_path}")
        st, saved = load_checkpoint(self.ckpt_path)
        if saved.stage2 != self.cfg.stage2 or saved.stage1 != self.cfg.stage1:
            raise UserError(f"{self.ckpt_path} was trained with another config ('{saved.name}')")
        self.nets.load_state_dict(st["nets"])
        self.opt.load_state_dict(st["opt"])
        self.ema.load_state_dict(st["ema"])
        self.step = int(st["step"])
        truncate_metrics(self.opts.run_dir, self.step)

    def export(self, path: Path) -> None:
        if not self.dist.is_main:
            return
        save_weights(
            path,
            self.ema.state_dict(),
            self.cfg,
            kind="stage2",
            dtype=torch.float16,
            meta={
                "step": self.step,
                "clips": len(self.clips),
                "stage1": str(self.opts.stage1),
                "world_alpha": self.t.world_alpha,
            },
        )

    def _to(self, b: Stage2Batch) -> Stage2Batch:
        return Stage2Batch(*(x.to(self.dist.device) for x in vars(b).values()))

    def train_step(self) -> dict[str, float]:
        step = self.step + 1
        rng, g = step_rngs(self.cfg.train.seed, step, self.dist.rank)
        b = self._to(
            self.sampler.sample(rng, self.t.batch_size, start_windows=self.t.start_windows)
        )
        bsz = b.x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (bsz,), generator=g).to(b.x0.device)
        noise = torch.randn(b.x0.shape, generator=g).to(b.x0.device)
        diff, adapter = self.step_mod(b, t, noise)
        loss = diff + self.t.w_adapter * adapter
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.nets.parameters(), self.t.grad_clip)
        self.opt.step()
        self.ema.update(self.nets, step)
        self.step = step
        return {
            "loss": loss.item(),
            "diffusion": diff.item(),
            "adapter": adapter.item(),
            "grad_norm": float(gn),
        }

    def fit(self) -> None:
        from tqdm import tqdm

        total = self.opts.steps if self.opts.steps is not None else self.t.steps
        bar = tqdm(total=total, initial=self.step, disable=not self.dist.is_main, desc="stage2")
        t0, n0 = time.time(), self.step
        stop = StopRequest(enabled=not self.dist.enabled)
        with stop:
            while self.step < total and not stop.requested:
                logs = self.train_step()
                bar.update(1)
                if self.step % self.t.log_every == 0 or self.step == total:
                    dt = max(time.time() - t0, 1e-9)
                    logs["windows_per_s"] = (self.step - n0) * self.t.batch_size / dt
                    self.log.log(self.step, logs)
                    bar.set_postfix(diff=f"{logs['diffusion']:.4f}", adapt=f"{logs['adapter']:.4f}")
                    t0, n0 = time.time(), self.step
                if self.step % self.t.ckpt_every == 0:
                    self.save()
                    self.export(self.opts.run_dir / "stage2.safetensors")
        bar.close()
        self.save()
        self.export(self.opts.run_dir / "stage2.safetensors")
        if os.environ.get("LIVEHEAD_DDP_CHECK") and self.dist.enabled:
            write_ddp_fingerprint(self.nets, self.dist, self.opts.run_dir / "ddp_fingerprint.json")


def add_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--run-dir", dest="run", default="runs/stage2", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--steps", type=int, default=None, help="stop at this global step")
    p.add_argument("--stage1", default=None, help="stage-1 safetensors (default: bundled)")
    p.add_argument("--extract-clips", type=int, default=200, help="clips to render and encode")
    p.add_argument("--clip-seconds", type=float, default=None, help="seconds per clip")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.override)
    if args.extract_clips < 1:
        raise UserError("--extract-clips must be at least 1")
    info = init_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = Stage2Options(
        run_dir=Path(args.run),
        resume=args.resume,
        steps=args.steps,
        stage1=args.stage1,
        extract_clips=args.extract_clips,
        clip_seconds=args.clip_seconds,
        device=args.device,
        threads=args.threads,
    )
    try:
        trainer = Stage2Trainer(cfg, opts, info)
        trainer.fit()
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":  # torchrun -m training.stage2 ...
    recipe_main("training.stage2", add_args, run)
