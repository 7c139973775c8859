"""Loading the bundled (or a given) trained networks for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import Config, Stage1Config
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.models.stage2 import Stage2Nets
from engine.weights import DEFAULT_STAGE1, DEFAULT_STAGE2, load_into, load_weights


def load_stage1(path: str | Path | None = None) -> tuple[Stage1Model, Config, dict[str, Any]]:
    """Stage-1 model (eval mode, Q frozen) from safetensors; default: the bundled tiny model."""
    path = Path(path) if path else DEFAULT_STAGE1
    if not path.exists() and path == DEFAULT_STAGE1:
        raise UserError(
            f"no bundled stage-1 weights at {path}; train them with "
            "'livehead train stage1' or pass --checkpoint"
        )
    tensors, cfg, meta = load_weights(path, "stage1")
    model = Stage1Model(cfg.stage1)
    model.lmd.freeze()
    load_into(model, tensors, str(path))
    return model.eval(), cfg, meta


def check_stage_configs(stage1: Stage1Config, stage2_cfg: Config, where: str = "") -> None:
    """Stage 2 generates α for (and is conditioned on h of) one stage-1 model: the sizes must
    agree. ``stage2_cfg`` is the config stored with the stage-2 weights."""
    s = stage2_cfg.stage1
    if (s.motion_dim, s.latent_dim) != (stage1.motion_dim, stage1.latent_dim):
        raise UserError(
            f"{where or 'stage-2 weights'}: made for a stage-1 model with motion_dim "
            f"{s.motion_dim} and latent_dim {s.latent_dim}, but the stage-1 weights have "
            f"motion_dim {stage1.motion_dim} and latent_dim {stage1.latent_dim}; use the "
            "stage-1 weights stage 2 was trained on"
        )


def load_stage2(
    path: str | Path | None = None, stage1: Stage1Config | None = None
) -> tuple[Stage2Nets, Config, dict[str, Any]]:
    """Stage-2 networks (eval mode, normaliser included) from safetensors; default: the bundled
    tiny model. ``stage1``: the config of the stage-1 model they will drive, checked to agree on
    motion_dim / latent_dim."""
    path = Path(path) if path else DEFAULT_STAGE2
    if not path.exists() and path == DEFAULT_STAGE2:
        raise UserError(
            f"no bundled stage-2 weights at {path}; train them with "
            "'livehead train stage2' (after stage 1) or pass --checkpoint"
        )
    tensors, cfg, meta = load_weights(path, "stage2")
    if stage1 is not None:
        check_stage_configs(stage1, cfg, str(path))
    nets = Stage2Nets.from_config(cfg)
    load_into(nets, tensors, str(path))
    return nets.eval(), cfg, meta
