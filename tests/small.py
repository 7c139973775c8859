"""Shared pieces of the tests: small model configs (same structure as tiny, fast on CPU) and a
torchrun launcher for the DDP tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

# Stage 1 at 64², narrow widths.
SMALL_STAGE1 = [
    "stage1.image_size=64",
    "stage1.enc_channels=[8, 16, 16, 16, 16]",
    "stage1.dec_channels=[16, 16, 16, 16, 8]",
    "stage1.latent_dim=32",
    "stage1.head_hidden=32",
    "stage1.club_hidden=32",
]
# Stage 2 with one thin block per Conformer.
SMALL_STAGE2 = [
    "stage2.speech.d_model=32",
    "stage2.speech.ffn_dim=32",
    "stage2.speech.blocks=1",
    "stage2.denoiser.d_model=32",
    "stage2.denoiser.ffn_dim=32",
    "stage2.denoiser.blocks=1",
    "stage2.cond_dim=16",
    "stage2.adapter_hidden=16",
    # The tiny config serves with ONNX Runtime (an export step); tests run PyTorch unless they
    # test the ONNX backend itself.
    "stream.backend=torch",
]
# A small synthetic world split.
SMALL_WORLD = ["world.identities=40", "world.heldout_identities=8"]


def small_models(extra: list[str] | None = None):  # noqa: ANN201 - (Stage1Model, Stage2Nets, Config)
    """Random small networks (seed 0, eval mode, LMD frozen) and their config ("tiny" with
    SMALL_STAGE1 + SMALL_STAGE2 + 3 DDIM steps + ``extra``). The α normaliser is widened:
    random weights saturate α at the clamp otherwise, and the motion would not move."""
    import torch

    from engine.config import load_config
    from engine.models.stage1 import Stage1Model
    from engine.models.stage2 import Stage2Nets

    cfg = load_config(
        "tiny", [*SMALL_STAGE1, *SMALL_STAGE2, "stage2.sample_steps=3", *(extra or [])]
    )
    torch.manual_seed(0)
    m1 = Stage1Model(cfg.stage1).eval()
    m1.lmd.freeze()
    nets = Stage2Nets.from_config(cfg).eval()
    nets.normalizer.half_range.fill_(3.0)
    return m1, nets, cfg


def torchrun(module: str, args: list[str], overrides: list[str], timeout: int = 300):
    """Run ``python -m module`` under torchrun with 2 CPU (gloo) processes and the DDP check
    hook on; returns the CompletedProcess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        module,
        *args,
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, LIVEHEAD_DDP_CHECK="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def fingerprints_agree(run_dir: Path) -> bool:
    import json

    fp = json.loads((run_dir / "ddp_fingerprint.json").read_text())
    return abs(fp["0"] - fp["1"]) <= 1e-6 * max(1.0, abs(fp["0"]))


def crash_on_call(monkeypatch, module, name: str, n: int = 3):  # noqa: ANN001, ANN201
    """Make ``module.name`` (a trainer's batch function) raise KeyboardInterrupt on its n-th
    call, as a crash mid-run would; returns a function that puts the real one back."""
    real = getattr(module, name)
    calls = {"n": 0}

    def crashing(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, crashing)
    return lambda: monkeypatch.setattr(module, name, real)
