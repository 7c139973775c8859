"""What every training recipe shares: distributed setup (torchrun/DDP), per-step RNG, atomic
checkpoints with exact resume, EMA, JSONL metrics and a progress bar.

Exact resume rests on one rule: everything random in step ``s`` is drawn from generators seeded
by (run seed, s, rank), never from a global stream. A run that stops after step s and resumes
therefore computes the same steps s+1, s+2, ... as one that never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config, from_dict, to_dict
from engine.errors import UserError


# --------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class StopRequest:
    """SIGTERM/SIGINT during a single-process run: finish the current step, checkpoint, exit
    (a run stopped this way resumes exactly with --resume, losing nothing). Under torchrun the
    default handling stays (ranks must stop at the same step). Use as a context manager."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step (checkpoint first)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (RANK/WORLD_SIZE set).

    NCCL on CUDA, gloo on CPU; one process per GPU (LOCAL_RANK picks it). Without torchrun this
    is a single process and nothing is initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but no CUDA GPU is visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.clone()
        dist.all_reduce(x)
        x /= info.world_size
    return x


def allreduce_grads(module: torch.nn.Module, info: DistInfo) -> None:
    """Average gradients across ranks for a module that is not wrapped in DDP."""
    if not info.enabled:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= info.world_size


def write_ddp_fingerprint(module: torch.nn.Module, info: DistInfo, path: Path) -> None:
    """Test hook (LIVEHEAD_DDP_CHECK=1): every rank's weight checksum, gathered on rank 0 and
    written as JSON, so a test can see that the replicas agree."""
    fp = torch.tensor([sum(float(p.double().abs().sum()) for p in module.parameters())])
    got = [torch.zeros_like(fp) for _ in range(info.world_size)]
    dist.all_gather(got, fp)
    if info.is_main:
        path.write_text(json.dumps({str(i): float(g) for i, g in enumerate(got)}))


def recipe_main(prog: str, add_args, run) -> None:
    """``python -m training.stageN`` (what torchrun launches): parse, run, one-line errors."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog)
    add_args(parser)
    try:
        sys.exit(run(parser.parse_args()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------
# Randomness per step
# --------------------------------------------------------------------------------------------
def step_seed(run_seed: int, step: int, rank: int, stream: int = 0) -> int:
    ss = np.random.SeedSequence([run_seed, step, rank, stream])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1))


def step_rngs(run_seed: int, step: int, rank: int) -> tuple[np.random.Generator, torch.Generator]:
    """A numpy generator (data) and a torch generator (noise, shuffles) for one training step.

    Also reseeds torch's global generator (dropout and any other implicit randomness), so a
    resumed run repeats the same steps exactly."""
    torch.manual_seed(step_seed(run_seed, step, rank, 2))
    g = torch.Generator().manual_seed(step_seed(run_seed, step, rank, 1))
    return np.random.default_rng(step_seed(run_seed, step, rank, 0)), g


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's parameters and buffers (kept in fp32)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def decay_at(self, step: int | None) -> float:
        """Warm-up (1 + n) / (10 + n), as TF/timm do: with 0.9999 and no warm-up, an export
        after 10k steps would still be 37 % random initial weights."""
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        decay = self.decay_at(step)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1.0 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone().float() for k, v in sd.items()}


def unwrap(model: torch.nn.Module) -> Any:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict[str, Any], cfg: Config) -> None:
    """Atomic: write to a temp file, then rename, so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state, config=to_dict(cfg))
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    (path.parent / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))


def load_checkpoint(path: Path) -> tuple[dict[str, Any], Config]:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing error here
        raise UserError(f"{path}: not a readable livehead checkpoint ({e})") from None
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"{path}: not a livehead training checkpoint")
    return state, from_dict(migrate_config(state["config"]), where=str(path))


def migrate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config, with the settings that were added later set to what the
    run actually did (not to today's defaults)."""
    s1 = cfg.get("train", {}).get("stage1")
    if isinstance(s1, dict) and "teacher_rest" not in s1:
        # before train.stage1.teacher_rest existed, teacher forcing kept the target's reading
        s1 = dict(s1, teacher_rest="target")
        cfg = dict(cfg, train=dict(cfg["train"], stage1=s1))
    return cfg


# --------------------------------------------------------------------------------------------
# Metrics and progress
# --------------------------------------------------------------------------------------------
class MetricsLog:
    """One JSON object per line in ``run_dir/metrics.jsonl``; TensorBoard too if installed."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(run_dir / "tb"))
                except ImportError:
                    self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: round(float(v), 6) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint's step (they will be redone)."""
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return
    keep = [ln for ln in p.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    p.write_text("".join(ln + "\n" for ln in keep))


def add_part_trainer_args(
    p: Any, part: str, run_dir: str, steps: int, batch: int, batch_help: str, lr: float
) -> None:
    """The options shared by the trainers of one part of a stage-1 file (``livehead train
    reader``, ``livehead train fast``): the file in and out, run directory, schedule, seed,
    checkpoints, resume, warm start and threads."""
    from engine.weights import DEFAULT_STAGE1

    p.add_argument(
        "--init-from",
        default=str(DEFAULT_STAGE1),
        help=f"stage-1 weights to add the {part} to (default: the bundled tiny model)",
    )
    p.add_argument("--out", required=True, help=f"output stage-1 safetensors (input + {part})")
    p.add_argument("--run-dir", default=run_dir, help="checkpoint and metrics.jsonl")
    p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--batch", type=int, default=batch, help=batch_help)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (one-cycle)")
    p.add_argument("--seed", type=int, default=0, help="run seed")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint.pt")
    p.add_argument(
        "--warm-start",
        action="store_true",
        help=f"start from the trained {part} in --init-from instead of a fresh one "
        "(a new one-cycle schedule; use a lower --lr)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def resume_part(
    ckpt: Path,
    run_dir: Path,
    resume: bool,
    kind: str,
    want: dict[str, tuple[Any, Any]],
    parts: dict[str, Any],
) -> int:
    """Start or ``--resume`` a part trainer's run (``livehead train reader`` / ``fast``).
    want: option -> (this run's value, the value a checkpoint without it had); parts: state
    key -> object with load_state_dict (module, optimiser, schedule). Returns the step to go
    on from: 0 for a new run (refused where a checkpoint exists: it is never overwritten)."""
    if not resume:
        if ckpt.exists():
            raise UserError(f"{ckpt} exists: pass --resume to continue it or another --run-dir")
        return 0
    st, _ = load_checkpoint(ckpt)
    got = tuple(st.get(k, default) for k, (_, default) in want.items())
    if st.get("kind") != kind or got != tuple(v for v, _ in want.values()):
        flags = " ".join(f"--{k} {v}" for k, (v, _) in want.items())
        raise UserError(
            f"{ckpt}: not a {kind.replace('_', '-')} run with {flags} "
            f"(it has {', '.join(map(str, got))})"
        )
    for key, obj in parts.items():
        obj.load_state_dict(st[key])
    step = int(st["step"])
    truncate_metrics(run_dir, step)
    return step
