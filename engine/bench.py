"""Stream benchmark: the real engine session fed audio like a transport would, measured from
the outside (wall clock at push and pull), as STREAMING.md asks.

    livehead bench stream --realtime --duration 60 --chunk-ms 20 --threads 1 --json

Audio is pushed in ``--chunk-ms`` chunks, at real-time pace with ``--realtime`` (each chunk is
pushed when its last sample would have been captured; when the engine is behind, everything
captured so far goes in one push, as a transport would do), else as fast as possible; it loops for
``--duration`` seconds (a soak). After each push the bench pulls. It reports one JSON object:

- latency_ms: end to end, per frame, from the moment its last input sample came in (real time:
  when the sample existed on the capture clock, so falling behind shows; fast: when it was
  pushed) to the moment the frame came out of ``pull`` (p50/p95/p99); latency_first_sample_ms
  from its first sample; nominal_latency_ms is the window + look-ahead part alone.
- stage_ms_per_window: compute per window and stage (features = log-mel + windowing, encoder =
  speech encoder + variance adapter, denoiser = all DDIM steps, render = the W-frame batch).
- fps (frames out per wall second), rtf (engine compute time / audio time; < 1 keeps up),
  first_frame_ms (first push to first frame), dropped_frames, rss_mb over time, drift.
- av_offset_ms: the lag between the output audio laid out on the frames' pts and the input,
  found by cross-correlation (0 by construction, measured anyway), and audio_exact, the share
  of frames whose 640 samples equal the input at their pts bit for bit.
- the resolved config and the machine (CPU, cores, load average, torch, threads).

Without trained weights (weights/*.safetensors) the networks are randomly initialised from the
config: speed does not depend on the weights, and the JSON says "weights": "random".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.session_api import SAMPLE_RATE, SAMPLES_PER_FRAME

BENCH_TEXT = (
    "The quick brown fox jumps over the lazy dog. A talking head should move its lips in time "
    "with every word, pause when the speaker pauses, and keep breathing while it listens."
)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audio", default=None, help="speech file (default: espeak-ng, else synthetic)")
    p.add_argument("--image", default=None, help="portrait (default: the bundled avatar)")
    p.add_argument("--backend", default=None, help="runner backend (default: stream.backend)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: stream.device)")
    p.add_argument("--realtime", action="store_true", help="push at real-time pace")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio (looped)")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="push size in milliseconds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pose",
        default=None,
        metavar="YAW,PITCH,ROLL",
        help="command this head pose (degrees) for the whole run, e.g. 15,0,0: measures the "
        "controlled path (with stage2.control_guidance > 0, a second denoiser pass)",
    )
    p.add_argument("--config", default=None, help="config name or .toml (default: the weights')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--stage1", default=None, help="stage-1 safetensors (default: bundled)")
    p.add_argument("--checkpoint", default=None, help="stage-2 safetensors (default: bundled)")
    p.add_argument(
        "--random-weights", action="store_true", help="random networks even if weights exist"
    )
    p.add_argument("--plot", default=None, help="write a latency-over-time PNG here")
    p.add_argument("--json", action="store_true", help="no progress on stderr, only the JSON")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def synthetic_voice(seconds: float, seed: int = 0) -> np.ndarray:
    """A speech-like test signal, (N,) float32 16 kHz: a glottal pulse train (pitch gliding
    around 120 Hz) through two moving formant resonators, cut into 150-400 ms "syllables"
    with short pauses and a longer one every few seconds."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = np.cumsum(f0 / SAMPLE_RATE)
    pulses = np.diff(np.floor(phase), prepend=0.0)  # 1 at each glottal closure
    src = lfilter([1.0], [1.0, -0.95], pulses)  # spectral tilt
    out = np.zeros(n)
    block = 320  # formants move every 20 ms
    f1 = 500 + 300 * np.sin(2 * np.pi * 3.1 * t[::block])
    f2 = 1500 + 700 * np.sin(2 * np.pi * 2.3 * t[::block] + 1.0)
    zi1 = np.zeros(2)
    zi2 = np.zeros(2)
    for k, i in enumerate(range(0, n, block)):
        seg = src[i : i + block]
        for f, zi, bw in ((f1[k], zi1, 80.0), (f2[k], zi2, 120.0)):
            r = math.exp(-math.pi * bw / SAMPLE_RATE)
            a = [1.0, -2 * r * math.cos(2 * math.pi * f / SAMPLE_RATE), r * r]
            y, zi[:] = lfilter([1 - r], a, seg, zi=zi)
            out[i : i + block] += y
    env = np.zeros(n)
    i = 0
    while i < n:
        length = int(rng.uniform(0.15, 0.4) * SAMPLE_RATE)
        gap = int(rng.uniform(0.03, 0.12) * SAMPLE_RATE)
        if rng.random() < 0.12:
            gap = int(rng.uniform(0.4, 0.9) * SAMPLE_RATE)
        env[i : i + length] = np.sin(np.linspace(0, np.pi, min(length, n - i))) ** 0.5
        i += length + gap
    out *= env
    out += rng.normal(0, 1e-3, n)  # a noise floor, as a microphone has
    return (0.3 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def espeak_speech(text: str = BENCH_TEXT) -> np.ndarray | None:
    """Speech from espeak-ng (16 kHz mono float32), or None if it is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    from engine.audio import load_audio

    with tempfile.TemporaryDirectory() as d:
        wav = Path(d) / "speech.wav"
        try:
            subprocess.run([exe, "-w", str(wav), text], check=True, capture_output=True, timeout=60)
            return load_audio(wav)
        except (subprocess.SubprocessError, OSError, UserError):
            return None


def bench_audio(path: str | None) -> tuple[np.ndarray, str]:
    from engine.audio import load_audio

    if path:
        return load_audio(path), str(path)
    speech = espeak_speech()
    if speech is not None and speech.size:
        return speech, "espeak-ng"
    return synthetic_voice(6.0), "synthetic"


def machine_info() -> dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def percentiles(values: list[float] | np.ndarray, qs: tuple[int, ...] = (50, 95, 99)) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in qs}


AV_WINDOW_S = 30  # the first 30 s of output audio are laid out for the lag search
MAX_LAG = 3200  # ±200 ms
STAGE_KEYS = ("features_ms", "encoder_ms", "denoiser_ms", "render_ms")


class _Recorder:
    """What the bench keeps per output frame, in bounded memory for long soaks: pts, pull time,
    per-window stage totals, exact-audio count, and the first 30 s of output audio."""

    def __init__(self, signal: np.ndarray) -> None:
        n = min(signal.size, AV_WINDOW_S * SAMPLE_RATE)
        self.signal = signal
        self.out_audio = np.zeros(n, np.float32)
        # Flat typed arrays (8 bytes an entry), not lists of Python objects: over a 30-minute
        # soak the bench's own records must not pass for the engine's memory growth.
        self.pts = array("q")
        self.t_out = array("d")
        self._window: tuple[int, int] | None = None  # the window whose frames are arriving
        self._sums = dict.fromkeys(STAGE_KEYS, 0.0)
        self.window_ms: dict[str, array] = {k: array("d") for k in STAGE_KEYS}
        self.exact = 0
        self.contiguous = True

    def add(self, frame: Any, t_out: float) -> None:
        p = frame.pts_samples
        self.contiguous &= p == len(self.pts) * SAMPLES_PER_FRAME
        self.pts.append(p)
        self.t_out.append(t_out)
        ref = self.signal[p : p + SAMPLES_PER_FRAME]
        if ref.size < SAMPLES_PER_FRAME:  # the last frame is zero-padded
            ref = np.concatenate([ref, np.zeros(SAMPLES_PER_FRAME - ref.size, np.float32)])
        self.exact += int(np.array_equal(frame.audio, ref))
        if p < self.out_audio.size:
            k = min(SAMPLES_PER_FRAME, self.out_audio.size - p)
            self.out_audio[p : p + k] = frame.audio[:k]
        meta = frame.meta
        key = (meta["epoch"], meta["window"])
        if key != self._window:  # a window's frames come together, in order
            self._close_window()
            self._window = key
        for k in STAGE_KEYS:
            self._sums[k] += float(meta[k])

    def _close_window(self) -> None:
        if self._window is not None:
            for k in STAGE_KEYS:
                self.window_ms[k].append(self._sums[k])
        self._sums = dict.fromkeys(STAGE_KEYS, 0.0)
        self._window = None

    def stages(self) -> dict[str, dict]:
        """Per-window compute p50/p95 (render over rendered windows only)."""
        self._close_window()
        w = {k: np.frombuffer(v, dtype=np.float64) for k, v in self.window_ms.items()}
        rendered = w["render_ms"] > 0
        out = {}
        for key in STAGE_KEYS:
            vals = w[key][rendered] if key == "render_ms" else w[key]
            out[key[:-3]] = percentiles(vals.tolist(), (50, 95))
        total = np.sum(np.stack(list(w.values())), axis=0)[rendered]
        out["total"] = percentiles(total.tolist(), (50, 95))
        return out

    def av_offset(self) -> dict[str, Any]:
        """The lag of the output audio laid out on the frames' pts against the input: the
        cross-correlation peak over ±200 ms (0 by construction, measured anyway), and the
        share of frames whose 640 samples equal the input at their pts bit for bit."""
        exact = round(self.exact / max(len(self.pts), 1), 6)
        n = self.out_audio.size
        ref = self.signal[:n].astype(np.float64)
        if n <= 2 * MAX_LAG or not np.any(ref):
            return {"av_offset_ms": None, "audio_exact": exact, "pts_contiguous": self.contiguous}
        from scipy.signal import correlate

        mid = self.out_audio[MAX_LAG : n - MAX_LAG].astype(np.float64)
        corr = correlate(ref, mid, mode="valid")  # index L: ref[L + i] . out[MAX_LAG + i]
        lag = int(np.argmax(corr)) - MAX_LAG  # output audio sits -lag samples after the input
        return {
            "av_offset_ms": round(-lag * 1000.0 / SAMPLE_RATE, 3),
            "audio_exact": exact,
            "pts_contiguous": self.contiguous,
        }


def run_stream(
    engine: Any,
    avatar: Any,
    audio: np.ndarray,
    *,
    duration_s: float,
    chunk_ms: float,
    realtime: bool,
    seed: int = 0,
    progress: bool = False,
    pose: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """Feed ``audio`` (16 kHz, looped to ``duration_s``) through a session; measure."""
    chunk = max(1, int(round(chunk_ms * SAMPLE_RATE / 1000)))
    total = int(round(duration_s * SAMPLE_RATE))
    if total < SAMPLES_PER_FRAME:
        raise UserError("--duration must be at least one frame (0.04 s)")
    reps = -(-total // audio.size)
    signal = np.tile(audio, reps)[:total]
    plan = engine.plan

    # Warm-up (first calls allocate and pick kernels): a throwaway session, one second.
    warm = engine.session(avatar, seed=seed)
    warm.push_audio(signal[: min(total, SAMPLE_RATE)])
    warm.pull()
    warm.close()

    session = engine.session(avatar, seed=seed)
    if pose is not None:
        from engine.session_api import Controls

        session.set_controls(Controls(pose_deg=pose))
    rec = _Recorder(signal)
    push_end = array("q")  # end sample of each push
    push_time = array("d")  # monotonic time right before the push
    rss_t: list[tuple[float, float]] = []
    lag = {"min": math.inf, "max": -math.inf, "last": 0.0}
    compute_s = 0.0
    pushed = 0
    t0 = time.monotonic()
    next_report = 0.0
    while pushed < total:
        n = min(chunk, total - pushed)
        if realtime:
            due = t0 + (pushed + n) / SAMPLE_RATE
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:  # behind: push every whole chunk captured by now, as a transport would
                ready = int((time.monotonic() - t0) * SAMPLE_RATE) - pushed
                n = min(max(n, ready // chunk * chunk), total - pushed)
        tp = time.monotonic()
        session.push_audio(signal[pushed : pushed + n])
        out = session.pull()
        tq = time.monotonic()
        compute_s += tq - tp
        pushed += n
        push_end.append(pushed)
        push_time.append(tp)
        for f in out:
            rec.add(f, tq)
        behind = pushed / SAMPLES_PER_FRAME - len(rec.pts)
        lag.update(min=min(lag["min"], behind), max=max(lag["max"], behind), last=behind)
        if pushed / SAMPLE_RATE >= next_report:
            rss_t.append((pushed / SAMPLE_RATE, rss_mb()))
            next_report += 1.0
            if progress:
                msg = f"\r{pushed / SAMPLE_RATE:7.1f} s  {len(rec.pts)} frames"
                print(msg, end="", file=sys.stderr)
    n_stream = len(rec.pts)
    t_end = time.monotonic()
    session.finish()
    for f in session.pull():
        rec.add(f, time.monotonic())
    compute_s += time.monotonic() - t_end
    stats = session.stats
    session.close()
    if progress:
        print(file=sys.stderr)

    # End-to-end latency: frame out minus the time its last (and first) input sample came in.
    # Real time: when the sample existed on the capture clock (t0 + its time in the stream),
    # so falling behind shows up as growing latency; fast: when it was pushed.
    ends = np.asarray(push_end)
    times = np.asarray(push_time)

    def t_in(sample: int) -> float:
        if realtime:
            return t0 + (sample + 1) / SAMPLE_RATE
        return float(times[int(np.searchsorted(ends, sample, side="right"))])

    lat, lat_first, t_axis = [], [], []
    for pts, t_out in zip(rec.pts[:n_stream], rec.t_out[:n_stream]):
        lat.append((t_out - t_in(pts + SAMPLES_PER_FRAME - 1)) * 1000)
        lat_first.append((t_out - t_in(pts)) * 1000)
        t_axis.append((pts + SAMPLES_PER_FRAME) / SAMPLE_RATE)
    behind_s = max((t - t0 - e / SAMPLE_RATE for t, e in zip(times, ends)), default=0.0)
    wall = t_end - t0
    first_frame_ms = (rec.t_out[0] - t_in(0)) * 1000 if rec.pts else None
    rss_values = [r for _, r in rss_t]
    ten = rss_values[max(0, len(rss_values) // 10)] if rss_values else 0.0
    result: dict[str, Any] = {
        "mode": "realtime" if realtime else "fast",
        "audio_s": round(total / SAMPLE_RATE, 3),
        "chunk_ms": chunk * 1000 / SAMPLE_RATE,
        "frames": len(rec.pts),
        "fps": round(n_stream / wall, 3) if wall > 0 else None,
        "rtf": round(compute_s / (total / SAMPLE_RATE), 4),
        "wall_s": round(wall, 3),
        "latency_ms": percentiles(lat),
        "latency_first_sample_ms": percentiles(lat_first),
        "nominal_latency_ms": plan.latency_samples * 1000 / SAMPLE_RATE,
        "first_frame_ms": round(first_frame_ms, 3) if first_frame_ms is not None else None,
        # Real time: how late the bench pushed a chunk at worst (> 0: the engine fell behind).
        "max_push_delay_ms": round(behind_s * 1000, 1) if realtime else None,
        "stage_ms_per_window": rec.stages(),
        "window_frames": plan.window_frames,
        "dropped_frames": stats.dropped_frames,
        # drawn by the draft exit (stage1.fast_head) under a render deadline
        "fast_frames": stats.frames_fast,
        "rss_mb": round(rss_values[-1], 1) if rss_values else None,
        "rss_mb_max": round(max(rss_values), 1) if rss_values else None,
        # last sample minus the one at 10 % of the run (after warm-up allocations)
        "rss_growth_mb": round(rss_values[-1] - ten, 1) if rss_values else None,
        "rss_over_time": [
            [round(t, 1), round(r, 1)] for t, r in rss_t[:: max(1, len(rss_t) // 20)]
        ],
        # Frames out after the end of input vs audio pushed: |drift| < 1 frame when nothing is
        # lost or invented; lag_frames is how far video trails the input during the run.
        "drift_frames": round(len(rec.pts) - total / SAMPLES_PER_FRAME, 3),
        "lag_frames": {k: round(v, 2) for k, v in lag.items()},
    }
    result.update(rec.av_offset())
    result["_series"] = {"t": t_axis, "latency_ms": lat}
    return result


def plot_latency(series: dict[str, list[float]], nominal_ms: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5), dpi=110)
    ax.plot(series["t"], series["latency_ms"], lw=0.8, label="end to end (last sample -> frame)")
    ax.axhline(nominal_ms, color="tab:red", ls="--", lw=0.8, label="window + look-ahead")
    ax.set_xlabel("stream time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _load_engine(args: argparse.Namespace) -> Any:
    from engine.config import load_config
    from engine.stream import Engine
    from engine.weights import DEFAULT_STAGE1, DEFAULT_STAGE2

    have = (args.stage1 or DEFAULT_STAGE1.exists()) and (args.checkpoint or DEFAULT_STAGE2.exists())
    kw = {"backend": args.backend, "device": args.device, "threads": args.threads}
    if have and not args.random_weights:
        return Engine.load(
            args.stage1, args.checkpoint, config=args.config, overrides=args.set, **kw
        )
    cfg = load_config(args.config or "tiny", args.set)
    missing = [str(p) for p in (DEFAULT_STAGE1, DEFAULT_STAGE2) if not p.exists()]
    note = "--random-weights" if args.random_weights else f"missing {', '.join(missing)}"
    return Engine.random(cfg, info={"note": note}, **kw)


def _avatar(engine: Any, image: str | None) -> Any:
    from engine.media import decode_image
    from engine.weights import DEFAULT_AVATAR

    if image:
        return engine.prepare_avatar(decode_image(image))
    if DEFAULT_AVATAR.is_file():
        return engine.default_avatar()
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    img = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    return engine.prepare_avatar(img)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.duration <= 0 or args.chunk_ms <= 0:
        raise UserError("--duration and --chunk-ms must be positive")
    pose = None
    if args.pose is not None:
        try:
            yaw, pitch, roll = (float(v) for v in args.pose.split(","))
        except ValueError:
            raise UserError(f"--pose wants YAW,PITCH,ROLL in degrees, got {args.pose!r}") from None
        pose = (yaw, pitch, roll)
    engine = _load_engine(args)
    avatar = _avatar(engine, args.image)
    audio, source = bench_audio(args.audio)
    res = run_stream(
        engine,
        avatar,
        audio,
        duration_s=args.duration,
        chunk_ms=args.chunk_ms,
        realtime=args.realtime,
        seed=args.seed,
        progress=not args.json,
        pose=pose,
    )
    series = res.pop("_series")
    info = {k: v for k, v in engine.info.items() if not k.endswith("_meta")}
    out: dict[str, Any] = {
        "bench": "stream",
        "weights": info.pop("weights", "trained"),
        "weights_info": info,
        "audio": source,
        "pose_deg": list(pose) if pose is not None else None,
        **res,
        "machine": machine_info(),
        "config": engine.resolved_config(),
    }
    if args.plot:
        plot_latency(series, res["nominal_latency_ms"], args.plot)
        out["plot"] = args.plot
    print(json.dumps(out, indent=2))
    return out
