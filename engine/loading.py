"""Loading the bundled (or a given) trained networks for inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import Config
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.weights import DEFAULT_STAGE1, load_into, load_weights


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
