"""Stage-1 training recipe: the identity-decoupled motion representation.

    livehead train stage1 --config tiny --run-dir runs/stage1            # synthetic world
    livehead train stage1 --config tiny --run-dir runs/s1 --resume       # continue exactly
    torchrun --nproc_per_node 4 -m training.stage1 --config paper --run-dir runs/p1   # multi-GPU

Loss (ARCHITECTURE.md §2): L1 + 0.1·perceptual + 1·adversarial (non-saturating, StyleGAN2 D with
lazy R1) + 0.1·CLUB MI upper bound(z_id, z_m) + 0.1·AAM-softmax(z_id; m 0.2, s 30), plus the
optional synthetic-world accelerator ``w_aux_motion`` (alpha regressed onto the world's
standardised ground-truth motion, by a learned linear read-out or, with ``aux_motion_direct``,
alpha's first components themselves; off in the paper recipe). Three optimisers: generator side
(E, heads, LMD, G, AAM centres), discriminator, CLUB estimator; they alternate each step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from engine.config import Config, TrainStage1Config, add_config_args, load_config
from engine.errors import UserError
from engine.models.stage1 import CLUB, ArcMarginProduct, Discriminator, Stage1Model
from engine.weights import save_weights
from training.common import (
    EMA,
    DistInfo,
    MetricsLog,
    StopRequest,
    allreduce_grads,
    cleanup_distributed,
    init_distributed,
    load_checkpoint,
    recipe_main,
    save_checkpoint,
    step_rngs,
    truncate_metrics,
    unwrap,
    write_ddp_fingerprint,
)
from training.losses import d_logistic, g_nonsat, make_perceptual, psnr, r1_penalty
from training.stage1_data import (
    AUX_FIELDS,
    DirectReadout,
    RealPairs,
    Stage1Batch,
    SyntheticPairs,
    aux_stats,
    region_weights,
    relative_head,
    step_loader,
)


def generator_lr(t: TrainStage1Config, step: int) -> float:
    """The generator's learning rate at ``step`` (1-based): linear warm-up over
    ``warmup_steps``, then constant, or a cosine down to ``lr_final`` ending at
    ``lr_decay_steps`` when that is set."""
    lr = t.lr
    if t.lr_decay_steps > t.warmup_steps:
        span = t.lr_decay_steps - t.warmup_steps
        done = min(1.0, max(0.0, (step - t.warmup_steps) / span))
        lr = t.lr_final + (t.lr - t.lr_final) * 0.5 * (1.0 + math.cos(math.pi * done))
    if t.warmup_steps:
        lr *= min(1.0, step / t.warmup_steps)
    return lr


class GeneratorStep(nn.Module):
    """Everything the generator-side loss needs in one forward, so DDP can wrap it."""

    def __init__(
        self,
        model: Stage1Model,
        aam: ArcMarginProduct,
        aux: nn.Module | None,
        renderer_only: bool = False,
        teacher_rest: str = "source",
    ):
        super().__init__()
        self.model = model
        self.aam = aam
        self.aux = aux
        self.renderer_only = renderer_only
        self.teacher_rest = teacher_rest

    def forward(
        self,
        b: Stage1Batch,
        teacher: torch.Tensor | None = None,
        use: torch.Tensor | None = None,
        teacher_src: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """teacher (B, k) / use (B,) bool: render item i with alpha's first k components set to
        teacher[i] where use[i] (flagged teacher forcing; None: the encoder's alpha).
        teacher_src (B, k): the source's true values; given, the head's place and pose
        become teacher - teacher_src + the encoder's source reading (``relative_head``,
        ``train.stage1.teacher_head = "relative"``)."""
        use_neg = b.negative is not None
        extra = b.augmented if b.negative is None else torch.cat([b.augmented, b.negative])
        render_alpha = None
        if teacher is not None and use is not None:
            k = teacher.shape[1]
            rest_from_source = self.teacher_rest == "source"

            def render_alpha(a: torch.Tensor, a_src: torch.Tensor) -> torch.Tensor:
                forced = teacher.to(a.dtype)
                if teacher_src is not None:
                    forced = relative_head(forced, teacher_src, a_src)
                head = torch.where(use[:, None], forced, a[:, :k])
                rest = a[:, k:]
                if rest_from_source:
                    rest = torch.where(use[:, None], a_src[:, k:].to(a.dtype), rest)
                return torch.cat([head, rest], dim=1)

        if self.renderer_only:
            return self._render_only(b, render_alpha)
        out = self.model(b.source, b.target, extra, render_alpha)
        n = b.source.shape[0]
        assert out.z_id_extra is not None and out.z_m_extra is not None
        # identity classes: source, target (same identity, other motion), augmented, negative
        z_id = torch.cat([out.z_id_src, out.z_id_tgt, out.z_id_extra], dim=0)  # type: ignore[list-item]
        labels = [b.label_source, b.label_source, b.label_source]
        if use_neg:
            labels.append(b.label_negative)
        lab = torch.cat(labels)
        # CLUB pairs: codes of the unaugmented images (augmentation is for the identity branch)
        z_m = [out.z_m_src, out.z_m_tgt] + ([out.z_m_extra[n:]] if use_neg else [])
        z_i = [out.z_id_src, out.z_id_tgt] + ([out.z_id_extra[n:]] if use_neg else [])
        # CLUB sees the codes on a sphere of radius sqrt(d): bounded, so the encoder cannot
        # drive the MI upper bound to -inf by inflating z_m (unnormalised codes diverged here).
        scale = float(out.z_m_src.shape[1]) ** 0.5
        res = {
            "recon": out.recon,
            "z_id": F.normalize(torch.cat(z_i, dim=0).float(), dim=1) * scale,
            "z_m": F.normalize(torch.cat(z_m, dim=0).float(), dim=1) * scale,
            "metric": F.cross_entropy(self.aam(z_id, lab), lab),
            "alpha_tgt": out.alpha_tgt,
            "mask_means": out.mask_means,
        }
        if self.aux is not None:
            res["aux_pred"] = self.aux(out.alpha_tgt.float())
            res["aux_pred_src"] = self.aux(out.alpha_src.float())
        return res

    def _render_only(
        self,
        b: Stage1Batch,
        render_alpha: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """The renderer-only phase: frozen encoding of source and target (no extras), the
        target rendered from the source."""
        m, n = self.model, b.source.shape[0]
        with torch.no_grad():
            h, feats = m.encode(torch.cat([b.source, b.target]))
            both = m.motion(h)
        alpha = both[n:]
        if render_alpha is not None:
            alpha = render_alpha(alpha, both[:n])
        recon, _, masks = m.renderer.forward_aux(
            m.latent(h[:n], alpha), [f[:n] for f in feats], alpha, both[:n]
        )
        return {
            "recon": recon,
            "mask_means": torch.stack([k.detach().float().mean() for k in masks]),
        }


@dataclass
class Stage1Options:
    run_dir: Path
    resume: bool = False
    steps: int | None = None  # stop after this global step (default: config)
    data: str = "synthetic"  # or a directory made by `livehead data prepare`
    device: str = "auto"
    threads: int = 0
    export_every: int = 0  # also write the EMA weights as safetensors every N steps
    init_from: str | None = None  # warm start from stage-1 safetensors (fresh optimisers)
    workers: int = 0  # loader processes drawing batches ahead (0: drawn in the training loop)


class Stage1Trainer:
    def __init__(self, cfg: Config, opts: Stage1Options, dist_info: DistInfo):
        self.cfg, self.opts, self.dist = cfg, opts, dist_info
        t = cfg.train.stage1
        self.t = t
        if t.lr_decay_steps < 0 or not (0.0 <= t.lr_final <= t.lr):
            raise UserError(
                "train.stage1: lr_decay_steps must be >= 0 and lr_final in [0, lr], got "
                f"{t.lr_decay_steps} and {t.lr_final}"
            )
        dev = dist_info.device
        size = cfg.stage1.image_size
        if opts.data == "synthetic":
            self.data: SyntheticPairs | RealPairs = SyntheticPairs(
                cfg.world,
                size,
                t.near_pairs,
                t.near_amount,
                t.closed_source,
                negatives=t.negatives and not t.renderer_only,  # else they go unused
                expression_pairs=t.expression_pairs,
                placed_heads=t.placed_heads,
                placed_apart=t.placed_apart,
                avatar_sources=t.avatar_sources,
                mouth_pairs=t.mouth_pairs,
                mouth_pairs_moved=t.mouth_pairs_moved,
                clip_pairs=t.clip_pairs,
            )
        else:
            self.data = RealPairs(Path(opts.data), size)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = Stage1Model(cfg.stage1).to(dev)
        # the training record of a trained head reader carried from --init-from (it stays frozen
        # here, so the record still describes it in every export)
        self.reader_meta: dict[str, Any] | None = None
        if opts.init_from and not opts.resume:
            self._warm_start(Path(opts.init_from))
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.aam = ArcMarginProduct(
            cfg.stage1.latent_dim, self.data.num_classes, t.aam_margin, t.aam_scale
        ).to(dev)
        use_aux = t.w_aux_motion > 0 and isinstance(self.data, SyntheticPairs)
        if cfg.stage1.head_warp and not (use_aux and t.aux_motion_direct):
            raise UserError(
                "stage1.head_warp reads alpha[0:6] as the synthetic world's head pose, place "
                "and size, which only train.stage1.aux_motion_direct (with w_aux_motion > 0, "
                "synthetic data) teaches; for real data or the paper recipe "
                "--set stage1.head_warp=false"
            )
        self.aux: nn.Module | None = None
        if use_aux and t.aux_motion_direct:
            if cfg.stage1.motion_dim < len(AUX_FIELDS):
                raise UserError(
                    f"train.stage1.aux_motion_direct needs stage1.motion_dim >= "
                    f"{len(AUX_FIELDS)} (the world's motion fields), got {cfg.stage1.motion_dim}"
                )
            self.aux = DirectReadout(len(AUX_FIELDS))
        elif use_aux:
            self.aux = nn.Linear(cfg.stage1.motion_dim, len(AUX_FIELDS)).to(dev)
        mean, std = aux_stats()
        self.aux_mean = torch.tensor(mean, device=dev)
        self.aux_std = torch.tensor(std, device=dev)
        self.disc = Discriminator(size, t.disc_channels, cfg.stage1.blur_kernel).to(dev)
        self.club = CLUB(cfg.stage1.latent_dim, cfg.stage1.club_hidden).to(dev)
        self.perceptual: nn.Module = make_perceptual(t.vgg_path).to(dev)
        if self.model.head_reader is not None:
            # trained by `livehead train reader` alone; carried unchanged (and kept out of DDP)
            self.model.head_reader.requires_grad_(False)
        if self.model.fast_head is not None:  # likewise (`livehead train fast`)
            self.model.fast_head.requires_grad_(False)
        if t.renderer_only:
            # frozen before DDP is built: it registers only what still trains
            for part in (
                self.model.encoder,
                self.model.identity_head,
                self.model.motion_head,
                self.model.lmd,
                self.aam,
            ):
                part.requires_grad_(False)
            if self.aux is not None:
                self.aux.requires_grad_(False)
        if t.teacher_head not in ("absolute", "relative"):
            raise UserError(
                "train.stage1.teacher_head must be 'absolute' or 'relative', "
                f"got '{t.teacher_head}'"
            )
        if t.teacher_rest not in ("source", "target"):
            raise UserError(
                f"train.stage1.teacher_rest must be 'source' or 'target', got '{t.teacher_rest}'"
            )
        self.gstep: nn.Module = GeneratorStep(
            self.model, self.aam, self.aux, t.renderer_only, t.teacher_rest
        )
        self.dstep: nn.Module = self.disc
        self.cstep: nn.Module = self.club
        if dist_info.enabled:
            ids = [dist_info.local_rank] if dev.type == "cuda" else None
            self.gstep = DDP(self.gstep, device_ids=ids)
            self.dstep = DDP(self.disc, device_ids=ids)
            self.cstep = DDP(self.club, device_ids=ids)
        g_params = list(unwrap(self.gstep).parameters())
        beta1, beta2 = t.betas
        self.opt_g = torch.optim.Adam(g_params, lr=t.lr, betas=(beta1, beta2))
        # StyleGAN2 lazy regularisation: D is regularised every d_reg_every steps, so its lr and
        # betas are rescaled by c = k/(k+1) to keep the effective optimiser the same.
        c = t.d_reg_every / (t.d_reg_every + 1)
        self.opt_d = torch.optim.Adam(
            self.disc.parameters(), lr=t.lr * c, betas=(beta1**c, beta2**c)
        )
        self.opt_club = torch.optim.Adam(self.club.parameters(), lr=t.club_lr)
        self.ema = EMA(self.model, t.ema_decay)
        self.step = 0
        self.log = MetricsLog(opts.run_dir, enabled=dist_info.is_main)
        self.ckpt_path = opts.run_dir / "checkpoint.pt"
        if opts.resume:
            self.load()

    def _warm_start(self, path: Path) -> None:
        """Generator weights from a safetensors export (e.g. the bundled model): the EMA copy
        becomes the starting point; optimisers, D and CLUB start fresh. The step count restarts
        at 0, so under the seed of the run that made the file the batches repeat (a note says
        so)."""
        from engine.weights import load_into, load_weights

        tensors, saved, meta = load_weights(path, "stage1")
        own = self.cfg.stage1
        same = dataclasses.replace(
            saved.stage1,
            paint=own.paint,
            inject=own.inject,
            detail=own.detail,
            head_warp=own.head_warp,
            head_reader=own.head_reader,
            head_reader_size=own.head_reader_size,
            head_reader_fields=own.head_reader_fields,
            fast_head=own.fast_head,
        )
        if same != own:
            raise UserError(f"--init-from {path}: trained with another [stage1] config")
        if own.head_reader and saved.stage1.head_reader:
            for key in ("head_reader_size", "head_reader_fields"):
                theirs, ours = getattr(saved.stage1, key), getattr(own, key)
                if theirs != ours:
                    raise UserError(
                        f"--init-from {path}: its stage1.{key} is {theirs}, this config's "
                        f"{ours} (--set stage1.{key}={theirs})"
                    )
        # renderer extensions the file lacks keep their fresh init (zero where it matters):
        # the same output as the file's model
        marks = {
            "paint": ".paint.",
            "inject": ".injects.",
            "detail": ".detail.",
            "head_warp": ".head_warps.",
            "head_reader": "head_reader.",
            "fast_head": "fast_head.",
        }
        new = [m for f, m in marks.items() if getattr(own, f) and not getattr(saved.stage1, f)]
        if not own.head_reader:  # a reader the config leaves out is dropped (it renders nothing)
            tensors = {k: v for k, v in tensors.items() if not k.startswith("head_reader.")}
        elif saved.stage1.head_reader and isinstance(meta.get("head_reader"), dict):
            self.reader_meta = meta["head_reader"]
        if not own.fast_head:  # likewise a draft exit (`livehead train fast` makes a new one)
            tensors = {k: v for k, v in tensors.items() if not k.startswith("fast_head.")}
        fresh = {k: v for k, v in self.model.state_dict().items() if any(m in k for m in new)}
        tensors = {**fresh, **tensors}
        load_into(self.model, tensors, str(path))
        self.model.lmd.unfreeze()  # training re-orthonormalises from the weight every step
        seed = self.cfg.train.seed
        if self.dist.is_main and meta.get("seed", seed) == seed and self.opts.data == "synthetic":
            # batches are a function of (train.seed, step): a warm start that restarts the step
            # count under the seed of the run it comes from draws that run's batches again
            made = "was made" if "seed" in meta else "may have been made (not recorded)"
            print(
                f"note: --init-from {path.name} {made} with train.seed {seed}: batches follow "
                "the seed and the step number, so this run would see that run's batches again; "
                "--set train.seed=N for new ones",
                file=sys.stderr,
            )

    # ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "aam": self.aam.state_dict(),
            "aux": self.aux.state_dict() if self.aux is not None else None,
            "disc": self.disc.state_dict(),
            "club": self.club.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "opt_club": self.opt_club.state_dict(),
            "ema": self.ema.state_dict(),
            "perceptual": getattr(self.perceptual, "kind", "?"),
            "data": self.opts.data,
            "reader_meta": self.reader_meta,
        }

    def save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, self.state(), self.cfg)

    def load(self) -> None:
        if not self.ckpt_path.exists():
            raise UserError(f"--resume: no checkpoint at {self.ckpt_path}")
        st, saved_cfg = load_checkpoint(self.ckpt_path)
        if saved_cfg.stage1 != self.cfg.stage1:
            raise UserError(
                f"{self.ckpt_path} was trained with another stage1 config "
                f"('{saved_cfg.name}'); resume with the same --config"
            )
        self.model.load_state_dict(st["model"])
        self.aam.load_state_dict(st["aam"])
        if self.aux is not None and st.get("aux") is not None:
            self.aux.load_state_dict(st["aux"])
        self.disc.load_state_dict(st["disc"])
        self.club.load_state_dict(st["club"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_d.load_state_dict(st["opt_d"])
        self.opt_club.load_state_dict(st["opt_club"])
        self.ema.load_state_dict(st["ema"])
        self.step = int(st["step"])
        self.reader_meta = st.get("reader_meta")
        truncate_metrics(self.opts.run_dir, self.step)

    def export(self, path: Path, which: str = "ema") -> None:
        """The generator (EMA or raw weights) as fp16 safetensors, Q frozen so inference never
        re-runs QR."""
        if not self.dist.is_main:
            return
        m = Stage1Model(self.cfg.stage1)
        m.load_state_dict(self.ema.state_dict() if which == "ema" else self.model.state_dict())
        m.lmd.freeze()
        save_weights(
            path,
            m.state_dict(),
            self.cfg,
            kind="stage1",
            dtype=torch.float16,
            meta={
                "step": self.step,
                "perceptual": getattr(self.perceptual, "kind", "?"),
                "data": self.opts.data,
                "aux_motion_loss": self.t.w_aux_motion if self.aux is not None else 0.0,
                "aux_motion_direct": bool(self.aux is not None and self.t.aux_motion_direct),
                "teacher_alpha": self.t.teacher_alpha
                if isinstance(self.aux, DirectReadout)
                else 0.0,
                "teacher_rest": self.t.teacher_rest,
                "teacher_head": self.t.teacher_head,
                "region_weight": self.t.region_weight if self.opts.data == "synthetic" else 0.0,
                "renderer_only": self.t.renderer_only,
                "closed_source": self.t.closed_source if self.opts.data == "synthetic" else 0.0,
                "expression_pairs": (
                    self.t.expression_pairs if self.opts.data == "synthetic" else 0.0
                ),
                "avatar_sources": self.t.avatar_sources if self.opts.data == "synthetic" else 0.0,
                "w_l2": self.t.w_l2,
                "w_perceptual": self.t.w_perceptual,
                "mouth_pairs": self.t.mouth_pairs if self.opts.data == "synthetic" else 0.0,
                "placed_apart": self.t.placed_apart if self.opts.data == "synthetic" else 0.0,
                "mouth_pairs_moved": (
                    self.t.mouth_pairs_moved if self.opts.data == "synthetic" else 0.0
                ),
                "clip_pairs": self.t.clip_pairs if self.opts.data == "synthetic" else 0.0,
                "weights": which,
                "seed": self.cfg.train.seed,
            }
            | ({"head_reader": self.reader_meta} if self.reader_meta else {}),
        )

    # ---------------------------------------------------------------------------------------
    def _to(self, b: Stage1Batch) -> Stage1Batch:
        dev = self.dist.device
        fmt = torch.channels_last if self.t.channels_last else torch.contiguous_format

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            x = x.to(dev, non_blocking=True)
            return x.contiguous(memory_format=fmt) if x.dim() == 4 else x

        b = Stage1Batch(*(move(x) for x in vars(b).values()))  # type: ignore[arg-type]
        if not self.t.negatives:
            b.negative = None  # real data reads them anyway (cheap); the world skips drawing them
        return b

    def _autocast(self):
        dev = self.dist.device.type
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.t.bf16)

    def train_step(
        self, drawn: tuple[int, Stage1Batch, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """One step. ``drawn``: (step, batch, generator state) from ``step_loader`` (the
        values this step would draw itself)."""
        t = self.t
        step = self.step + 1
        rng, g = step_rngs(self.cfg.train.seed, step, self.dist.rank)
        if drawn is None:
            b = self._to(self.data.sample(rng, g, t.batch_size))
        else:
            if drawn[0] != step:
                raise RuntimeError(f"loader out of step: batch of step {drawn[0]} at {step}")
            b = self._to(drawn[1])
            g.set_state(drawn[2])
        use_adv = t.w_adv > 0 and step > t.adv_start_step
        logs: dict[str, float] = {}

        # 1) generator side ---------------------------------------------------------------
        self.disc.requires_grad_(False)
        self.club.requires_grad_(False)
        with self._autocast():
            teacher = use = true = teacher_src = None
            if self.aux is not None and b.gt_target is not None:
                # standardised true motion of target and, if known, source (the aux targets)
                gts = [b.gt_target] + ([b.gt_source] if b.gt_source is not None else [])
                true = (torch.cat(gts) - self.aux_mean) / self.aux_std
                if isinstance(self.aux, DirectReadout) and t.teacher_alpha > 0:
                    # flagged accelerator: some items render with the true motion in alpha
                    teacher = true[: b.gt_target.shape[0]]
                    if t.teacher_head == "relative":
                        # synthetic pairs always carry the source's truth (true's second half)
                        assert b.gt_source is not None
                        teacher_src = true[b.gt_target.shape[0] :]
                    use = torch.rand(teacher.shape[0], generator=g).to(teacher.device)
                    use = use < t.teacher_alpha
                    logs["teacher_frac"] = float(use.float().mean())
            out = self.gstep(b, teacher, use, teacher_src)
            recon = out["recon"].float()
            err = (recon - b.target).abs()
            l1 = err.mean()
            w = None
            if t.region_weight > 0 and b.regions is not None:
                # flagged synthetic-world accelerator: mouth and eyes weigh more
                w = region_weights(b.regions, recon.shape[-1], t.region_weight)
                l1_loss = (err * w).mean()
                logs["l1_region"] = float(l1_loss.detach())
            else:
                l1_loss = l1
            perc = self.perceptual(recon, b.target)
            loss = t.w_l1 * l1_loss + t.w_perceptual * perc
            if t.w_l2 > 0:
                sq = 4.0 * err.square()
                l2 = (sq * w).mean() if w is not None else sq.mean()
                loss = loss + t.w_l2 * l2
                logs["l2"] = float(l2.detach())
            mi = None
            if not t.renderer_only:
                loss = loss + t.w_metric * out["metric"]
                mi = unwrap(self.cstep).mi_upper(out["z_id"], out["z_m"])
                # MI is >= 0: a negative CLUB estimate is the estimator lagging the encoders,
                # and descending it only teaches the encoders to fool q (seen: -300 in 80 steps).
                loss = loss + t.w_mi * mi.clamp_min(0.0)
            if use_adv:
                adv = g_nonsat(self.disc(recon))
                loss = loss + t.w_adv * adv
                logs["g_adv"] = float(adv.detach())
            if true is not None and not t.renderer_only:
                # the encoder's readings (never the teacher's) of target and, if known, source
                pred = [out["aux_pred"]] + (
                    [out["aux_pred_src"]] if b.gt_source is not None else []
                )
                aux = F.mse_loss(torch.cat(pred).float(), true)
                loss = loss + t.w_aux_motion * aux
                logs["aux_motion"] = float(aux.detach())
        if not torch.isfinite(loss):
            raise UserError(
                f"stage-1 loss became {float(loss.detach())} at step {step}; lower the learning "
                "rate or resume from the last checkpoint"
            )
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if t.warmup_steps or t.lr_decay_steps:
            for group in self.opt_g.param_groups:
                group["lr"] = generator_lr(t, step)
        self.opt_g.step()
        self.ema.update(self.model, step)
        self.disc.requires_grad_(True)
        self.club.requires_grad_(True)

        # 2) CLUB estimator: maximise log q(z_m | z_id) on detached codes -----------------
        club_loss = None
        if not t.renderer_only:
            mu, logvar = self.cstep(out["z_id"].detach().float())  # through DDP if distributed
            z_m = out["z_m"].detach().float()
            club_loss = ((z_m - mu) ** 2 / logvar.exp() + logvar).sum(1).mean() / 2  # -log q
            self.opt_club.zero_grad(set_to_none=True)
            club_loss.backward()
            self.opt_club.step()

        # 3) discriminator ----------------------------------------------------------------
        if use_adv:
            with self._autocast():
                d_loss = d_logistic(self.dstep(b.target), self.dstep(recon.detach()))
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            logs["d_loss"] = float(d_loss.detach())
            if step % t.d_reg_every == 0:
                # R1 needs a double backward, which DDP does not support: run the plain module
                # and average its gradients by hand.
                real = b.target.detach().requires_grad_(True)
                r1 = r1_penalty(self.disc(real), real)
                self.opt_d.zero_grad(set_to_none=True)
                (t.r1 / 2 * r1 * t.d_reg_every).backward()
                allreduce_grads(self.disc, self.dist)
                self.opt_d.step()
                logs["r1"] = float(r1.detach())

        self.step = step
        with torch.no_grad():
            logs.update(
                loss=float(loss.detach()),
                l1=float(l1.detach()),
                perceptual=float(perc.detach()),
                psnr=float(psnr(recon, b.target).mean()),
                psnr_copy=float(psnr(b.source, b.target).mean()),
            )
            if mi is not None and club_loss is not None:
                logs.update(
                    mi=float(mi.detach()),
                    metric=float(out["metric"].detach()),
                    club_nll=float(club_loss.detach()),
                )
            if out.get("mask_means") is not None:
                sizes = unwrap(self.model).renderer.sizes[1:]
                logs.update({f"mask_{r}": float(m) for r, m in zip(sizes, out["mask_means"])})
        return logs

    def fit(self) -> None:
        from tqdm import tqdm

        total = self.opts.steps if self.opts.steps is not None else self.t.steps
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not self.dist.is_main,
            desc="stage1",
            dynamic_ncols=True,
        )
        t0, n0 = time.time(), self.step
        stop = StopRequest(enabled=not self.dist.enabled)
        ahead = None
        if self.opts.workers > 0 and self.step < total:
            ahead = step_loader(
                self.data,
                self.cfg.train.seed,
                self.dist.rank,
                self.t.batch_size,
                self.step + 1,
                total,
                self.opts.workers,
                pin=self.dist.device.type == "cuda",
            )
        try:
            with stop:
                while self.step < total and not stop.requested:
                    logs = self.train_step(next(ahead) if ahead is not None else None)
                    bar.update(1)
                    if self.step % self.t.log_every == 0 or self.step == total:
                        dt = time.time() - t0
                        sps = (
                            (self.step - n0)
                            * self.t.batch_size
                            * self.dist.world_size
                            / max(dt, 1e-9)
                        )
                        logs["samples_per_s"] = sps
                        self.log.log(self.step, logs)
                        bar.set_postfix(
                            l1=f"{logs['l1']:.3f}",
                            psnr=f"{logs['psnr']:.1f}",
                            copy=f"{logs['psnr_copy']:.1f}",
                            sps=f"{sps:.1f}",
                        )
                        t0, n0 = time.time(), self.step
                    if self.step % self.t.ckpt_every == 0 or self.step == total:
                        self.save()
                    if self.opts.export_every and self.step % self.opts.export_every == 0:
                        self.export(self.opts.run_dir / "stage1.safetensors")
        finally:
            if ahead is not None:
                ahead.close()  # stops the loader's workers before the final save and export
        bar.close()
        self.save()
        self.export(self.opts.run_dir / "stage1.safetensors")
        if os.environ.get("LIVEHEAD_DDP_CHECK") and self.dist.enabled:
            write_ddp_fingerprint(self.model, self.dist, self.opts.run_dir / "ddp_fingerprint.json")


def train(cfg: Config, opts: Stage1Options) -> Stage1Trainer:
    info = init_distributed(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if not math.isfinite(cfg.train.stage1.lr) or cfg.train.stage1.batch_size < 1:
        raise UserError("train.stage1: lr must be finite and batch_size >= 1")
    try:
        trainer = Stage1Trainer(cfg, opts, info)
        trainer.fit()
    finally:
        cleanup_distributed()
    return trainer


def add_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument(
        "--run-dir", dest="run", default="runs/stage1", help="run directory (checkpoint, metrics)"
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    p.add_argument("--steps", type=int, default=None, help="stop at this global step")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a prepared dataset dir")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes drawing batches ahead (0: in the loop; the same batches as the loop "
        "draws with --threads 1)",
    )
    p.add_argument("--export-every", type=int, default=0, help="write EMA safetensors every N")
    p.add_argument(
        "--init-from", default=None, help="warm start from stage-1 safetensors (new optimisers)"
    )
    p.add_argument(
        "--export",
        default=None,
        metavar="PATH",
        help="no training: write RUN/checkpoint.pt's weights to PATH (safetensors) and exit",
    )
    p.add_argument(
        "--export-weights",
        choices=["ema", "model"],
        default="ema",
        help="with --export: the EMA (default) or the raw weights",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.override)
    run_dir = Path(args.run)
    if args.resume and (run_dir / "checkpoint.pt").exists():
        _, saved = load_checkpoint(run_dir / "checkpoint.pt")
        if saved.stage1 != cfg.stage1:
            raise UserError(f"{run_dir}: checkpoint config differs from --config {args.config}")
    if args.export:
        ckpt = run_dir / "checkpoint.pt"
        if ckpt.exists():
            # the run's own config: the metadata must describe how it was trained (its train
            # settings can differ from --config's, e.g. a phase run with --set)
            _, cfg = load_checkpoint(ckpt)
        info = init_distributed("cpu")
        trainer = Stage1Trainer(cfg, Stage1Options(run_dir=run_dir, resume=True), info)
        trainer.export(Path(args.export), args.export_weights)
        print(f"wrote {args.export} ({args.export_weights} weights, step {trainer.step})")
        return 0
    opts = Stage1Options(
        run_dir=run_dir,
        resume=args.resume,
        steps=args.steps,
        data=args.data,
        device=args.device,
        threads=args.threads,
        export_every=args.export_every,
        init_from=args.init_from,
        workers=args.workers,
    )
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    train(cfg, opts)
    return 0


if __name__ == "__main__":  # torchrun -m training.stage1 ...
    recipe_main("training.stage1", add_args, run)
