"""How the engine calls the networks: one small tensors-in/tensors-out interface per stage, so
the streaming engine and offline rendering never branch on the backend (STYLE.md).

    Stage1Backend  encode(img) -> (h, feats); motion(h) -> alpha; render(h, feats, alpha);
                   render_fast(h, feats, alpha, src) where ``fast`` (a trained draft exit)
    Stage2Backend  (``engine.windowing``) encode(...) -> speech; denoise(...) -> eps

``TorchStage1`` / ``TorchStage2`` implement them with PyTorch (CPU, or CUDA with
``device="cuda"``); ONNX Runtime / TensorRT runners implement the same protocols. The sampler
loop stays in ``engine.diffusion`` / ``engine.windowing``, in Python, once for every backend.

Device convention: everything the windowing code builds (features, prefix, noise, α) lives on
the CPU; a backend moves its inputs to its device and returns stage-2 outputs on the CPU. The
avatar's cached h and feature pyramid stay on the backend's device (they come from ``encode``
and only go back into ``render``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Protocol

import torch

from engine.diffusion import AlphaNormalizer
from engine.errors import UserError
from engine.models.stage1 import Stage1Model
from engine.models.stage2 import Stage2Nets
from engine.windowing import Stage2Backend

BACKENDS = ("torch", "onnx")
RENDER_DTYPES = ("fp32", "bf16")


class Stage1Backend(Protocol):
    """The stage-1 calls inference needs. Images are (B, 3, S, S) float32 in [-1, 1]."""

    image_size: int  # S
    motion_dim: int
    latent_dim: int
    fast: bool  # render_fast is available (the model has a trained stage1.fast_head)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """img (1, 3, S, S) -> h (1, latent_dim), feature pyramid (8²..S², batch 1), both on
        the backend's device (opaque to the caller; they only go back into ``render``)."""
        ...

    def motion(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, latent_dim) from ``encode`` -> raw α (B, motion_dim) on the CPU."""
        ...

    def render(
        self, h: torch.Tensor, feats: list[torch.Tensor], alpha: torch.Tensor
    ) -> torch.Tensor:
        """The portrait's h (1, latent) and pyramid, B raw α's (B, motion_dim), any device ->
        frames (B, 3, S, S) in [-1, 1] (clamped), on the backend's device."""
        ...

    def render_fast(
        self, h: torch.Tensor, feats: list[torch.Tensor], alpha: torch.Tensor, src: torch.Tensor
    ) -> torch.Tensor:
        """As ``render``, by the model's draft exit (only where ``fast``); src: the portrait
        (1, 3, S, S) in [-1, 1], any device."""
        ...


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------
def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}' (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for, but torch sees no CUDA GPU here")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got '{device}'")
    return dev


class CudaGraphed:
    """Calls ``fn(*tensors) -> tensor`` by replaying a CUDA graph captured once per input
    signature (shapes, dtypes). Inputs are copied into the graph's static buffers and the
    output is cloned out, so callers see plain function semantics. For the engine's many small
    fixed-shape calls (the denoiser at batch 1, a W-frame render) this removes the per-kernel
    launch cost. At most ``max_graphs`` signatures are captured; others run eagerly.

    Threads: sessions of one engine may run in several, and a graph's static buffers are
    shared, so one process-wide lock serialises every graphed call; captures are
    ``thread_local``, so other threads' eager GPU work (encoding, copies) may go on meanwhile.
    Buffers are made outside inference mode, so callers may or may not be in it."""

    _lock = threading.Lock()

    def __init__(self, fn: Any, max_graphs: int = 8, warmup: int = 2):
        self.fn, self.max_graphs, self.warmup = fn, max_graphs, warmup
        self.graphs: dict[tuple, tuple[Any, list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        with CudaGraphed._lock, torch.cuda.device(args[0].device):
            entry = self.graphs.get(key)
            if entry is None:
                if len(self.graphs) >= self.max_graphs:
                    with torch.no_grad():
                        return self.fn(*args)
                entry = self._capture(key, args)
            graph, static_in, static_out = entry
            for buf, a in zip(static_in, args):
                buf.copy_(a)
            graph.replay()
            return static_out.clone()

    def _capture(
        self, key: tuple, args: tuple[torch.Tensor, ...]
    ) -> tuple[Any, list[torch.Tensor], torch.Tensor]:
        with torch.inference_mode(False):
            static_in = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy initialisation happens outside the capture
                self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.fn(*static_in)
        entry = (graph, static_in, static_out)
        self.graphs[key] = entry
        return entry


def _check_graphs(cuda_graphs: bool, dev: torch.device) -> None:
    if cuda_graphs and dev.type != "cuda":
        raise UserError("stream.cuda_graphs needs device cuda (CUDA graphs are GPU-only)")


class TorchStage1:
    """``Stage1Backend`` over a ``Stage1Model`` (eval mode, LMD frozen).

    render_dtype "bf16" runs the renderer under bf16 autocast (the model keeps flow, mask and
    grid in fp32 inside); "fp32" is exact and the default. cuda_graphs: replay the renderer
    as a CUDA graph per batch size (``CudaGraphed``)."""

    def __init__(
        self,
        model: Stage1Model,
        device: str = "cpu",
        render_dtype: str = "fp32",
        channels_last: bool = True,
        cuda_graphs: bool = False,
    ):
        if render_dtype not in RENDER_DTYPES:
            raise UserError(
                f"stream.render_dtype must be one of {RENDER_DTYPES}, got '{render_dtype}'"
            )
        self.device = check_device(device)
        if not model.lmd.frozen:
            model.lmd.freeze()
        self.model = model.to(self.device).eval()
        # NHWC: the renderer's thin high-resolution convolutions run ~1.4x faster on CPU
        # (measured 54-64 vs 40-45 frames/s at 256², batch 4, 2 threads).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        cfg = model.cfg
        self.image_size = cfg.image_size
        self.motion_dim = cfg.motion_dim
        self.latent_dim = cfg.latent_dim
        self.render_dtype = render_dtype
        self.fast = model.renders_fast
        _check_graphs(cuda_graphs, self.device)
        self._graphed = CudaGraphed(self._render_flat) if cuda_graphs else None

    def _render_flat(self, h: torch.Tensor, alpha: torch.Tensor, *feats: torch.Tensor):
        with self._autocast():
            return self.model.render(h, list(feats), alpha).float().clamp(-1.0, 1.0)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.render_dtype == "bf16":
            # no weight-cast cache: nothing is reused across a forward here, and a cache
            # filled inside a CUDA-graph capture would hold the capture's tensors
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.inference_mode():
            x = img.to(self.device).contiguous(memory_format=self.memory_format)
            h, feats = self.model.encode(x)
        return h, feats

    def motion(self, h: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.motion(h.to(self.device)).float().cpu()

    def render(
        self, h: torch.Tensor, feats: list[torch.Tensor], alpha: torch.Tensor
    ) -> torch.Tensor:
        alpha = alpha.to(self.device)
        if self._graphed is not None:
            return self._graphed(h, alpha, *feats)
        with torch.inference_mode():
            return self._render_flat(h, alpha, *feats)

    def render_fast(
        self, h: torch.Tensor, feats: list[torch.Tensor], alpha: torch.Tensor, src: torch.Tensor
    ) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            out = self.model.render_fast(h, feats, alpha.to(self.device), src.to(self.device))
        return out.float()


class TorchStage2:
    """``windowing.Stage2Backend`` over ``Stage2Nets``. Outputs come back on the CPU (where the
    sampler loop runs); the normaliser is a CPU copy for the same reason. cuda_graphs: replay
    the denoiser (called once per DDIM step) as a CUDA graph."""

    def __init__(self, nets: Stage2Nets, device: str = "cpu", cuda_graphs: bool = False):
        self.device = check_device(device)
        _check_graphs(cuda_graphs, self.device)
        self.nets = nets.to(self.device).eval()
        self._graphed = CudaGraphed(self.nets.denoise) if cuda_graphs else None
        self.motion_dim = nets.motion_dim
        self.latent_dim = nets.latent_dim
        norm = AlphaNormalizer(nets.motion_dim)
        norm.load_state_dict({k: v.cpu() for k, v in nets.normalizer.state_dict().items()})
        self.normalizer = norm

    def encode(
        self, feats: torch.Tensor, control_values: torch.Tensor, control_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.device
        with torch.no_grad():
            speech, pred = self.nets.encode(feats.to(d), control_values.to(d), control_mask.to(d))
        return speech.cpu(), pred.cpu()

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
        d = self.device
        args = tuple(a.to(d) for a in (x_t, t, speech, ref_alpha, ref_h, known, known_mask))
        if self._graphed is not None:
            return self._graphed(*args).cpu()
        with torch.no_grad():
            return self.nets.denoise(*args).cpu()


def make_backends(
    stage1: Stage1Model,
    stage2: Stage2Nets,
    backend: str = "torch",
    device: str = "cpu",
    render_dtype: str = "fp32",
    channels_last: bool = True,
    *,
    plan: dict[str, int] | None = None,
    onnx_dir: str | None = None,
    threads: int = 0,
    cuda_graphs: bool = False,
    fast: bool = True,
) -> tuple[Stage1Backend, Stage2Backend, dict[str, Any]]:
    """The runners for one backend name, and facts about them (for reports).

    "torch": PyTorch on ``device`` (with ``cuda_graphs``: renderer and denoiser replayed as
    CUDA graphs). "onnx": ONNX Runtime (CPU) over the graphs that
    ``livehead export onnx`` wrote for exactly these networks and window ``plan`` (in
    ``onnx_dir``, default: the cache directory of their fingerprint). ``fast``: load the
    model's draft exit too, where the export has one (``stream.fast_draft``)."""
    if backend == "torch":
        return (
            TorchStage1(stage1, device, render_dtype, channels_last, cuda_graphs),
            TorchStage2(stage2, device, cuda_graphs),
            {"cuda_graphs": cuda_graphs} if cuda_graphs else {},
        )
    if backend == "onnx":
        if cuda_graphs:
            raise UserError("stream.cuda_graphs is for backend 'torch' on cuda")
        if check_device(device).type != "cpu":
            raise UserError("backend 'onnx' runs on the CPU here; use --device cpu")
        if render_dtype != "fp32":
            raise UserError("backend 'onnx' runs the exported fp32 graphs: stream.render_dtype")
        from engine.backends_ort import ort_backends

        s1, s2, manifest = ort_backends(stage1, stage2, plan or {}, onnx_dir, threads, fast)
        return s1, s2, {"onnx_dir": manifest["dir"], "onnx_parity": manifest.get("parity")}
    raise UserError(f"unknown backend '{backend}' (available: {', '.join(BACKENDS)})")


# --------------------------------------------------------------------------------------------
# Timing (per-stage compute for OutputFrame.meta and the bench)
# --------------------------------------------------------------------------------------------
class TimedStage2:
    """A ``Stage2Backend`` that forwards to another and adds up the wall time of its calls.

    Outputs are back on the CPU when a call returns, so the time includes any GPU work."""

    def __init__(self, inner: Stage2Backend) -> None:
        self.inner = inner
        self.motion_dim = inner.motion_dim
        self.normalizer = inner.normalizer
        self.encode_s = 0.0
        self.denoise_s = 0.0

    def reset(self) -> None:
        self.encode_s = self.denoise_s = 0.0

    def encode(
        self, feats: torch.Tensor, control_values: torch.Tensor, control_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        out = self.inner.encode(feats, control_values, control_mask)
        self.encode_s += time.perf_counter() - t0
        return out

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
        t0 = time.perf_counter()
        out = self.inner.denoise(x_t, t, speech, ref_alpha, ref_h, known, known_mask)
        self.denoise_s += time.perf_counter() - t0
        return out
