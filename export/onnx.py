"""PyTorch networks -> ONNX graphs for ``engine.backends_ort``, checked for parity.

One graph per network call the engine makes (see ``engine/backends_ort.py`` for names and
shapes). Export uses ``torch.onnx.export(dynamo=True)`` (opset 18); every graph is then run in
ONNX Runtime on the same inputs as PyTorch and the largest absolute difference is recorded in
``manifest.json`` (and the export fails if one is above its tolerance). Inputs for the check are
realistic: a portrait-like image through the real encoder, α's and noise at the scales the
engine uses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.backends_ort import (
    FAST_GRAPH,
    FORMAT_VERSION,
    GRAPHS,
    MANIFEST,
    default_onnx_dir,
    model_fingerprint,
    read_manifest,
)
from engine.config import Config
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.models.stage2 import CONTROL_DIM, CONTROL_MASKS, Stage2Nets
from engine.stream import Engine, plan_dict

OPSET = 18
# Largest |ONNX Runtime - PyTorch| allowed, relative to max(1, max |PyTorch output|).
TOLERANCE = 1e-3


class _Encode1(nn.Module):
    def __init__(self, m: Stage1Model) -> None:
        super().__init__()
        self.m = m

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, feats = self.m.encode(img)
        return (h, *feats)


class _Motion1(nn.Module):
    def __init__(self, m: Stage1Model) -> None:
        super().__init__()
        self.m = m

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.m.motion(h)


class _Render1(nn.Module):
    def __init__(self, m: Stage1Model) -> None:
        super().__init__()
        self.m = m

    def forward(
        self, h: torch.Tensor, alpha: torch.Tensor, feats: list[torch.Tensor]
    ) -> torch.Tensor:
        return self.m.render(h, list(feats), alpha).float().clamp(-1.0, 1.0)


class _RenderFast1(nn.Module):
    def __init__(self, m: Stage1Model) -> None:
        super().__init__()
        self.m = m

    def forward(
        self, h: torch.Tensor, alpha: torch.Tensor, src: torch.Tensor, feats: list[torch.Tensor]
    ) -> torch.Tensor:
        return self.m.render_fast(h, list(feats), alpha, src).float()


class _Encode2(nn.Module):
    def __init__(self, n: Stage2Nets) -> None:
        super().__init__()
        self.n = n

    def forward(
        self, feats: torch.Tensor, control_values: torch.Tensor, control_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.n.encode(feats, control_values, control_mask)


class _Denoise2(nn.Module):
    def __init__(self, n: Stage2Nets) -> None:
        super().__init__()
        self.n = n

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        speech: torch.Tensor,
        ref_alpha: torch.Tensor,
        ref_h: torch.Tensor,
        known: torch.Tensor,
        known_mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.n.denoise(x_t, t, speech, ref_alpha, ref_h, known, known_mask)


def _portrait_like(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth image in [-1, 1] (a blurred random field): realistic input statistics for the
    encoder, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic").clamp(-1, 1)


def _export_one(
    module: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: Any = None,
) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module.eval(),
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
        if prog is None:  # pragma: no cover - only the legacy exporter returns None
            raise RuntimeError("torch.onnx.export returned no program")
        prog.optimize()
        prog.save(str(path))


def _parity(path: Path, feed: dict[str, np.ndarray], reference: list[torch.Tensor]) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feed)
    worst = 0.0
    for got, ref in zip(outs, reference, strict=True):
        r = ref.detach().float().numpy()
        if got.shape != r.shape:
            raise UserError(f"{path.name}: ONNX output shape {got.shape} != PyTorch {r.shape}")
        err = float(np.max(np.abs(got - r))) if r.size else 0.0
        scale = max(1.0, float(np.max(np.abs(r))) if r.size else 1.0)
        if not np.isfinite(err) or err > TOLERANCE * scale:
            raise UserError(
                f"{path.name}: ONNX Runtime differs from PyTorch by {err:.3g} "
                f"(tolerance {TOLERANCE * scale:.3g}); the export is not usable"
            )
        worst = max(worst, err)
    return worst


def export_onnx(
    stage1: Stage1Model,
    stage2: Stage2Nets,
    plan: dict[str, int],
    out_dir: str | Path,
    source: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Write the five graphs (six with a trained ``stage1.fast_head``) and ``manifest.json``
    to ``out_dir`` (atomically: a finished directory replaces any older one). Returns the
    manifest. ``fingerprint``: the models' ``model_fingerprint``, when the caller has it."""
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    stage1 = stage1.eval()
    stage2 = stage2.eval()
    if not stage1.lmd.frozen:
        stage1.lmd.freeze()
    fingerprint = fingerprint or model_fingerprint(stage1, stage2, plan)
    c1 = stage1.cfg
    s, w, k = plan["context_frames"], plan["window_frames"], plan["prefix_frames"]
    seg = s + w + plan["lookahead_frames"]
    n_den = k + w
    feat_dim = stage2.speech_encoder.feat_dim
    fpv = plan["feature_frames_per_video_frame"]
    g = torch.Generator().manual_seed(0)

    with torch.no_grad():
        img = _portrait_like(c1.image_size)
        h, feats = stage1.encode(img)
        alpha = stage1.motion(h).repeat(w, 1) + 0.3 * torch.randn(w, c1.motion_dim, generator=g)
        feats2 = torch.randn(1, seg * fpv, feat_dim, generator=g)
        cv = torch.zeros(1, seg, CONTROL_DIM)
        cm = torch.zeros(1, seg, CONTROL_MASKS)
        cm[:, seg // 2 :, 0] = 1.0  # one control given on half the frames: both paths traced
        cv[:, seg // 2 :, :2] = 0.1
        speech, _ = stage2.encode(feats2, cv, cm)
        speech = speech[:, s - k : s + w]
        x_t = torch.randn(1, n_den, c1.motion_dim, generator=g)
        t = torch.tensor([500], dtype=torch.long)
        ref_a = torch.randn(1, c1.motion_dim, generator=g) * 0.5
        ref_h = h.clone()
        known = torch.cat(
            [torch.randn(1, k, c1.motion_dim, generator=g), torch.zeros(1, w, c1.motion_dim)], 1
        )
        known_mask = torch.cat([torch.ones(1, k, 1), torch.zeros(1, w, 1)], 1)

    feat_names = [f"feat{i}" for i in range(len(feats))]
    batch = torch.export.Dim("batch", min=1, max=1024)
    jobs: list[tuple[str, nn.Module, tuple, list[str], list[str], Any, dict[str, torch.Tensor]]] = [
        (
            "stage1_encode",
            _Encode1(stage1),
            (img,),
            ["img"],
            ["h", *feat_names],
            None,
            {"img": img},
        ),
        (
            "stage1_motion",
            _Motion1(stage1),
            (h.repeat(2, 1),),
            ["h"],
            ["alpha"],
            {"h": {0: batch}},
            {"h": h.repeat(2, 1)},
        ),
        (
            "stage1_render",
            _Render1(stage1),
            (h, alpha, list(feats)),
            ["h", "alpha", *feat_names],
            ["frames"],
            {"h": None, "alpha": {0: batch}, "feats": [None] * len(feats)},
            {"h": h, "alpha": alpha, **dict(zip(feat_names, feats, strict=True))},
        ),
        (
            "stage2_encode",
            _Encode2(stage2),
            (feats2, cv, cm),
            ["feats", "control_values", "control_mask"],
            ["speech", "pred"],
            None,
            {"feats": feats2, "control_values": cv, "control_mask": cm},
        ),
        (
            "stage2_denoise",
            _Denoise2(stage2),
            (x_t, t, speech, ref_a, ref_h, known, known_mask),
            ["x_t", "t", "speech", "ref_alpha", "ref_h", "known", "known_mask"],
            ["eps"],
            None,
            {
                "x_t": x_t,
                "t": t,
                "speech": speech,
                "ref_alpha": ref_a,
                "ref_h": ref_h,
                "known": known,
                "known_mask": known_mask,
            },
        ),
    ]
    assert [j[0] for j in jobs] == list(GRAPHS)
    if stage1.renders_fast:
        # the draft exit (stage1.fast_head): the pyramid without its finest level, + the portrait
        coarse = feat_names[:-1]
        jobs.append(
            (
                FAST_GRAPH,
                _RenderFast1(stage1),
                (h, alpha, img, list(feats[:-1])),
                ["h", "alpha", "src", *coarse],
                ["frames"],
                {"h": None, "alpha": {0: batch}, "src": None, "feats": [None] * len(coarse)},
                {"h": h, "alpha": alpha, "src": img, **dict(zip(coarse, feats, strict=False))},
            )
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    parity: dict[str, float] = {}
    seconds: dict[str, float] = {}
    # The exporter logs every step at INFO; keep a command's output readable.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        for name, module, args, ins, outs, dyn, feed in jobs:
            say(f"exporting {name}")
            t0 = time.perf_counter()
            path = tmp / f"{name}.onnx"
            _export_one(module, args, path, ins, outs, dyn)
            with torch.no_grad():
                ref = module(*args)
            refs = list(ref) if isinstance(ref, tuple) else [ref]
            parity[name] = _parity(path, {k: v.numpy() for k, v in feed.items()}, refs)
            seconds[name] = round(time.perf_counter() - t0, 2)
        import onnx
        import onnxruntime

        manifest = {
            "format": FORMAT_VERSION,
            "model_fingerprint": fingerprint,
            "plan": plan,
            "opset": OPSET,
            "graphs": {j[0]: f"{j[0]}.onnx" for j in jobs},
            "parity": {"max_abs": parity, "tolerance_rel": TOLERANCE},
            "export_seconds": seconds,
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "source": source or {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_engine(
    engine: Engine,
    out_dir: str | Path | None = None,
    if_missing: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any], bool]:
    """Export the networks of a PyTorch ``engine`` under its window plan, to ``out_dir`` or the
    directory the engine would look in (``stream.onnx_dir``, else the weights' cache dir).
    ``if_missing``: keep an export of exactly these weights that is already there.
    Returns (directory, manifest, whether it was written now)."""
    stage1 = engine.stage1.model  # type: ignore[attr-defined]
    stage2 = engine.stage2.nets  # type: ignore[attr-defined]
    plan = plan_dict(engine.cfg)
    fingerprint = model_fingerprint(stage1, stage2, plan)
    configured = out_dir or engine.cfg.stream.onnx_dir
    out = Path(configured) if configured else default_onnx_dir(fingerprint)
    if if_missing:
        try:
            return out, read_manifest(out, fingerprint), False
        except UserError:
            if progress:
                progress(f"no ONNX export of these weights yet: exporting to {out} (~1 min)")
    source = {"stage1": engine.info.get("stage1"), "stage2": engine.info.get("stage2")}
    manifest = export_onnx(
        stage1, stage2, plan, out, source=source, progress=progress, fingerprint=fingerprint
    )
    return out, manifest, True


def onnx_engine(cfg: Config, progress: Callable[[str], None] | None = None) -> Engine:
    """``livehead serve`` with backend "onnx": the bundled weights, loaded once, exported first
    when their export is missing or stale, then run by ONNX Runtime."""
    torch_engine = Engine.load(config=cfg, backend="torch")
    export_engine(torch_engine, if_missing=True, progress=progress)
    return Engine.from_models(
        torch_engine.stage1.model,  # type: ignore[attr-defined]
        torch_engine.stage2.nets,  # type: ignore[attr-defined]
        torch_engine.cfg,
        backend="onnx",
        info=torch_engine.info,
    )
