"""Average weight files of one model (checkpoint averaging: a mean of points along one run).

    livehead train average A.safetensors B.safetensors --out F.safetensors [--mix 0.5 0.5]

Floating-point tensors become the weighted mean of the files' (``--mix``, default equal
weights); every other tensor must be the same in all files. The files must hold the same kind
of model with the same config (the first file's config and metadata go into the output, with
an ``averaged`` record). Stage 1's LMD basis must be the same in all of them: a mean of
orthonormal bases is not one, so only files whose encoder and LMD did not train apart (e.g.
exports of one renderer-only run) can be averaged. Output fp16, as the trainers write.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from engine.config import Config
from engine.errors import UserError
from engine.weights import load_weights, save_weights

_FIXED = ("lmd.",)  # prefixes that must agree exactly (stage 1's orthonormal basis)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="two or more safetensors weight files")
    p.add_argument("--out", required=True, help="output safetensors")
    p.add_argument("--mix", type=float, nargs="+", help="one weight per file (default: equal)")
    p.add_argument("--kind", default="stage1", choices=["stage1", "stage2"], help="model kind")


def average(
    files: list[str], mix: list[float] | None = None, kind: str = "stage1"
) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """(tensors, config, metadata) of the weighted mean of ``files``."""
    if len(files) < 2:
        raise UserError("give at least two weight files to average")
    w = [1.0 / len(files)] * len(files) if mix is None else list(mix)
    if len(w) != len(files) or any(x < 0 for x in w) or not sum(w) > 0:
        raise UserError(f"--mix needs {len(files)} non-negative weights with a positive sum")
    w = [x / sum(w) for x in w]
    loaded = [load_weights(f, kind) for f in files]
    tensors, cfg, meta = loaded[0]
    out: dict[str, torch.Tensor] = {}
    for f, (t, c, _) in zip(files[1:], loaded[1:], strict=True):
        if c != cfg:
            raise UserError(f"{f}: another config than {files[0]}; only one model's files average")
        if set(t) != set(tensors):
            raise UserError(f"{f}: other tensors than {files[0]}")
    for k, v in tensors.items():
        vs = [t[k] for t, _, _ in loaded]
        if all(torch.equal(v, x) for x in vs[1:]):
            out[k] = v
        elif not v.is_floating_point():
            raise UserError(f"{k}: differs between the files and is not floating point")
        elif k.startswith(_FIXED):
            raise UserError(f"{k}: the LMD basis differs between the files; it cannot be averaged")
        else:
            out[k] = torch.stack([x * wi for x, wi in zip(vs, w, strict=True)]).sum(0)
    record = {
        "files": [Path(f).name for f in files],
        "mix": [round(x, 6) for x in w],
        "steps": [m.get("step") for _, _, m in loaded],
    }
    return out, cfg, dict(meta, averaged=record)


def run(a: argparse.Namespace) -> int:
    tensors, cfg, meta = average(a.files, a.mix, a.kind)
    save_weights(a.out, tensors, cfg, kind=a.kind, dtype=torch.float16, meta=meta)
    print(f"wrote {a.out}: mean of {len(a.files)} files, mix {meta['averaged']['mix']}")
    return 0
