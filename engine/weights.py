"""Model weights as safetensors, with the resolved config stored inside the file.

A weights file rebuilds its model on its own: ``metadata["config"]`` is the JSON of the resolved
``engine.config.Config`` and ``metadata["kind"]`` says which stage it holds. Loading a file into
a model of another config fails with a message that names both configs, never a shape dump.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import Config, from_dict, to_dict
from engine.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO_ROOT / "weights"
DEFAULT_STAGE1 = WEIGHTS_DIR / "stage1_tiny.safetensors"
DEFAULT_STAGE2 = WEIGHTS_DIR / "stage2_tiny.safetensors"
DEFAULT_AVATAR = WEIGHTS_DIR / "avatar.png"
# Never cast these to fp16: training used them in fp32 and they are a few hundred numbers.
KEEP_FP32 = (
    "normalizer.center",
    "normalizer.half_range",
    "lmd.q",
    "lmd.weight",
    "head_reader.coords",
)


def save_weights(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    cfg: Config,
    kind: str,
    dtype: torch.dtype | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write ``tensors`` atomically; floating tensors cast to ``dtype`` when given (e.g. fp16),
    except the small statistics that must stay exact (the α normaliser, the frozen LMD basis)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if dtype is not None and v.is_floating_point() and not k.endswith(KEEP_FP32):
            v = v.to(dtype)
        out[k] = v
    metadata = {"kind": kind, "config": json.dumps(to_dict(cfg)), "meta": json.dumps(meta or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(out, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a livehead weights file ({e})") from None


def load_weights(
    path: str | Path, kind: str
) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Return (tensors as fp32, the config stored with them, extra metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    md = read_metadata(path)
    if md.get("kind") != kind:
        raise UserError(f"{path}: holds '{md.get('kind')}' weights, expected '{kind}'")
    cfg = from_dict(json.loads(md["config"]), where=str(path))
    tensors = {
        k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()
    }
    return tensors, cfg, json.loads(md.get("meta", "{}"))


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with a readable error when the weights belong to another config."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if missing or unexpected or bad:
        detail = []
        if bad:
            k = bad[0]
            detail.append(
                f"{len(bad)} shape mismatches (e.g. {k}: file {tuple(tensors[k].shape)}"
                f" vs model {tuple(own[k].shape)})"
            )
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise UserError(
            f"{where}: weights do not fit this model's config: {'; '.join(detail)}. "
            "Use the config the checkpoint was trained with (it is stored in the file)."
        )
    model.load_state_dict(tensors, strict=True)
