"""An independent judge for stage-2 evaluation: a small CNN that reads mouth opening and head
pose off a frame, trained on the synthetic world's frames and exact ground truth.

    livehead train probe --out weights/probe.safetensors --steps 3000

It never sees the generator's output in training, so it measures generated video the same way
it measures real renderings of the world. Its own accuracy is measured on held-out identities
(``evaluate_probe``) and reported next to every stage-2 evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import WorldConfig, load_config
from engine.errors import UserError
from engine.models.layers import plain_cnn
from engine.tensors import to_tensor

PROBE_FIELDS = ("mouth_open", "yaw", "pitch", "roll")
# yaw/pitch/roll are degrees/90 (about +-0.4): scale them up so each target has unit-ish range.
_TARGET_SCALE = torch.tensor([1.0, 2.5, 2.5, 2.5])
PROBE_SIZE = 128
# the bundled judge of `livehead eval stage2` (and of the drawn-motion figures of `eval stage1`)
PROBE_PATH = Path(__file__).resolve().parent.parent / "weights" / "probe.safetensors"


class Probe(nn.Module):
    """(B, 3, 128, 128) in [-1, 1] -> (B, 4): mouth_open [0, 1], yaw/pitch/roll (degrees/90)."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 3, width * 4, width * 6]
        self.body = plain_cnn(chans)
        self.head = nn.Linear(chans[-1] * 4 * 4, len(PROBE_FIELDS))
        self.register_buffer("scale", _TARGET_SCALE.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != PROBE_SIZE:
            x = F.interpolate(x, size=PROBE_SIZE, mode="bilinear", antialias=True)
        y = self.body(x)  # (B, C, 4, 4)
        return self.head(y.flatten(1)) / self.scale


def _batch(
    world: WorldConfig,
    ids: np.ndarray,
    rng: np.random.Generator,
    n: int,
    size: int,
    placed: float = 0.0,
):
    """n frames of random identities in random poses; a share ``placed`` of them with the head
    placed as in a talking clip (``training.world.place_like_a_clip``)."""
    from training.world import get_identity, place_like_a_clip, random_motion, render_frames

    imgs, ys = [], []
    for _ in range(n):
        ident = get_identity(world, int(rng.choice(ids)))
        m = random_motion(rng, 1)
        if rng.random() < placed:
            place_like_a_clip(ident, m, rng)
        imgs.append(render_frames(ident, m, size)[0])
        ys.append([float(m[f][0]) for f in PROBE_FIELDS])
    return to_tensor(np.stack(imgs)), torch.tensor(ys, dtype=torch.float32)


def train_probe(
    world: WorldConfig,
    steps: int,
    batch: int = 32,
    seed: int = 0,
    log=print,
    placed: float = 0.5,
):
    from training.world import train_ids

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    probe = Probe()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    ids = train_ids(world)
    for step in range(1, steps + 1):
        # render at 256 like the generator's output, the probe downsamples to 128 itself
        x, y = _batch(world, ids, rng, batch, 256, placed)
        loss = F.smooth_l1_loss(probe(x) * probe.scale, y * probe.scale, beta=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"probe step {step}/{steps} loss {loss.item():.4f}")
    return probe.eval()


@torch.no_grad()
def evaluate_probe(probe: Probe, world: WorldConfig, n: int = 256, seed: int = 99) -> dict:
    """Accuracy on held-out identities: MAE per field (pose in degrees) and mouth correlation,
    on random poses and (``*_placed``) on heads placed as in talking clips."""
    from training.world import heldout_ids

    out: dict = {}
    for placed, suffix in ((0.0, ""), (1.0, "_placed")):
        rng = np.random.default_rng(seed)
        x, y = _batch(world, heldout_ids(world), rng, n, 256, placed)
        p = torch.cat([probe(x[i : i + 64]) for i in range(0, n, 64)])
        err = (p - y).abs().mean(0)
        r = float(np.corrcoef(p[:, 0].numpy(), y[:, 0].numpy())[0, 1])
        out |= {
            f"mouth_open_mae{suffix}": float(err[0]),
            f"mouth_open_r{suffix}": r,
            f"yaw_mae_deg{suffix}": float(err[1] * 90),
            f"pitch_mae_deg{suffix}": float(err[2] * 90),
            f"roll_mae_deg{suffix}": float(err[3] * 90),
        }
    out["samples"] = n
    return out


@torch.no_grad()
def probe_read(probe: Probe, frames: torch.Tensor, batch: int = 32) -> np.ndarray:
    """(T, 3, S, S) in [-1, 1] -> (T, 4): mouth_open, yaw, pitch, roll (degrees/90)."""
    return torch.cat([probe(frames[i : i + batch]) for i in range(0, len(frames), batch)]).numpy()


def save_probe(probe: Probe, path: Path, accuracy: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().half().contiguous() for k, v in probe.state_dict().items()}
    save_file(sd, str(path), metadata={"kind": "probe", "accuracy": json.dumps(accuracy)})


def load_probe(path: Path) -> tuple[Probe, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"probe weights not found: {path} (train them: livehead train probe)")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    if md.get("kind") != "probe":
        raise UserError(f"{path}: not probe weights")
    probe = Probe()
    probe.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return probe.eval(), json.loads(md.get("accuracy", "{}"))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="config (its [world] section is used)")
    p.add_argument("--out", default="weights/probe.safetensors", help="output safetensors")
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--batch", type=int, default=32, help="frames per step")
    p.add_argument(
        "--placed",
        type=float,
        default=0.5,
        help="share of frames with the head placed as in talking clips (the rest: random poses)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def run(a: argparse.Namespace) -> int:
    if a.steps < 1 or a.batch < 2 or not 0.0 <= a.placed <= 1.0:
        raise UserError("--steps must be >= 1, --batch >= 2 and --placed in [0, 1]")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    probe = train_probe(cfg.world, a.steps, a.batch, placed=a.placed)
    acc = evaluate_probe(probe, cfg.world)
    save_probe(probe, Path(a.out), acc)
    print(json.dumps(acc))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="training.probe", description=__doc__)
    add_args(parser)
    raise SystemExit(run(parser.parse_args()))
