"""ONNX Runtime runners: the same ``Stage1Backend`` / ``Stage2Backend`` calls as the PyTorch
ones (``engine.backends``), over graphs written by ``livehead export onnx`` (``export/onnx.py``).

An export directory holds one graph per network call and ``manifest.json``::

    stage1_encode.onnx   img (1, 3, S, S)          -> h (1, latent), feat0..featN (pyramid)
    stage1_motion.onnx   h (B, latent)             -> alpha (B, motion_dim)
    stage1_render.onnx   h (1, latent), alpha (B, motion_dim), feat0..featN -> frames (B, 3, S, S)
    stage2_encode.onnx   feats, control_values, control_mask -> speech, pred   (one window)
    stage2_denoise.onnx  x_t, t, speech, ref_alpha, ref_h, known, known_mask -> eps
    stage1_render_fast.onnx  h, alpha (B, motion_dim), src (1, 3, S, S), feat0..featN-1
                             -> frames (B, 3, S, S)   (only with a trained stage1.fast_head)

The manifest records the fingerprint of the weights and window plan it was made from
(``model_fingerprint``); a runner refuses a directory made from other weights, so a stale export
can never drive a session silently. The stage-2 graphs have the window plan's fixed shapes
(the windowing always calls them with those); the stage-1 graphs take any batch of α's.

The engine itself never exports: it only reads what ``export/`` wrote (STYLE: engine depends on
nothing else in the repository).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.diffusion import AlphaNormalizer
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.models.stage2 import Stage2Nets

MANIFEST = "manifest.json"
GRAPHS = ("stage1_encode", "stage1_motion", "stage1_render", "stage2_encode", "stage2_denoise")
FAST_GRAPH = "stage1_render_fast"  # written only for a model with a trained stage1.fast_head
FORMAT_VERSION = 3  # 2: arithmetic lerp (engine.models.layers.lerp); 3: head offsets as one matmul


def model_fingerprint(stage1: Stage1Model, stage2: Stage2Nets, plan: dict[str, int]) -> str:
    """sha256 over every tensor of both models (names, dtypes, shapes, bytes) and the window
    plan the stage-2 graphs are shaped for."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "plan": plan}, sort_keys=True).encode())
    for prefix, module in (("stage1.", stage1), ("stage2.", stage2)):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{prefix}{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def default_onnx_dir(fingerprint: str) -> Path:
    """Where ``livehead export onnx`` puts (and the engine looks for) the graphs of one set of
    weights: $LIVEHEAD_CACHE or $XDG_CACHE_HOME/livehead or ~/.cache/livehead, then onnx/<id>."""
    root = os.environ.get("LIVEHEAD_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "livehead"
    return base / "onnx" / fingerprint[:16]


def read_manifest(onnx_dir: Path, fingerprint: str) -> dict[str, Any]:
    """The manifest of ``onnx_dir``, checked to belong to these weights (UserError otherwise)."""
    path = onnx_dir / MANIFEST
    hint = (
        "export the weights first: 'livehead export onnx' (with the same --stage1/--checkpoint "
        "and --config as this command)"
    )
    if not path.is_file():
        raise UserError(f"no ONNX export at {onnx_dir}: {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable {path} ({e}): {hint}") from None
    if manifest.get("model_fingerprint") != fingerprint:
        raise UserError(
            f"the ONNX export at {onnx_dir} was made from other weights or plan: {hint}"
        )
    missing = [g for g in GRAPHS if not (onnx_dir / f"{g}.onnx").is_file()]
    if missing:
        raise UserError(f"the ONNX export at {onnx_dir} lacks {', '.join(missing)}: {hint}")
    return manifest


def _session(path: Path, threads: int) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UserError(
            f"backend 'onnx' needs the onnxruntime package ({e}): pip install "
            "'livehead[cpu]' (or [gpu])"
        ) from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    # No busy-waiting between calls: on a small machine the other stages need those cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class OrtStage1:
    """``Stage1Backend`` over ONNX Runtime (CPU). The avatar's h and pyramid stay NumPy-backed
    CPU tensors.

    With two threads or more, a batch of two frames or more renders as two halves at once, each
    on its own session with half the threads: ONNX Runtime shares out each of the render graph's
    ~1200 small nodes between threads, and the hand-offs cost more than two independent runs do
    (2 cores, tiny config, a 2-frame window: 110 ms as one batch on 2 threads, 86 ms as two
    1-frame runs side by side, medians of 8; ``livehead bench stream`` gives the end-to-end
    figure)."""

    def __init__(self, onnx_dir: Path, model: Stage1Model, threads: int, fast: bool = True) -> None:
        cfg = model.cfg
        self.image_size = cfg.image_size
        self.motion_dim = cfg.motion_dim
        self.latent_dim = cfg.latent_dim
        self._encode = _session(onnx_dir / "stage1_encode.onnx", threads)
        self._motion = _session(onnx_dir / "stage1_motion.onnx", 1)
        self._pool: ThreadPoolExecutor | None = None
        if threads >= 2:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="livehead-render")
        self._render = self._runners(onnx_dir / "stage1_render.onnx", threads)
        path = onnx_dir / f"{FAST_GRAPH}.onnx"
        self.fast = fast and model.renders_fast and path.is_file()
        self._render_fast = self._runners(path, threads) if self.fast else []

    def _runners(self, path: Path, threads: int) -> list[Any]:
        """[one session on all threads] + (two on half each, with two threads or more)."""
        whole = [_session(path, threads)]
        if self._pool is None:
            return whole
        return whole + [_session(path, threads // 2), _session(path, threads - threads // 2)]

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self._encode.run(None, {"img": _np(img.float())})
        return torch.from_numpy(out[0]), [torch.from_numpy(f) for f in out[1:]]

    def motion(self, h: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._motion.run(None, {"h": _np(h.float())})[0])

    def render(
        self, h: torch.Tensor, feats: list[torch.Tensor], alpha: torch.Tensor
    ) -> torch.Tensor:
        feed = {"h": _np(h.float())}
        feed.update({f"feat{i}": _np(f) for i, f in enumerate(feats)})
        return self._run_split(self._render, feed, _np(alpha.float()))

    def render_fast(
        self, h: torch.Tensor, feats: list[torch.Tensor], alpha: torch.Tensor, src: torch.Tensor
    ) -> torch.Tensor:
        if not self.fast:
            raise UserError("this export has no draft exit (stage1.fast_head)")
        feed = {"h": _np(h.float()), "src": _np(src.float())}
        feed.update({f"feat{i}": _np(f) for i, f in enumerate(feats[:-1])})
        return self._run_split(self._render_fast, feed, _np(alpha.float()))

    def _run_split(self, runners: list[Any], feed: dict[str, np.ndarray], a: np.ndarray):
        """One call over the batch of α's, as two halves side by side where there are two."""
        if len(runners) == 1 or a.shape[0] < 2:
            return torch.from_numpy(runners[0].run(None, dict(feed, alpha=a))[0])
        assert self._pool is not None
        k = (a.shape[0] + 1) // 2
        first, second = runners[1:]
        late = self._pool.submit(second.run, None, dict(feed, alpha=a[k:]))
        out = first.run(None, dict(feed, alpha=a[:k]))[0]
        return torch.from_numpy(np.concatenate([out, late.result()[0]]))


class OrtStage2:
    """``windowing.Stage2Backend`` over ONNX Runtime (CPU), one thread (these graphs are too
    small to gain from more, as with PyTorch)."""

    def __init__(self, onnx_dir: Path, nets: Stage2Nets) -> None:
        self.motion_dim = nets.motion_dim
        self.latent_dim = nets.latent_dim
        norm = AlphaNormalizer(nets.motion_dim)
        norm.load_state_dict({k: v.cpu() for k, v in nets.normalizer.state_dict().items()})
        self.normalizer = norm
        self._encode = _session(onnx_dir / "stage2_encode.onnx", 1)
        self._denoise = _session(onnx_dir / "stage2_denoise.onnx", 1)

    def encode(
        self, feats: torch.Tensor, control_values: torch.Tensor, control_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        speech, pred = self._encode.run(
            None,
            {
                "feats": _np(feats.float()),
                "control_values": _np(control_values.float()),
                "control_mask": _np(control_mask.float()),
            },
        )
        return torch.from_numpy(speech), torch.from_numpy(pred)

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        speech: torch.Tensor,
        ref_alpha: torch.Tensor,
        ref_h: torch.Tensor,
        known: torch.Tensor,
        known_mask: torch.Tensor,
    ) -> torch.Tensor:
        feed = {
            "x_t": _np(x_t.float()),
            "t": _np(t.long()),
            "speech": _np(speech.float()),
            "ref_alpha": _np(ref_alpha.float()),
            "ref_h": _np(ref_h.float()),
            "known": _np(known.float()),
            "known_mask": _np(known_mask.float()),
        }
        return torch.from_numpy(self._denoise.run(None, feed)[0])


def ort_backends(
    stage1: Stage1Model,
    stage2: Stage2Nets,
    plan: dict[str, int],
    onnx_dir: str | Path | None,
    threads: int,
    fast: bool = True,
) -> tuple[OrtStage1, OrtStage2, dict[str, Any]]:
    """Runners over the export of exactly these networks (and plan); the manifest too."""
    fingerprint = model_fingerprint(stage1, stage2, plan)
    d = Path(onnx_dir) if onnx_dir else default_onnx_dir(fingerprint)
    manifest = read_manifest(d, fingerprint)
    threads = threads or torch.get_num_threads()
    s1 = OrtStage1(d, stage1, threads, fast)
    return s1, OrtStage2(d, stage2), dict(manifest, dir=str(d))
